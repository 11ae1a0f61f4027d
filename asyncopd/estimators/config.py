from dataclasses import dataclass


@dataclass
class EstimatorConfig:
    """Which OPD loss the learner uses, and the knobs of every family.

    Every estimator reads only the knobs of its own family; `requirements(cfg)` validates them.
    Names: forward_kl, sparse_rkl, sampled_rkl, mc_rkl, ppo_clip, tis, decoupled_ppo, m2po, gkd.
    """

    name: str = "forward_kl"
    # Teacher score cache size K (forward_kl, gkd, sparse_rkl with sparse_support=teacher). The
    # estimator uses the first top_k columns of the cache, so one cache can serve smaller K.
    top_k: int = 8
    # sparse_rkl: which support the sparse reverse KL sums over: "teacher" (the teacher's top-k) or
    # "student" (the student's top-k frozen at rollout time; the teacher scores those ids).
    sparse_support: str = "teacher"
    student_top_k: int = 0  # student support size K_S frozen at rollout time (sparse_support=student)
    mc_samples: int = 0  # M i.i.d. samples per position drawn at rollout time (mc_rkl; >= 2)
    # forward_kl and gkd: how the teacher's top-k cache stands in for the whole teacher distribution.
    renormalize: bool = False  # teacher top-k mass renormalised to 1 (the teacher is taken as zero elsewhere)
    tail_bucket: bool = False  # one extra outcome holds the mass outside the top-k (both distributions)
    # Sampled family (sampled_rkl, ppo_clip, tis, decoupled_ppo, m2po): advantage baseline
    # log pi_b; False = log pi_old (stale signal), True = sg[log pi_theta] (recompute at learner time).
    recompute: bool = False
    # sampled_rkl and mc_rkl: multiply by pi_theta / pi_old (False = plain policy gradient, which is
    # only unbiased on-policy). The stabilisers always use a ratio; they reject False.
    importance_ratio: bool = True
    clip_eps: float = 0.2  # PPO clip (ppo_clip, decoupled_ppo)
    tis_cap: float = 2.0  # truncated importance sampling cap C in min(pi_theta / pi_old, C)
    behave_cap: float = 5.0  # decoupled PPO: cap on the behaviour weight pi_prox / pi_old
    behave_cap_mode: str = "mask"  # decoupled PPO: "mask" tokens above the cap (AReaL) or "clip" the weight
    m2po_budget: float = 0.01  # M2PO second-moment budget on (log pi_theta - log pi_old)^2, harmful tokens
    gkd_beta: float = 0.5  # generalised JSD interpolation (0 forward KL, 1 reverse KL)
    chunk_tokens: int = 1024  # tokens per full-vocabulary log-softmax chunk (forward and backward)
