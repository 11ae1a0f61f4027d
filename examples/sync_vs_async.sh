#!/usr/bin/env bash
# Same data, same learner steps: strict synchronous OPD vs bounded staleness k=2.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/asyncopd prepare
for k in 0 2; do
  .venv/bin/asyncopd train pipeline.steps=150 pipeline.max_staleness=$k run.dir=runs/examples/k$k
done
python3 - <<'PY'
import json
for k in (0, 2):
    s = json.load(open(f"runs/examples/k{k}/summary.json"))
    print(f"k={k}: {s['samples_per_s']:.1f} samples/s, accuracy {s['initial_accuracy']:.3f} -> {s['final_accuracy']:.3f}")
PY
