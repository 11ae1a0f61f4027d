"""Numeric tolerances of the tests, derived from the dtype and the computation, never from one machine's output.

Error model. A floating-point operation rounds its exact result with a relative error of at most u = eps / 2
(EPS16, EPS_BF16, EPS32, EPS64 below). Two evaluations of one value that differ only in how they round (another
reduction order: a KV-cache decode vs one full forward, a padded batch vs one row, chunked vs dense, 1 vs 2
threads, tensor-parallel partial sums; or an equivalent formula) each carry n such errors along the longest
chain of operations that feeds the value, each relative to the magnitude `scale` of the terms involved
(sum |x_i|, not |sum x_i|: cancellation does not shrink it). The first-order worst case of their difference is
n * eps * scale (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., ch. 3-4). With the errors
independent and uniform on [-u, u] (the usual statistical model, ibid. section 2.8) the difference has a
standard deviation of eps * scale * sqrt(n / 6), and `rounding_tol` allows six of them: sqrt(6 n) * eps * scale.
Values computed by the same operations on the same inputs in the same order are compared exactly.

Each tolerance must also stay well below what a real bug produces (a dropped or wrong term, an off-by-one
position, a wrong temperature: errors of 1e-2 and more); the call sites state that margin where it is not
obvious.
"""

import math

import torch

EPS16 = torch.finfo(torch.float16).eps  # 2**-10
EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 2**-7
EPS32 = torch.finfo(torch.float32).eps  # 2**-23 ~ 1.2e-7
EPS64 = torch.finfo(torch.float64).eps  # 2**-52 ~ 2.2e-16

# The synthetic estimator batches (asyncopd.estimators.synthetic.draw_batch over logits 2 * randn and randn,
# V = 23, <= 21 tokens). Roundings: a log-softmax over V (max, V exps, a V-term sum, a log: ~2V), the
# estimator's few ops, the mean over the tokens: ~100. Scale: the summed terms are log-probabilities
# (|log p| <= 2 max|z| + log V ~ 20 at 4.5 sigma of 2 * randn), differences of two, probability-weighted ones
# and ratio-weighted advantages (in test_estimators' seeded batches |log p| <= 12.2, per-token losses <= 6): 50.
ESTIMATOR_ROUNDINGS, ESTIMATOR_SCALE = 100, 50.0


def rounding_tol(eps: float, roundings: int, scale: float) -> float:
    """|a - b| allowed between two evaluations of one value that round differently (see the module docstring)."""
    return math.sqrt(6 * roundings) * eps * scale


FP64_ESTIMATOR = rounding_tol(EPS64, ESTIMATOR_ROUNDINGS, ESTIMATOR_SCALE)  # ~2.7e-13
FP32_ESTIMATOR = rounding_tol(EPS32, ESTIMATOR_ROUNDINGS, ESTIMATOR_SCALE)  # ~1.5e-4


def decoder_roundings(config, positions: int) -> int:
    """Roundings along the longest chain to one logit of a Qwen2 / Qwen3 / Llama forward over `positions` tokens.

    Per layer: input RMSNorm (d), q/k/v projection (d), Qwen3's q/k RMSNorm (head_dim), q.k (head_dim), the
    attention softmax's sum and its weighted sum of values (positions each), o projection (heads x head_dim,
    = d unless head_dim is set apart), post-attention RMSNorm (d), gate/up projection (d), down projection
    (intermediate); then the final RMSNorm (d) and the LM head (d). Llama 3's RoPE scaling changes the rotary
    frequencies, not the number of roundings.
    """
    d, heads = config.hidden_size, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // heads
    qk_norm = hd if config.model_type == "qwen3" else 0
    layer = 4 * d + qk_norm + hd + 2 * positions + heads * hd + config.intermediate_size
    return config.num_hidden_layers * layer + 2 * d


def logit_bound(model, vocab: int | None = None) -> float:
    """Bound on sum_i |h_i W_vi| for every logit v < `vocab` (None: every row): the scale of its rounding errors.

    h = g * x / rms(x) is the final RMSNorm's output, so ||h|| <= max|g| sqrt(d); Cauchy-Schwarz gives
    sum_i |h_i W_vi| <= ||h|| ||W_v||. Relative errors upstream of the norm reach the logits through this too.
    Rows past `vocab` (embedding padding, sliced off before the log-softmax) reach no compared value.
    """
    w = model.get_output_embeddings().weight.detach()[:vocab]
    gain = model.model.norm.weight.detach().abs().max()
    return float(gain * math.sqrt(w.shape[1]) * w.norm(dim=1).max())


def logit_tol(model, positions: int) -> float:
    """float32 logits of a decoder `model` from two forwards over `positions` tokens that round differently."""
    return rounding_tol(EPS32, decoder_roundings(model.config, positions), logit_bound(model))


def logprob_tol(model, positions: int, temperature: float = 1.0, vocab: int | None = None) -> float:
    """float32 log-probs log_softmax(logits / T) of a decoder `model` from two forwards that round differently.

    log p_v = z_v - logsumexp(z): both terms carry the logits' error (logsumexp is 1-Lipschitz in the max norm),
    hence 2x; the log-softmax adds V roundings of its own; dividing by T scales every error by 1 / T (T = 0,
    greedy, reports the plain softmax: pass 1). `vocab`: the log-softmax runs over the first `vocab` ids only
    (the tokenizer's; None: every row).
    """
    n = decoder_roundings(model.config, positions) + (vocab or model.config.vocab_size)
    return 2 * rounding_tol(EPS32, n, logit_bound(model, vocab) / temperature)


def adam_first_step_tol(grad: torch.Tensor, grad_tol: torch.Tensor | float, lr: float, weight: torch.Tensor,
                        adam_eps: float = 1e-8) -> torch.Tensor:
    """Elementwise bound on how far two first (Adam)W steps from gradients within `grad_tol` of `grad` land apart.

    The first step moves a weight by lr * f(g), f(g) = g / (|g| + adam_eps) (bias-corrected moments of one
    gradient). By the mean value theorem |f(g') - f(g)| <= grad_tol * sup f' over [|g| - grad_tol, |g| +
    grad_tol], f'(x) = adam_eps / (|x| + adam_eps)**2, and never more than 2 (|f| < 1). A gradient near 0 is
    thus amplified up to lr * grad_tol / adam_eps: no single scalar tolerance fits every element. Each step
    itself takes 8 roundings (m = (1 - b1) g; g * g and v = (1 - b2) g^2; sqrt; / sqrt(1 - b2); + adam_eps;
    m / denominator; * lr / (1 - b1)): first-order worst case 8 u |step| <= 4 EPS32 lr each, so 8 EPS32 lr
    apart; and each new weight is a float32 rounding of w - step: EPS32 |w| apart.
    """
    near = (grad.abs() - grad_tol).clamp(min=0)
    moved = (grad_tol * adam_eps / (near + adam_eps) ** 2).clamp(max=2.0)
    return lr * (moved + 8 * EPS32) + EPS32 * weight.abs()


def grad_tol(model, input_ids: torch.Tensor, grad: torch.Tensor) -> float:
    """float32 gradient `grad` of one weight of a Qwen2 `model` on a batch [B, T] from two passes that round
    differently: forward and backward chain (2x decoder_roundings over T positions) plus the sum over the
    B * T tokens; the terms of a weight's gradient are of the size of its largest entry."""
    n = 2 * decoder_roundings(model.config, input_ids.shape[1]) + input_ids.numel()
    return rounding_tol(EPS32, n, float(grad.abs().max()))


def assert_within(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor | float, what: str) -> None:
    """|got - want| <= tol elementwise (tol a tensor: assert_close takes only scalars)."""
    excess = (got - want).abs() - tol
    assert bool((excess <= 0).all()), f"{what}: exceeds its tolerance by up to {float(excess.max()):.3g}"
