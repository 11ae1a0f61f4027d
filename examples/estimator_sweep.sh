#!/usr/bin/env bash
# Every estimator on the same budget (async, k=2); prints accuracy before -> after for each.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/asyncopd prepare
for est in forward_kl gkd sparse_rkl sampled_rkl mc_rkl ppo_clip tis decoupled_ppo m2po; do
  .venv/bin/asyncopd train estimator=$est pipeline.steps=100 run.progress=false run.dir=runs/examples/$est \
    | grep -E "estimator|initial_accuracy|final_accuracy"
done
