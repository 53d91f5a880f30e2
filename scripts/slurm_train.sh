#!/bin/bash
# Multi-node training under SLURM: one `accelerate launch` per node, 8 GPUs each. Submit with `sbatch scripts/slurm_train.sh`;
# another config or workspace: `CONFIG=configs/train/quickstart.json WORKSPACE=workspace/quickstart sbatch scripts/slurm_train.sh`;
# arguments after the script name are passed to scripts/train.py (e.g. `--num_iterations 20000`).
# --signal=TERM@300 asks SLURM for SIGTERM five minutes before the time limit: the trainer then saves a checkpoint
# and exits cleanly, and `--checkpoint latest` makes the re-queued job continue from it (or start, the first time).
#SBATCH --job-name=stereo_v1
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CONFIG=${CONFIG:-configs/train/stereo_v1.json}
WORKSPACE=${WORKSPACE:-workspace/stereo_v1}
MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun accelerate launch --multi_gpu --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN" --main_process_port 29500 \
    scripts/train.py --config "$CONFIG" --workspace "$WORKSPACE" \
    --enable_mixed_precision true --checkpoint latest "$@"
