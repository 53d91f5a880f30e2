"""Stopping a run the way a terminal, SLURM and `torchrun` stop it: a signal to the whole process group (or job step),
data loader workers included, must finish the step, save the checkpoint set and exit 0; `--checkpoint latest`
continues from it; and `scripts/slurm_train.sh` requeues a job told of its time limit, which then resumes.

Every run is `stereo-kit train` (or `scripts/train.py` under a launcher) on the tiny model and rendered synthetic
data at 96×64, started in a new session (as `setsid` does), so that `os.killpg` reaches exactly the run's processes.
A run is signalled once its pictures of step 2 are on disk (`--vis_every 1`). Each run takes 5-20 s on a busy
2-core machine: they are marked slow."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stereo_kit.models import load_weights
from stereo_kit.train.checkpoint import Workspace, latest_step, load_training_state

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}, "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
CONFIG = {"model": {"preset": "tiny", "max_disp": 64, "train_iters": 2, "valid_iters": 2},
          "data": {"datasets": [{"name": "synthetic", "format": "synthetic",
                                 "options": {"size": [128, 96], "max_disparity": 40}}],
                   "image_sizes": [[96, 64]], "max_disparity": 64, "index_cache": None},
          "eval": {"datasets": []}}
FLAGS = ["--batch_size_forward", "2", "--enable_mlflow", "false", "--enable_gradient_checkpointing", "false",
         "--log_every", "1000", "--vis_every", "1"]


def write_config(folder: Path, workers: int, worker_type: str = "process") -> Path:
    config = json.loads(json.dumps(CONFIG))
    config["data"].update(num_workers=workers, worker_type=worker_type)
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def train_args(config: Path, workspace: Path, num_iterations: int = 1000, save_every: int = 0, **extra) -> list[str]:
    args = ["--config", str(config), "--workspace", str(workspace), "--num_iterations", str(num_iterations),
            "--save_every", str(save_every), *FLAGS]
    for name, value in extra.items(): args += [f"--{name}", str(value)]
    return args


class Run:
    "A command started in its own session (process group), its output in files."
    def __init__(self, command: list[str], folder: Path, env: dict | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.out, self.err = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT, env=env or ENV,
                                            start_new_session=True)
        self.group = self.process.pid                  # a new session's leader: its pid is the group's id

    def output(self) -> str: return self.out.read_text() + self.err.read_text()

    def wait_for_step(self, workspace: Path, step: int, timeout: float = 240):
        "Wait until the run has written the pictures of `step` (it has finished that step)."
        deadline = time.monotonic() + timeout
        while progress(workspace) < step:
            assert self.process.poll() is None, f"the run ended (exit code {self.process.returncode}):\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no step {step} after {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def signal_group(self, number: signal.Signals): os.killpg(self.group, number)

    def wait(self, timeout: float = 180) -> int:
        try: return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout} s after the signal:\n{self.output()[-3000:]}")

    def kill(self):
        try: os.killpg(self.group, signal.SIGKILL)
        except ProcessLookupError: pass
        self.process.wait(30)


def progress(workspace: Path) -> int:
    "The last step whose pictures are written (`--vis_every 1`), 0 before the first."
    folder = workspace / "vis"
    return max((int(p.name) for p in folder.iterdir() if p.name.isdigit()), default=0) if folder.is_dir() else 0


def live_members(group: int) -> list[int]:
    "Processes of process group `group` that are still running (zombies waiting for a reaper do not count)."
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try: fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError): continue
        if int(fields[2]) == group and fields[0] != "Z": members.append(int(stat.parent.name))
    return members


def assert_group_ends(group: int, timeout: float = 30):
    "Every process of the group (the data loader's workers too) ends soon after the run."
    deadline = time.monotonic() + timeout
    while live_members(group):
        assert time.monotonic() < deadline, f"processes of the run still alive: {live_members(group)}"
        time.sleep(0.1)


def saved_step(output: str, stop_signal: signal.Signals) -> int:
    found = re.findall(rf"{stop_signal.name}: saving step (\d+) and stopping", output)
    assert len(found) == 1, output[-3000:]
    return int(found[0])


def assert_checkpoint_set(workspace: Workspace, step: int, world_size: int = 1):
    "The checkpoint set of `step` is the only one, complete and loadable, and `latest` points at it."
    assert workspace.complete_steps() == [step] and latest_step(workspace) == step
    assert sorted(p.name for p in workspace.checkpoints.iterdir()) == sorted(
        [f"{step:08d}{suffix}" for suffix in (".pt", ".json", "_ema.pt", "_ema.json", "_optimizer.pt")] + ["latest.pt"])
    assert set(load_weights(workspace.weights(step)).state_dict()) == set(load_weights(workspace.ema(step)).state_dict())
    state = load_training_state(workspace, step)
    assert state["step"] == step and state["data_step"] == step and state["world_size"] == world_size


def optimizer_steps(workspace: Workspace, step: int) -> int:
    "AdamW's own count of the steps it took, which a resumed run carries on and a fresh run restarts."
    return int(load_training_state(workspace, step)["optimizer"]["state"][0]["step"])


# ------------------------------------------------------------------------ one process: stereo-kit train, setsid
CASES = [  # (workers, worker type, signal)
    (0, "process", signal.SIGTERM), (1, "process", signal.SIGTERM), (2, "process", signal.SIGTERM),
    (2, "thread", signal.SIGTERM), (1, "process", signal.SIGINT), (2, "thread", signal.SIGINT)]


@pytest.mark.slow
@pytest.mark.parametrize("workers, worker_type, stop_signal", CASES,
                         ids=[f"{w} {kind} workers, {s.name}" for w, kind, s in CASES])
def test_group_signal_saves_the_step_and_exits_cleanly(tmp_path, workers, worker_type, stop_signal):
    config, workspace = write_config(tmp_path, workers, worker_type), Workspace(tmp_path / "run")
    run = Run(["stereo-kit", "train", *train_args(config, workspace.root)], tmp_path / "logs")
    try:
        run.wait_for_step(workspace.root, 2)
        run.signal_group(stop_signal)                  # the main process and every worker process at once
        assert run.wait() == 0, run.output()[-3000:]
    finally:
        run.kill()
    output = run.output()
    assert "Traceback" not in output and "killed by signal" not in output, output[-3000:]
    step = saved_step(output, stop_signal)
    assert step >= 2
    assert_checkpoint_set(workspace, step)
    assert_group_ends(run.group)
    if (workers, worker_type, stop_signal) != (2, "process", signal.SIGTERM): return
    # the run continues from the checkpoint: AdamW's step count goes on from the saved one
    resumed = subprocess.run(["stereo-kit", "train", *train_args(config, workspace.root, step + 1, checkpoint="latest")],
                             capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert latest_step(workspace) == step + 1 and optimizer_steps(workspace, step + 1) == step + 1


HOLD_AT_EXIT = """
from stereo_kit.data.loader import build_dataloader
config = {"datasets": [{"name": "s", "format": "synthetic", "options": {"size": [128, 96]}}], "image_sizes": [[96, 64]],
          "max_disparity": 64, "index_cache": None}
stream = iter(build_dataloader(config, batch_size=2, seed=0, num_workers=2))
for _ in range(2): next(stream)
print("took 2 batches", flush=True)
"""


def test_workers_still_end_when_the_process_exits_holding_the_stream():
    "At exit multiprocessing ends the workers with SIGTERM from their parent: that one they obey (or exit would hang)."
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", HOLD_AT_EXIT], capture_output=True, text=True, cwd=ROOT, env=ENV,
                            timeout=120, start_new_session=True)
    assert result.returncode == 0 and result.stdout == "took 2 batches\n", result.stderr[-3000:]
    assert time.perf_counter() - started < 60


def test_a_repeated_sigint_within_a_second_is_one_request():
    "A launcher forwards the SIGINT its workers got already (SLURM signals them all): that must not stop at once."
    from stereo_kit.train.trainer import StopRequest
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGINT"
        time.sleep(StopRequest.REPEAT_SECONDS + 0.1)
        with pytest.raises(KeyboardInterrupt): os.kill(os.getpid(), signal.SIGINT)     # asked again: stop now
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------ two processes under torchrun (gloo on CPU)
# torchrun starts each worker in its own session and forwards the signal it gets to each worker's group; it then
# exits with status 1 itself (torch's SignalException), whatever the workers did. So each worker runs inside a small
# bash wrapper that writes the worker's exit status to a file: the status this test checks.
RECORD_EXIT = 'trap : INT TERM; python scripts/train.py "$@"; echo $? > "$EXITS/$RANK"'


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal, worker_type", [(signal.SIGTERM, "process"), (signal.SIGINT, "thread")],
                         ids=["SIGTERM, process workers", "SIGINT, thread workers"])
def test_group_signal_under_torchrun_saves_once_and_every_rank_exits_cleanly(tmp_path, stop_signal, worker_type):
    config, workspace = write_config(tmp_path, 1, worker_type), Workspace(tmp_path / "run")
    exits = tmp_path / "exits"
    exits.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
               "bash", "-c", RECORD_EXIT, "train", *train_args(config, workspace.root)]
    run = Run(command, tmp_path / "logs", env={**ENV, "ACCELERATE_USE_CPU": "true", "EXITS": str(exits)})
    try:
        run.wait_for_step(workspace.root, 2)
        run.signal_group(stop_signal)                  # torchrun, which passes it on to both ranks' groups
        run.wait()
    finally:
        run.kill()
    output = run.output()
    assert {p.name: p.read_text().strip() for p in exits.iterdir()} == {"0": "0", "1": "0"}, output[-3000:]
    # the one traceback is torchrun's own SignalException; no worker had to be killed
    assert output.count("Traceback") == output.count("SignalException: Process"), output[-3000:]
    assert "forcefully exiting" not in output, output[-3000:]
    step = saved_step(output, stop_signal)             # printed once, by the main process
    assert_checkpoint_set(workspace, step, world_size=2)


# ----------------------------------------------------------------------------------- scripts/slurm_train.sh
def stand_ins(folder: Path, accelerate: str) -> Path:
    "A bin folder with stand-ins for srun, scontrol and accelerate."
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    bodies = {"srun": 'exec "$@"',
              "scontrol": f'if [ "$1" = show ]; then printf "node-a\\nnode-b\\n"; else echo "$@" >> {folder}/scontrol.log; fi',
              "accelerate": accelerate}
    for name, body in bodies.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def slurm_env(bin_dir: Path, **extra) -> dict:
    return {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]",
            "SLURM_NNODES": "2", "SLURM_NODEID": "0", "GPUS_PER_NODE": "1", **extra}


def test_slurm_script_gives_each_node_its_own_machine_rank(tmp_path):
    "srun runs the launch once per node, and each node must expand its own SLURM_NODEID, not the batch node's."
    bin_dir = stand_ins(tmp_path, f'printf "%s\\n" "$@" > {tmp_path}/accelerate_args_$SLURM_NODEID')
    (bin_dir / "srun").write_text('#!/bin/bash\nfor node in 0 1; do SLURM_NODEID=$node "$@" || exit; done\n')
    result = subprocess.run(["bash", "scripts/slurm_train.sh", "--num_iterations", "600"], capture_output=True, text=True,
                            cwd=ROOT, env=slurm_env(bin_dir, CONFIG="configs/train/quickstart.json"), timeout=30)
    assert result.returncode == 0, result.stderr
    for node in (0, 1):
        args = (tmp_path / f"accelerate_args_{node}").read_text().split()
        value = lambda flag: args[args.index(flag) + 1]
        assert (value("--machine_rank"), value("--num_machines"), value("--num_processes")) == (str(node), "2", "2")
        assert value("--main_process_ip") == "node-a" and value("--checkpoint") == "latest"
        assert args[args.index("scripts/train.py") + 1:][-2:] == ["--num_iterations", "600"]
    assert not (tmp_path / "scontrol.log").exists()                 # a run that ended by itself is not requeued


@pytest.mark.slow
def test_slurm_time_limit_saves_requeues_and_the_next_start_resumes(tmp_path):
    # the launcher stand-in runs scripts/train.py in one process (the launch flags are checked above)
    bin_dir = stand_ins(tmp_path, f'while [ "$1" != scripts/train.py ]; do shift; done\nexec {sys.executable} "$@"')
    config, workspace = write_config(tmp_path, 1), Workspace(tmp_path / "run")
    env = slurm_env(bin_dir, CONFIG=str(config), WORKSPACE=str(workspace.root))
    flags = ["--enable_mixed_precision", "false", "--save_every", "0", *FLAGS]       # fp16 needs a GPU
    first = Run(["bash", "scripts/slurm_train.sh", "--num_iterations", "1000", *flags], tmp_path / "first", env)
    try:
        first.wait_for_step(workspace.root, 2)
        os.kill(first.process.pid, signal.SIGUSR1)     # --signal=B:USR1@300: SLURM tells the batch script alone
        assert first.wait() == 0, first.output()[-3000:]
    finally:
        first.kill()
    step = saved_step(first.output(), signal.SIGTERM)
    assert_checkpoint_set(workspace, step)
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4242"]
    assert f"requeueing job 4242 to continue from the latest checkpoint in {workspace.root}" in first.output()

    # SLURM starts the requeued job with the same script: --checkpoint latest continues from the saved step
    second = subprocess.run(["bash", "scripts/slurm_train.sh", "--num_iterations", str(step + 2), *flags],
                            capture_output=True, text=True, cwd=ROOT, env={**env, "SLURM_RESTART_COUNT": "1"}, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert latest_step(workspace) == step + 2 and optimizer_steps(workspace, step + 2) == step + 2
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4242"]    # finished: not requeued again
