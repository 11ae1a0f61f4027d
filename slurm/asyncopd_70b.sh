#!/bin/bash
# Flagship run: async OPD of a 70B student on a multi-node Slurm allocation.
# Node 0 hosts the Ray head; every node joins as a Ray worker with its GPUs. The learner (megatron-core,
# TP=8 x PP=4, FP8), the SGLang rollout fleet and the teacher replicas are Ray actors placed by AsyncOPD.
#   sbatch slurm/asyncopd_70b.sh                               # experiment=llama_70b
#   sbatch slurm/asyncopd_70b.sh pipeline.max_staleness=2 estimator=mc_rkl
#   sbatch --nodes=2 slurm/asyncopd_70b.sh experiment=cluster_tiny   # the rehearsal (slurm/local_cluster.sh)
# The same script runs unchanged in the rehearsal: the allocation (nodes, GPUs per node) is read from Slurm and
# checked by `asyncopd validate` before Ray starts; a config that cannot fit exits 2 with the reason.
# Environment: ASYNCOPD_REPO (default: the submit dir), ASYNCOPD_VENV (REPO/.venv), ASYNCOPD_RUN_DIR
# (REPO/runs/<experiment>-<job id>), RAY_PORT (default: a port free on the head node).
#SBATCH --job-name=asyncopd-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
# 8 x H200 (141 GB) per node: the bf16 405B teacher needs 94.5 GiB per GPU at TP=8, more than an H100 holds
# (configs/experiment/llama_70b.yaml); the GRES type name ("h200") is the site's
#SBATCH --gpus-per-node=h200:8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

REPO=${ASYNCOPD_REPO:-$SLURM_SUBMIT_DIR}
VENV=${ASYNCOPD_VENV:-$REPO/.venv}
experiment=llama_70b
for arg in "$@"; do
  case "$arg" in experiment=*) experiment=${arg#experiment=} ;; esac
done
RUN_DIR=${ASYNCOPD_RUN_DIR:-$REPO/runs/$experiment-$SLURM_JOB_ID}
mkdir -p "$RUN_DIR"
source "$VENV/bin/activate"   # built once with: pip install -c constraints.txt -e '.[gpu]'

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
gpus=${SLURM_GPUS_ON_NODE:-0}
cpus=${SLURM_CPUS_ON_NODE:-1}
run=(experiment="$experiment" cluster=slurm cluster.nodes="${#nodes[@]}" cluster.gpus_per_node="$gpus"
     run.dir="$RUN_DIR")
for arg in "$@"; do
  case "$arg" in experiment=*) ;; *) run+=("$arg") ;; esac
done

# 1. Will it run on this allocation? Before any Ray process starts.
if ! asyncopd validate "${run[@]}"; then
  echo "asyncopd_70b.sh: asyncopd validate refused the config for this allocation (above); nothing was started" >&2
  exit 2
fi

# 2. The run's environment, exported before the raylets start: actors inherit the raylet's environment.
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
if [ "$gpus" != 0 ]; then  # NCCL across nodes: the InfiniBand HCAs; the weight broadcast has a group of its own
  export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-ib0}
fi
api_key=$(python -c 'import secrets; print(secrets.token_hex(16))')  # the servers answer only this run

# 3. Ray: a port and a temp dir of this job's own, the head first, then a worker per node; readiness polled.
head_ip=$(srun --overlap --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
# a port free on the head now (job ids repeat across clusters and restarts: no port derived from them)
RAY_PORT=${RAY_PORT:-$(srun --overlap --nodes=1 --ntasks=1 -w "$head" \
  python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
export RAY_ADDRESS="$head_ip:$RAY_PORT"
temp_dir=/tmp/ray-$SLURM_JOB_ID-$$   # short (Ray's socket paths stay under 108 bytes), unique on this machine
srun --overlap --nodes=1 --ntasks=1 -w "$head" \
  ray start --head --node-ip-address="$head_ip" --port="$RAY_PORT" --num-gpus="$gpus" --num-cpus="$cpus" \
  --resources="{\"asyncopd_node_$head\": 1}" --temp-dir="$temp_dir" --include-dashboard=false --block &
wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq $((seconds * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "asyncopd_70b.sh: $what not ready after ${seconds} s" >&2
  exit 1
}
wait_for 120 "the Ray head at $RAY_ADDRESS" python -c "import socket; socket.create_connection(('$head_ip', $RAY_PORT), 2)"
for node in "${nodes[@]:1}"; do
  srun --overlap --nodes=1 --ntasks=1 -w "$node" \
    ray start --address="$RAY_ADDRESS" --num-gpus="$gpus" --num-cpus="$cpus" \
    --resources="{\"asyncopd_node_$node\": 1}" --block &
done
wait_for 300 "${#nodes[@]} Ray nodes" python -c "
import ray, sys
ray.init(address='$RAY_ADDRESS', logging_level='ERROR', log_to_driver=False)
sys.exit(sum(n['Alive'] for n in ray.nodes()) < ${#nodes[@]})"

# 4. Train. Servers listen on their node's address (clients get node-IP URLs) behind the API key; the weight
# group meets on the node of the learner's rank 0 (weights.master_addr=""). A requeued job resumes itself.
# SIGTERM to this script (`scancel --batch --signal=TERM <job>`, or Slurm before the time limit with
# `sbatch --signal=B:TERM@<s>`, s covering a step plus a checkpoint: minutes for a 70B with its optimizer state)
# goes to the driver, which finishes its step, checkpoints and exits 0. A plain
# scancel or a preemption signals every process of the job, Ray's workers too: the run then stops where it is, and
# a requeued job resumes from the last periodic checkpoint (run.save_every).
resume=()
if [ -e "$RUN_DIR/checkpoint" ]; then
  resume=(run.resume_from="$RUN_DIR/checkpoint")
fi
asyncopd train "${run[@]}" cluster.ray_address="$RAY_ADDRESS" weights.master_addr= \
  rollout.host=0.0.0.0 teacher.host=0.0.0.0 rollout.api_key="$api_key" teacher.api_key="$api_key" \
  ${resume[@]+"${resume[@]}"} &
driver=$!
trap 'kill -TERM "$driver" 2>/dev/null || true' TERM
status=0
wait "$driver" || status=$?
if [ "$status" -gt 128 ] && kill -0 "$driver" 2>/dev/null; then  # the trap fired: wait for the checkpoint
  status=0
  wait "$driver" || status=$?
fi
exit "$status"
