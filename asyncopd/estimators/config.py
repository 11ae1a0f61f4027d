from dataclasses import dataclass


@dataclass
class EstimatorConfig:
    """Which OPD loss the learner uses, and the knobs of every family."""

    name: str = "forward_kl"
    top_k: int = 8  # teacher score cache size K
    student_top_k: int = 0  # student support frozen at rollout time (sparse reverse KL on student top-k)
    mc_samples: int = 0  # M i.i.d. samples per position drawn at rollout time (multi-sample MC)
    renormalize: bool = False  # forward KL: renormalise teacher mass over the top-k
    tail_bucket: bool = False  # forward KL: one extra bucket for the teacher mass outside the top-k
    recompute: bool = False  # sampled reverse KL: baseline log pi_b = sg[log pi_theta] (learner time)
    importance_ratio: bool = True  # multiply by pi_theta / pi_old
    clip_eps: float = 0.2  # PPO clip
    tis_cap: float = 2.0  # truncated importance sampling cap
    behave_cap: float = 5.0  # decoupled PPO: cap on pi_prox / pi_old
    m2po_budget: float = 0.01  # M2PO second-moment budget
    gkd_beta: float = 0.5  # generalised JSD interpolation (0 forward, 1 reverse)
    chunk_tokens: int = 1024  # tokens per full-vocabulary log-softmax chunk
