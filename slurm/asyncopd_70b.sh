#!/bin/bash
# Flagship run: async OPD of a 70B student on a multi-node Slurm allocation.
# Node 0 hosts the Ray head; every node joins as a Ray worker with its 8 GPUs. The learner (megatron-core,
# TP=8 x PP=4, FP8), the SGLang rollout fleet and the teacher replicas are Ray actors placed by AsyncOPD.
#   sbatch slurm/asyncopd_70b.sh                      # defaults: experiment=llama_70b
#   sbatch slurm/asyncopd_70b.sh pipeline.max_staleness=2 estimator=mc_rkl
#SBATCH --job-name=asyncopd-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

REPO=${ASYNCOPD_REPO:-$SLURM_SUBMIT_DIR}
VENV=${ASYNCOPD_VENV:-$REPO/.venv}
RUN_DIR=${ASYNCOPD_RUN_DIR:-$REPO/runs/llama_70b-$SLURM_JOB_ID}
RAY_PORT=${RAY_PORT:-6379}
mkdir -p "$RUN_DIR"
source "$VENV/bin/activate"   # built once with: pip install -c constraints.txt -e '.[gpu]'

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
export RAY_ADDRESS="$head_ip:$RAY_PORT" RAY_USAGE_STATS_ENABLED=0

srun --nodes=1 --ntasks=1 -w "$head" \
  ray start --head --node-ip-address="$head_ip" --port="$RAY_PORT" --num-gpus=8 \
  --temp-dir="/tmp/ray-$SLURM_JOB_ID" --block &
sleep 20
for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" \
    ray start --address="$RAY_ADDRESS" --num-gpus=8 --temp-dir="/tmp/ray-$SLURM_JOB_ID" --block &
done
sleep 30
ray status

# NCCL across nodes: pick the InfiniBand HCAs; weight broadcast runs on a group of its own.
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-ib0}

asyncopd train experiment=llama_70b cluster=slurm run.dir="$RUN_DIR" \
  weights.master_addr="$head_ip" "$@"
