"""`asyncopd analyze-estimators`: bias and variance of every reverse-KL gradient estimator.

For a set of positions with a teacher p_T and a current student pi_theta (synthetic logits by
default, or the embedded student and teacher checkpoints at the positions of the student's own
samples), and a rollout-time student pi_old at a controlled distance from pi_theta (staleness s:
logits_old = logits_theta + s * noise), each estimator's gradient with respect to the student's
logits is drawn R times independently (one batch of R replicates, run through the library's own
loss and backward) and compared with the exact reverse-KL gradient pi (l - KL), l = log pi_theta -
log p_T:
    bias      = mean over positions of || mean_r g_r - g* ||   (its noise floor ~ sqrt(variance / R))
    variance  = mean over positions of E || g_r - mean g ||^2   (trace of the covariance; one estimate)
as functions of the teacher cache size K (sparse estimators), the sample count M (Monte Carlo)
and the staleness (reported also as the mean KL(pi_old || pi_theta)). Writes DIR/estimators.json
and DIR/estimators.png with --out DIR, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asyncopd.bench.table import format_table as table
from asyncopd.config.schema import EstimatorConfig
from asyncopd.estimators.registry import build
from asyncopd.estimators.synthetic import draw_batch


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=("synthetic", "embedded"), default="synthetic",
                        help="synthetic logits (default) or the embedded student/teacher checkpoints")
    parser.add_argument("--vocab", type=int, default=256, help="synthetic vocabulary size")
    parser.add_argument("--positions", type=int, default=16, help="positions (distribution pairs) averaged over")
    parser.add_argument("--replicates", type=int, default=1000, help="independent estimates R per position")
    parser.add_argument("--k", type=_ints, default=[1, 4, 16, 64], help="cache sizes K (sparse estimators)")
    parser.add_argument("--m", type=_ints, default=[2, 8, 32], help="sample counts M (mc_rkl)")
    parser.add_argument("--staleness", type=_floats, default=[0.0, 0.25, 0.5, 1.0],
                        help="noise scales s: logits_old = logits_theta + s * N(0, 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--quick", action="store_true", help="a small grid (for tests): seconds")
    parser.add_argument("--out", default="", help="directory for estimators.json and estimators.png")
    parser.add_argument("--artifacts-dir", default="", help="embedded: prepared artifacts (default: model config)")
    parser.add_argument("--teacher-path", default="", help="embedded: teacher checkpoint directory")
    parser.add_argument("--student-path", default="", help="embedded: student checkpoint directory")
    parser.add_argument("--prompts", type=int, default=8, help="embedded: student samples to take positions from")


@dataclass
class Spec:
    """One estimator configuration to measure."""

    label: str
    knobs: dict
    K: int = 0
    M: int = 1
    deterministic: bool = False  # no sampling: one replicate is exact
    extra: dict = field(default_factory=dict)


def specs(ks: list[int], ms: list[int], vocab: int) -> list[Spec]:
    out: list[Spec] = []
    for k in sorted({min(k, vocab) for k in ks}):
        out.append(Spec("sparse_rkl[teacher]", dict(name="sparse_rkl", top_k=k), K=k, M=0, deterministic=True))
        out.append(Spec("sparse_rkl[student]", dict(name="sparse_rkl", sparse_support="student", student_top_k=k),
                        K=k, M=0, deterministic=True))
    out += [
        Spec("sampled_rkl[stale]", dict(name="sampled_rkl")),
        Spec("sampled_rkl[recompute]", dict(name="sampled_rkl", recompute=True)),
        Spec("sampled_rkl[recompute,no-IS]", dict(name="sampled_rkl", recompute=True, importance_ratio=False)),
        Spec("ppo_clip", dict(name="ppo_clip")),
        Spec("tis", dict(name="tis")),
        Spec("decoupled_ppo", dict(name="decoupled_ppo")),
        Spec("m2po", dict(name="m2po")),
    ]
    for m in ms:
        if m >= 2:
            out.append(Spec("mc_rkl", dict(name="mc_rkl", mc_samples=m), M=m))
            out.append(Spec("mc_rkl[no-IS]", dict(name="mc_rkl", mc_samples=m, importance_ratio=False), M=m))
    return out


def synthetic_pair(positions: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher logits, student logits) [P, V]: a peaked teacher and a student that partly agrees with it."""
    g = torch.Generator().manual_seed(seed)
    teacher = 2.5 * torch.randn(positions, vocab, generator=g, dtype=torch.float64)
    student = 0.6 * teacher + torch.randn(positions, vocab, generator=g, dtype=torch.float64)
    return teacher, student


def embedded_pair(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student logits at positions of the student's own sampled responses."""
    from asyncopd.config.schema import ModelConfig, TaskConfig
    from asyncopd.data.task import TrainStream
    from asyncopd.data.tokenizer import load_tokenizer
    from asyncopd.model.build import load_model
    from asyncopd.model.paths import resolve_model_paths
    from asyncopd.model.sampler import KVCacheSampler

    mcfg = ModelConfig()
    if args.artifacts_dir:
        mcfg.artifacts_dir = args.artifacts_dir
    mcfg.teacher_path, mcfg.student_path = args.teacher_path, args.student_path
    mcfg.tokenizer_path = args.student_path
    paths = resolve_model_paths(mcfg)
    tok = load_tokenizer(paths.tokenizer)
    student = load_model(paths.student, "model.student_path")
    teacher = load_model(paths.teacher, "model.teacher_path")
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocabulary {student.config.vocab_size} != teacher "
                         f"{teacher.config.vocab_size}: the estimators need one vocabulary")
    problems = TrainStream(TaskConfig(), exclude=[]).take(args.prompts)
    prompts = tok([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    outs = KVCacheSampler(student, tok.eos_token_id, tok.pad_token_id, len(tok)).generate(
        prompts, max_new_tokens=48, temperature=1.0, seed=args.seed)
    t_rows, s_rows = [], []
    with torch.no_grad():
        for prompt, out in zip(prompts, outs, strict=True):
            if not out.output_ids:
                continue
            ids = torch.tensor([prompt + list(out.output_ids)])
            lo, hi = len(prompt) - 1, len(prompt) - 1 + len(out.output_ids)  # logits predicting the response
            t_rows.append(teacher(input_ids=ids).logits[0, lo:hi].double())
            s_rows.append(student(input_ids=ids).logits[0, lo:hi].double())
    t_all, s_all = torch.cat(t_rows), torch.cat(s_rows)
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(t_all.shape[0], generator=g)[: args.positions]
    return t_all[pick], s_all[pick]


def exact_gradient(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """d KL(pi_theta || p_T) / d logits = pi (l - KL), per position."""
    lp, tl = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    pi = lp.exp()
    ell = lp - tl
    return pi * (ell - (pi * ell).sum(-1, keepdim=True))


def gradient_samples(spec: Spec, teacher: torch.Tensor, student: torch.Tensor, old: torch.Tensor,
                     replicates: int, generator: torch.Generator) -> torch.Tensor:
    """[R, P, V] independent estimates of the gradient w.r.t. the student logits at each position.

    All replicates form one batch [R, P, V] run through the estimator's own loss; the loss is a token
    mean, so R * P * grad[r, t] is replicate r's estimate at position t.
    """
    cfg = EstimatorConfig(chunk_tokens=4096, **spec.knobs)
    est = build(cfg)
    req = est.requirements(cfg)
    r = 1 if spec.deterministic else replicates
    p, v = student.shape

    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0).expand(r, p, v)

    batch = draw_batch(rep(teacher), rep(old), req, prox_logits=rep(student), generator=generator)
    x = rep(student).float().contiguous().requires_grad_()  # float32 like a learner; exact is float64
    loss, _ = est.loss(x, batch, cfg)
    loss.backward()
    return x.grad.double() * (r * p)


def measure(spec: Spec, teacher: torch.Tensor, student: torch.Tensor, old: torch.Tensor,
            exact: torch.Tensor, replicates: int, generator: torch.Generator) -> dict:
    g = gradient_samples(spec, teacher, student, old, replicates, generator)
    r = g.shape[0]
    mean = g.mean(0)
    bias = (mean - exact).norm(dim=-1)  # [P]
    var = g.var(0, unbiased=True).sum(-1) if r > 1 else torch.zeros_like(bias)
    norm = exact.norm(dim=-1)
    return {
        "bias": float(bias.mean()), "variance": float(var.mean()),
        "bias_noise_floor": float((var / r).sqrt().mean()),
        "relative_bias": float((bias / norm.clamp_min(1e-30)).mean()),
        "mse": float((bias**2 + var).mean()), "replicates": r,
    }


def analyze(teacher: torch.Tensor, student: torch.Tensor, *, ks: list[int], ms: list[int],
            staleness: list[float], replicates: int, seed: int, progress: bool = True) -> list[dict]:
    """Rows for every (estimator, K, M, staleness) on these [P, V] teacher / student logits."""
    exact = exact_gradient(teacher, student)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(student.shape, generator=g, dtype=student.dtype)
    rows = []
    all_specs = specs(ks, ms, student.shape[-1])
    total = len(all_specs) * len(staleness)
    done = 0
    t0 = time.perf_counter()
    for s in staleness:
        old = student + s * noise
        o_lp, s_lp = torch.log_softmax(old, -1), torch.log_softmax(student, -1)
        kl_old = float((o_lp.exp() * (o_lp - s_lp)).sum(-1).mean())
        for spec in all_specs:
            row = {"estimator": spec.label, "name": spec.knobs["name"], "K": spec.K, "M": spec.M,
                   "staleness": s, "staleness_kl": kl_old,
                   "exact_grad_norm": float(exact.norm(dim=-1).mean())}
            row.update(measure(spec, teacher, student, old, exact, replicates, g))
            rows.append(row)
            done += 1
            if progress:
                print(f"\r  measured {done}/{total} ({time.perf_counter() - t0:.0f} s)", end="", flush=True)
    if progress:
        print()
    return rows


TABLE = [("estimator", "estimator", "s"), ("K", "K", "d"), ("M", "M", "d"), ("staleness", "stale", ".2f"),
         ("staleness_kl", "KL(old|th)", ".4f"), ("bias", "bias", ".3e"), ("bias_noise_floor", "noise flr", ".3e"),
         ("relative_bias", "rel bias", ".3f"), ("variance", "variance", ".3e")]


def format_table(rows: list[dict]) -> str:
    return table(sorted(rows, key=lambda r: (r["estimator"], r["K"], r["M"], r["staleness"])), TABLE)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    stal = sorted({r["staleness"] for r in rows})
    colors = plt.cm.viridis([i / max(len(stal) - 1, 1) for i in range(len(stal))])

    def series(label: str, x: str, y: str, **match) -> list[tuple[float, float]]:
        return sorted((r[x], r[y]) for r in rows
                      if r["estimator"] == label and all(r[k] == v for k, v in match.items()))

    ax = axes[0, 0]  # sparse: bias vs K
    for label, style in (("sparse_rkl[teacher]", "-o"), ("sparse_rkl[student]", "--s")):
        for s, c in zip(stal, colors, strict=True):
            pts = series(label, "K", "relative_bias", staleness=s)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=c, label=f"{label} s={s:g}")
    ks = sorted({r["K"] for r in rows if r["K"]})
    ax.set(xscale="log", xlabel="cache size K", ylabel="relative bias |E g - g*| / |g*|",
           title="sparse reverse KL (deterministic): truncation bias vs K")
    if ks:
        ax.set_xticks(ks, [str(k) for k in ks])
    ax.legend(fontsize=7)

    ax = axes[0, 1]  # Monte Carlo: variance vs M
    for s, c in zip(stal, colors, strict=True):
        pts = series("sampled_rkl[recompute]", "M", "variance", staleness=s) + series("mc_rkl", "M", "variance",
                                                                                       staleness=s)
        if pts:
            ax.plot(*zip(*sorted(pts), strict=True), "-o", color=c, label=f"mc_rkl s={s:g}")
    ms = sorted({r["M"] for r in rows if r["name"] in ("mc_rkl", "sampled_rkl")})
    ax.set(xscale="log", yscale="log", xlabel="samples per position M (M=1: sampled_rkl[recompute])",
           ylabel="variance of one estimate (trace of covariance)", title="multi-sample MC: variance ~ 1/M")
    if ms:
        ax.set_xticks(ms, [str(m) for m in ms])
    ax.legend(fontsize=7)

    labels = ["sampled_rkl[stale]", "sampled_rkl[recompute]", "sampled_rkl[recompute,no-IS]", "ppo_clip", "tis",
              "decoupled_ppo", "m2po", "mc_rkl", "mc_rkl[no-IS]"]
    m_max = max([r["M"] for r in rows if r["name"] == "mc_rkl"], default=1)
    for ax, y, title, ylabel in (
        (axes[1, 0], "z", "bias in units of its noise floor (unbiased: about 1)", "bias / noise floor"),
        (axes[1, 1], "mse", "mean squared error of one estimate", "bias^2 + variance"),
    ):
        for label in labels:
            match = {"M": m_max} if label.startswith("mc_rkl") else {}
            pts = [(r["staleness_kl"], r["bias"] / max(r["bias_noise_floor"], 1e-30) if y == "z" else r[y])
                   for r in rows if r["estimator"] == label and all(r[k] == v for k, v in match.items())]
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), "-o",
                        label=label + (f" M={m_max}" if label.startswith("mc_rkl") else ""))
        if y == "z":
            ax.axhline(1.0, color="gray", ls=":")
        ax.set(yscale="log", xlabel="staleness KL(pi_old || pi_theta) (mean over positions)", ylabel=ylabel,
               title=title)
        ax.legend(fontsize=7)
    fig.suptitle("reverse-KL gradient estimators vs the exact gradient (per-position logits)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ks, ms, stal, reps, positions, vocab = args.k, args.m, args.staleness, args.replicates, args.positions, args.vocab
    if args.quick:
        ks, ms, stal, reps, positions, vocab = [1, 8], [2, 8], [0.0, 1.0], 200, 4, min(vocab, 64)
    if reps < 2:
        raise ValueError(f"--replicates={reps}: need at least 2 to estimate a variance")
    t0 = time.perf_counter()
    if args.source == "synthetic":
        teacher, student = synthetic_pair(positions, vocab, args.seed)
    else:
        teacher, student = embedded_pair(argparse.Namespace(**{**vars(args), "positions": positions}))
    print(f"analyze-estimators: {args.source} source, {teacher.shape[0]} positions, V={teacher.shape[1]}, "
          f"R={reps} replicates, K={ks}, M={ms}, staleness={stal}")
    rows = analyze(teacher, student, ks=ks, ms=ms, staleness=stal, replicates=reps, seed=args.seed)
    for row in rows:
        row.update(source=args.source, positions=int(teacher.shape[0]), vocab=int(teacher.shape[1]))
    print(format_table(rows))
    print(f"({time.perf_counter() - t0:.1f} s; bias is |mean estimate - exact gradient| averaged over positions, "
          f"'noise flr' the value an unbiased estimator shows from R replicates)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "estimators.json").write_text(json.dumps(rows, indent=2))
        plot(rows, out / "estimators.png")
        print(f"wrote {out / 'estimators.json'} and {out / 'estimators.png'}")
    return rows
