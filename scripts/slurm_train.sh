#!/bin/bash
# Multi-node training under SLURM: one `accelerate launch` per node, 8 GPUs each. Submit with `sbatch scripts/slurm_train.sh`;
# another config or workspace: `CONFIG=configs/train/quickstart.json WORKSPACE=workspace/quickstart sbatch scripts/slurm_train.sh`;
# arguments after the script name are passed to scripts/train.py (e.g. `--num_iterations 20000`).
# Time limit: --signal=B:USR1@300 tells this script five minutes before the limit. It passes SIGTERM to the training
# (srun forwards it to every node's launcher, which forwards it to its workers), which finishes the step, saves a
# checkpoint and exits cleanly; then the script requeues the job (--requeue allows it), and `--checkpoint latest` makes
# the next start continue from that checkpoint (or start from scratch, the first time). A preemption's SIGTERM reaches
# every process of the job: the training saves the same way, and SLURM requeues the job itself.
# A scancel (SIGTERM without the USR1 first) also saves, but does not requeue.
#SBATCH --job-name=stereo_v1
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -euo pipefail
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export CONFIG=${CONFIG:-configs/train/stereo_v1.json}
export WORKSPACE=${WORKSPACE:-workspace/stereo_v1}
# how long a launcher waits for its workers to save before it kills them (torch's default, 30 s, is short for a
# large model on a shared file system); below the 300 s warning above
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}
export MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

requeue=false
training=
trap 'requeue=true; [ -n "$training" ] && kill -TERM "$training" 2>/dev/null || true' USR1

# single quotes: each node's task expands its own $SLURM_NODEID (this script runs on the first node only)
srun bash -c 'exec accelerate launch --multi_gpu --num_machines "$SLURM_NNODES" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN" --main_process_port 29500 \
    scripts/train.py --config "$CONFIG" --workspace "$WORKSPACE" \
    --enable_mixed_precision true --checkpoint latest "$@"' train "$@" &
training=$!
status=0
wait "$training" || status=$?
while kill -0 "$training" 2>/dev/null; do      # `wait` returns early when USR1 arrives: wait for the save to end
    status=0
    wait "$training" || status=$?
done

if [ "$requeue" = true ]; then
    # the launcher itself exits non-zero when signalled, even though every worker saved and exited cleanly
    echo "slurm_train.sh: stopped (exit status $status) before the time limit; requeueing job $SLURM_JOB_ID to continue from the latest checkpoint in $WORKSPACE"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
