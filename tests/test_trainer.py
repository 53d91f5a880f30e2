"""The trainer as a user drives it: exact resume, kills and signals during a run, a damaged resume pointer, the
non-finite-step guard, fine-tuning from a weights file, the workspace lock, the logged rows and pictures, MLflow.

Every run is tiny (tiny preset, 96×64 crops, batches of 2, a few steps, no eval unless needed). Runs in this process
use one torch thread (restored afterwards), subprocesses get OMP_NUM_THREADS=1: on a busy 2-core machine two
threads per process make each step several times slower. Tests over ~10 s are marked slow."""
from __future__ import annotations

import ast
import copy
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest
import torch

from stereo_kit.config import LossParams
from stereo_kit.data.loader import build_dataloader
from stereo_kit.losses import register_loss
from stereo_kit.models import build_model, load_weights, save_weights
from stereo_kit.train.checkpoint import Workspace, find_checkpoint, latest_step, load_training_state

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_samples"
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
TINY_MODEL = {"preset": "tiny", "max_disp": 64, "train_iters": 2, "valid_iters": 2}
LOSS = {"stereo": {"disparity_l1": {"function": "disparity_l1_loss", "weight": 1.0},
                   "multi_scale": {"function": "multi_scale_loss", "weight": 0.3,
                                   "params": {"weights": [0.5, 0.7, 1.0], "loss_type": "smooth_l1"}}}}
FAST = dict(batch_size_forward=2, enable_gradient_checkpointing=False, enable_mlflow=False, log_every=1)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny_config(scenes=("rendered_planes",), eval_samples: int = 0, loss=None, model=None, train=None, **data) -> dict:
    "A config of the tiny model on data_samples scenes (absolute paths), 96×64 crops, no workers, no eval by default."
    return {"model": {**TINY_MODEL, **(model or {})},
            "data": {"datasets": [{"name": scene, "path": str(SAMPLES / scene)} for scene in scenes],
                     "image_sizes": [[96, 64]], "max_disparity": 64, "num_workers": 0, "index_cache": None, **data},
            "loss": loss or LOSS,
            "eval": {"datasets": [{"name": "planes", "path": str(SAMPLES / "rendered_planes"), "max_samples": 1}]
                     if eval_samples else []},
            "train": train or {}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")      # see conftest.py


def trainer(config, workspace, **options):
    from stereo_kit.train.trainer import Trainer
    return Trainer(config, workspace, **{**FAST, **options})


class Callback:
    "Does nothing; the hooks the trainer calls."
    def on_log(self, trainer, row): pass
    def on_vis(self, trainer, paths): pass
    def on_eval(self, trainer, results): pass


class InterruptAt(Callback):
    "Send SIGINT to this process when the log row of `step` is written: the trainer's StopRequest saves and stops."
    def __init__(self, step: int): self.step = step
    def on_log(self, trainer, row):
        if row["step"] == self.step: os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------------------------------------- helpers
def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(a, b, where: str = ""):
    "Exact equality of nested dicts/lists/tuples of tensors and plain values (tensors by torch.equal)."
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a: assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def state_of(module: torch.nn.Module) -> dict:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def cli_args(config_path: Path, workspace: Path, **options) -> list[str]:
    options = {**FAST, **options}
    args = ["--config", str(config_path), "--workspace", str(workspace)]
    for name, value in options.items():
        args += [f"--{name}", ("true" if value else "false") if isinstance(value, bool) else str(value)]
    return args


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def run_train(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env=SUBPROCESS_ENV, timeout=timeout)


def start_train(args: list[str], log_dir: Path) -> tuple[subprocess.Popen, Path, Path]:
    "Start `scripts/train.py` with stdout and stderr in files (a pipe nobody reads could fill up and block it)."
    log_dir.mkdir(parents=True, exist_ok=True)
    out, err = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], stdout=stdout, stderr=stderr, cwd=ROOT,
                                   env=SUBPROCESS_ENV)
    return process, out, err


def progress(workspace: Workspace) -> int:
    "The last step a run with `--vis_every 1` has finished: its pictures are on disk (0 before the first)."
    folder = workspace.root / "vis"
    return max((int(path.name) for path in folder.iterdir() if path.name.isdigit()), default=0) if folder.is_dir() else 0


def wait_for(condition, process: subprocess.Popen, timeout: float = 180, what: str = ""):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (exit code {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_loadable_checkpoint(workspace: Workspace, step: int):
    "The checkpoint of `step` is complete: weights and EMA rebuild a model, the training state is that step's."
    assert step in workspace.complete_steps()
    reference = load_weights(workspace.weights(step))
    ema = load_weights(workspace.ema(step))
    assert set(reference.state_dict()) == set(ema.state_dict())
    state = load_training_state(workspace, step)
    assert state["step"] == step and state["world_size"] == 1


# ------------------------------------------------------------------------------------------------ 1. exact resume
@pytest.fixture(scope="module", params=[1, 2], ids=["accumulation1", "accumulation2"])
def resume_runs(request, tmp_path_factory):
    "2N steps in one go, and N steps stopped by SIGINT (saved), copied, resumed with 'latest' for N more; N = 2."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp_path, accumulation = tmp_path_factory.mktemp("resume"), request.param
    config, options = tiny_config(), dict(num_iterations=4, gradient_accumulation_steps=accumulation)
    whole = trainer(config, tmp_path / "whole", save_every=2, **options)
    whole.fit()
    first_half = trainer(config, tmp_path / "half", save_every=0, callbacks=[InterruptAt(2)], **options)
    first_half.fit()
    assert first_half.step == 2 and Workspace(tmp_path / "half").complete_steps() == [2]
    shutil.copytree(tmp_path / "half", tmp_path / "resumed")
    resumed = trainer(config, tmp_path / "resumed", save_every=0, checkpoint="latest", **options)
    resumed.fit()
    torch.set_num_threads(threads)
    return accumulation, whole, resumed, Workspace(tmp_path / "whole"), Workspace(tmp_path / "resumed")


def test_resume_is_bit_identical(resume_runs):
    accumulation, whole, resumed, a, b = resume_runs
    assert [row["step"] for row in resumed.history] == [3, 4] and b.complete_steps() == [2, 4]
    for step in (2, 4):
        for name in (a.weights(step).name, a.ema(step).name):           # model and EMA weights, every tensor
            weights = load(a.checkpoints / name)
            assert set(weights) == set(resumed.unwrapped.state_dict())
            assert_identical(weights, load(b.checkpoints / name), name)
        whole_state, resumed_state = load_training_state(a, step), load_training_state(b, step)
        assert whole_state["data_step"] == resumed_state["data_step"] == step * accumulation
        assert whole_state["optimizer"]["state"] and whole_state["ema_updates"] == step
        if step == 4:
            for state in (whole_state, resumed_state): del state["rng"]["torch"]  # see the next test
        for state in (whole_state, resumed_state):                            # wall clock: the one thing that differs
            assert 0 < state.pop("elapsed_seconds") < 600
        assert_identical(whole_state, resumed_state, f"training state of step {step}")  # optimizer, schedule, RNG, ...
    # the logged losses of the resumed steps are those of the uninterrupted run, to the bit
    assert [row["loss/total"] for row in whole.history[2:]] == [row["loss/total"] for row in resumed.history]


def test_resume_restores_the_torch_rng_exactly(resume_runs):
    _, _, _, a, b = resume_runs
    assert torch.equal(load_training_state(a, 4)["rng"]["torch"], load_training_state(b, 4)["rng"]["torch"])


# --------------------------------------------------------------------------------------------- 2. kill -9 in a save
def saving(workspace: Workspace) -> bool:
    "Whether a save is under way: a temporary file of an atomic write is in the checkpoint folder."
    return any(workspace.checkpoints.glob(".*.tmp"))


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_latest_complete(tmp_path):
    """SIGKILL a run saving every step, after its first save, at a random moment (odd rounds) or at a random moment
    inside a save (even rounds: once a temporary file of the next save appears); `latest.pt` always names a complete,
    loadable checkpoint, and `--checkpoint latest` continues, finally to the end."""
    config_path, workspace = write_config(tmp_path, tiny_config()), Workspace(tmp_path / "run")
    total, rng, kills = 16, random.Random(1234), []
    args = cli_args(config_path, workspace.root, num_iterations=total, save_every=1, checkpoint="latest")
    for attempt in range(4):
        before = latest_step(workspace) or 0
        process, _, _ = start_train(args, tmp_path / f"attempt{attempt}")
        try:
            wait_for(lambda: (latest_step(workspace) or 0) > before, process, what="a new checkpoint")
            if attempt % 2 == 0:
                while process.poll() is None and not saving(workspace): time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.05 if attempt % 2 == 0 else 0.5))
            process.kill()
        finally:
            process.kill()
            process.wait(30)
        step = latest_step(workspace)
        newer = [p.name for p in workspace.checkpoints.iterdir() if p.name[:8].isdigit() and int(p.name[:8]) > step]
        kills.append((step, saving(workspace) or bool(newer)))         # (latest step, killed inside a save)
        assert step > before
        assert_loadable_checkpoint(workspace, step)
        if step == total: break
    final = run_train(args)
    assert final.returncode == 0, final.stderr[-2000:]
    assert latest_step(workspace) == total
    assert_loadable_checkpoint(workspace, total)
    assert workspace.complete_steps() == list(range(1, total + 1)), kills
    print("kills (latest step, inside a save):", kills)


def test_save_cut_short_before_the_ema_leaves_no_complete_step(tmp_path):
    from stereo_kit.train.checkpoint import save_checkpoint
    class DiesWhenSaved(torch.nn.Module):                    # stands for a SIGKILL while the EMA is written
        config = {}
        def state_dict(self, *args, **kwargs): raise KeyboardInterrupt("killed")
    workspace, model = Workspace(tmp_path / "run"), build_model(TINY_MODEL)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(workspace, 1, model, {"world_size": 1}, ema_model=DiesWhenSaved())
    assert latest_step(workspace) is None                   # the pointer was never written: fine
    assert workspace.complete_steps() == []                 # but step 1 counts as complete, without its EMA


# --------------------------------------------------------------------------------------------- 3. corrupt latest.pt
@pytest.mark.slow
def test_truncated_latest_gives_one_line_error_and_step_still_resumes(tmp_path):
    config = {**tiny_config(), "lr_scheduler": {"name": "constant"}}    # a schedule a longer run may extend
    trainer(config, tmp_path / "run", num_iterations=2, save_every=1).fit()
    workspace, config_path = Workspace(tmp_path / "run"), write_config(tmp_path, config)
    data = workspace.latest.read_bytes()
    workspace.latest.write_bytes(data[: len(data) // 2])

    failed = subprocess.run(["stereo-kit", "train", *cli_args(config_path, workspace.root, num_iterations=3,
                                                               checkpoint="latest")],
                            capture_output=True, text=True, cwd=ROOT, env=SUBPROCESS_ENV, timeout=300)
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, failed.stderr
    assert str(workspace.latest) in lines[0] and "--checkpoint 2" in lines[0], lines[0]

    resumed = run_train(cli_args(config_path, workspace.root, num_iterations=3, checkpoint="2"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert latest_step(workspace) == 3
    assert_loadable_checkpoint(workspace, 3)


# ------------------------------------------------------------------------------------------- 4. SIGTERM and SIGINT
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_step_and_exits_cleanly(tmp_path, stop_signal):
    config_path, workspace = write_config(tmp_path, tiny_config()), Workspace(tmp_path / "run")
    process, out, err = start_train(cli_args(config_path, workspace.root, num_iterations=1000, save_every=0,
                                             log_every=1000, vis_every=1), tmp_path / "logs")
    try:
        wait_for(lambda: progress(workspace) >= 3, process, what="3 steps")
        process.send_signal(stop_signal)
        assert process.wait(120) == 0, err.read_text()[-2000:]
    finally:
        process.kill()
        process.wait(30)
    reported = progress(workspace)
    message = re.search(rf"{stop_signal.name}: saving step (\d+) and stopping", out.read_text())
    assert message, out.read_text()
    step = int(message.group(1))
    assert 3 <= step < 1000 and step >= reported
    assert workspace.complete_steps() == [step] and latest_step(workspace) == step
    assert_loadable_checkpoint(workspace, step)
    assert load_training_state(workspace, step)["data_step"] == step


# --------------------------------------------------------------------------------------------- 5. non-finite guard
class ProbeParams(LossParams):
    nan_calls: list[int] = []                    # calls (0-based, one per forward pass) that return NaN
    max_disparity: Optional[float] = None        # build_loss passes the data's limit to every term


PROBE = {"calls": 0}


def nan_probe_test_loss(prediction, disparity, valid, *, nan_calls, max_disparity):
    "0 × the final prediction (no effect on training), or NaN on the calls listed in `nan_calls`."
    call, PROBE["calls"] = PROBE["calls"], PROBE["calls"] + 1
    value = prediction[-1].mean() * 0.0
    return value + float("nan") if call in nan_calls else value


@pytest.fixture
def nan_probe():
    "Register the probe loss for one test, then remove it from the registries again (they are global)."
    from stereo_kit.config import LOSS_PARAMS
    from stereo_kit.losses import LOSS_FUNCTIONS
    register_loss("nan_probe_test_loss", ProbeParams)(nan_probe_test_loss)
    yield
    LOSS_PARAMS.pop("nan_probe_test_loss"), LOSS_FUNCTIONS.pop("nan_probe_test_loss")


def probe_config(nan_calls: list[int], max_nonfinite_steps: int = 20) -> dict:
    "A config whose probe term is NaN on the training steps listed (0-based) in `nan_calls`."
    PROBE["calls"] = 0
    nan_calls = [call + 1 for call in nan_calls]          # call 0 is build's check for parameters without gradient
    loss = copy.deepcopy(LOSS)
    loss["stereo"]["probe"] = {"function": "nan_probe_test_loss", "params": {"nan_calls": nan_calls}}
    return tiny_config(loss=loss, train={"max_nonfinite_steps": max_nonfinite_steps})


def test_nonfinite_step_is_skipped_and_changes_nothing(tmp_path, nan_probe):
    run = trainer(probe_config(nan_calls=[1]), tmp_path / "run", num_iterations=10).build()
    batches = iter(build_dataloader(run.config.data, 2, 0, 0))
    assert run.train_step(batches)["applied"]
    weights, ema, optimizer = state_of(run.unwrapped), state_of(run.ema), copy.deepcopy(run.optimizer.state_dict())

    skipped = run.train_step(batches)
    assert not skipped["applied"] and np.isnan(skipped["loss"]) and np.isnan(skipped["terms"]["stereo/probe"])
    assert run.skipped_steps == 1 and run.nonfinite_in_a_row == 1
    assert_identical(state_of(run.unwrapped), weights, "weights")
    assert_identical(state_of(run.ema), ema, "EMA")
    assert_identical(run.optimizer.state_dict()["state"], optimizer["state"], "optimizer state")
    assert all(p.grad is None for p in run.unwrapped.parameters())      # the NaN gradients are gone

    assert run.train_step(batches)["applied"]
    assert run.skipped_steps == 1 and run.nonfinite_in_a_row == 0
    assert any(not torch.equal(value, weights[name]) for name, value in run.unwrapped.state_dict().items())


def test_too_many_nonfinite_steps_in_a_row_raise(tmp_path, nan_probe):
    from stereo_kit.train.trainer import NonFiniteError
    # step 2 alone is non-finite (counted, forgiven), then steps 4, 5, 6 in a row: the limit of 3 stops the run at 6
    run = trainer(probe_config(nan_calls=[1, 3, 4, 5], max_nonfinite_steps=3), tmp_path / "run", num_iterations=10,
                  save_every=0)
    with pytest.raises(NonFiniteError) as raised:
        run.fit()
    message = str(raised.value)
    assert message.startswith("step 6: 3 steps in a row had a non-finite loss or gradient"), message
    assert "stereo/probe" in message and "stereo/disparity_l1" in message and "stereo/multi_scale" in message
    assert run.step == 6 and run.skipped_steps == 4 and run.nonfinite_in_a_row == 3
    assert [row["skipped_steps"] for row in run.history] == [0, 1, 1, 2, 3]           # steps 1-5 were logged
    assert not Workspace(tmp_path / "run").complete_steps()                           # a failed run saves nothing


# ------------------------------------------------------------------------------------------------- 6. fine-tuning
def test_fine_tuning_starts_at_step_0_with_the_weights(tmp_path):
    torch.manual_seed(1234)                                  # other weights than the trainer's initialisation (seed 0)
    source = tmp_path / "pretrained.pt"
    save_weights(source, build_model(TINY_MODEL))
    expected = load(source)

    seen = {}
    run = trainer(tiny_config(), tmp_path / "run", num_iterations=2, save_every=0, checkpoint=str(source))
    def first_step(batches):                                 # what the loop sees before its first step
        seen.setdefault("step", run.step)
        seen.setdefault("weights", state_of(run.unwrapped))
        seen.setdefault("ema", state_of(run.ema.module))
        return type(run).train_step(run, batches)
    run.train_step = first_step
    run.fit()
    assert seen["step"] == 0 and [row["step"] for row in run.history] == [1, 2]
    assert_identical(seen["weights"], dict(expected), "weights at step 0")
    assert_identical(seen["ema"], dict(expected), "EMA at step 0")
    workspace = Workspace(tmp_path / "run")
    assert workspace.complete_steps() == [2]
    state = load_training_state(workspace, 2)
    assert state["ema_updates"] == 2 and state["optimizer"]["state"][0]["step"] == 2      # a new run: fresh optimizer


@pytest.mark.parametrize("file_model, run_model", [
    ({"n_gru_layers": 3, "hidden_dims": [32, 32, 32]}, {}),                       # extra layer: unexpected names
    ({"hidden_dims": [48, 48]}, {"n_gru_layers": 3, "hidden_dims": [32, 32, 32]}),  # fewer, wider: missing names
])
def test_fine_tuning_other_architecture_loads_what_fits(tmp_path, capsys, file_model, run_model):
    torch.manual_seed(1234)
    source = tmp_path / "other.pt"
    save_weights(source, build_model({**TINY_MODEL, **file_model}))
    theirs = load(source)
    run = trainer(tiny_config(model=run_model), tmp_path / "run", checkpoint=str(source)).build()
    initial = state_of(run.unwrapped)
    capsys.readouterr()
    run.resume(find_checkpoint(run.workspace, str(source)))
    report = capsys.readouterr().out.strip()

    ours = run.unwrapped.state_dict()
    fitting = [n for n in theirs if n in ours and ours[n].shape == theirs[n].shape]
    missing = [n for n in ours if n not in theirs]
    unexpected = [n for n in theirs if n not in ours]
    reshaped = [n for n in theirs if n in ours and ours[n].shape != theirs[n].shape]
    assert reshaped and (missing or unexpected)
    assert report.startswith(f"{source}: loaded {len(fitting)} of {len(ours)} weights for fine-tuning"), report
    listed = {label: ast.literal_eval(names) for label, names in re.findall(r"; ([a-z ]+) \([^)]*\): (\[[^\]]*\])", report)}
    assert listed == {label: names for label, names in
                      (("missing", [n for n in ours if n not in fitting]), ("unexpected", unexpected),
                       ("other shape", reshaped)) if names}, report
    assert set(missing) <= set(listed.get("missing", []))
    for name in fitting: assert torch.equal(ours[name], theirs[name]), name
    for name in reshaped + missing: assert torch.equal(ours[name], initial[name]), name     # kept at initialisation
    assert run.step == 0


# ------------------------------------------------------------------------------------------------ 7. workspace lock
@pytest.mark.slow
def test_second_run_in_a_workspace_is_refused(tmp_path):
    config_path, workspace = write_config(tmp_path, tiny_config()), Workspace(tmp_path / "run")
    first, out, err = start_train(cli_args(config_path, workspace.root, num_iterations=1000, save_every=0,
                                           log_every=1000, vis_every=1), tmp_path / "first")
    try:
        wait_for(lambda: progress(workspace) >= 1, first, what="the first run's first step")
        second = run_train(cli_args(config_path, workspace.root, num_iterations=1000, save_every=0))
        assert first.poll() is None, "the first run stopped while the second started"
        assert second.returncode != 0
        assert "Traceback" not in second.stderr
        assert f"{workspace.root / '.lock'}: the workspace is in use by process {first.pid} on " in second.stderr
        first.send_signal(signal.SIGTERM)                    # the first run ends as usual: saved, exit code 0
        assert first.wait(120) == 0, err.read_text()[-2000:]
    finally:
        first.kill()
        first.wait(30)
    step = latest_step(workspace)
    assert workspace.complete_steps() == [step] and step >= 1
    assert_loadable_checkpoint(workspace, step)
    again = run_train(cli_args(config_path, workspace.root, num_iterations=step + 1, checkpoint="latest"))
    assert again.returncode == 0, again.stderr[-2000:]         # the lock went with the first run
    assert latest_step(workspace) == step + 1


# ------------------------------------------------------------------------------------------- 8. log rows, pictures
def test_log_rows_visualisations_and_final_evaluation(tmp_path, capsys):
    run = trainer(tiny_config(eval_samples=1), tmp_path / "run", num_iterations=2, save_every=0, vis_every=2)
    final = run.fit()
    assert [row["step"] for row in run.history] == [1, 2]
    assert final["planes"]["images"] == 1 and final["planes"]["skipped"] == 0 and np.isfinite(final["planes"]["epe"])
    assert run.evaluations == [{"step": 2, **final}]
    printed = capsys.readouterr().out
    assert "step 2 evaluation" in printed and "model (EMA)" in printed
    for row in run.history:
        for key in ("loss/total", "loss/stereo/disparity_l1", "loss/stereo/multi_scale", "grad_norm", "lr/base",
                    "samples_per_second", "data_wait_fraction", "peak_memory_mib", "skipped_steps", "data/bad"):
            assert key in row and np.isfinite(row[key]), key
        total = row["loss/stereo/disparity_l1"] + 0.3 * row["loss/stereo/multi_scale"]
        assert row["loss/total"] == pytest.approx(total, rel=1e-5)
        assert row["grad_norm"] > 0 and row["lr/base"] > 0 and row["samples_per_second"] > 0
        assert 0 <= row["data_wait_fraction"] <= 1 and row["peak_memory_mib"] > 10
        assert row["skipped_steps"] == 0 and row["data/bad"] == 0 and row["data/read"] == 2 * row["step"]

    folder = tmp_path / "run" / "vis" / "00000002"
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png"]
    assert not (tmp_path / "run" / "vis" / "00000001").exists()
    for path in folder.iterdir():
        panel = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert panel.shape == (3 * 64, 2 * 96, 3), panel.shape          # left | right, truth | prediction, error
        tiles = [panel[r * 64:(r + 1) * 64, c * 96:(c + 1) * 96] for r in range(3) for c in range(2)]
        for tile in tiles[:5]: assert tile.std() > 5, path                # five pictures, none blank
        assert not tiles[5].any()                                        # the sixth place is empty


# ------------------------------------------------------------------------------------------------------- 9. MLflow
@pytest.mark.slow
def test_mlflow_logs_and_resumed_run_continues_the_same_run(tmp_path):
    from mlflow.tracking import MlflowClient
    from stereo_kit.train.logging import read_run_record
    workspace = tmp_path / "run"
    first = trainer(tiny_config(), workspace, num_iterations=4, save_every=0, enable_mlflow=True,
                    callbacks=[InterruptAt(2)])
    first.fit()
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace.resolve()}/mlflow.db")
    run_id = read_run_record(workspace)["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.params["world_size"] == "1"
    assert run.data.params["cli.num_iterations"] == "4"
    logged = client.get_metric_history(run_id, "loss/total")
    assert [(m.step, m.value) for m in logged] == [(row["step"], row["loss/total"]) for row in first.history]
    assert [m.step for m in logged] == [1, 2]

    resumed = trainer(tiny_config(), workspace, num_iterations=4, save_every=0, enable_mlflow=True,
                      checkpoint="latest")
    resumed.fit()
    assert read_run_record(workspace)["run_id"] == run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    logged = client.get_metric_history(run_id, "loss/total")
    assert sorted(m.step for m in logged) == [1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_trains_with_the_configured_dtype(tmp_path, dtype):
    "`--enable_mixed_precision true` trains under autocast in train.mixed_precision_dtype; the loss stays float32."
    run = trainer(tiny_config(train={"mixed_precision_dtype": dtype}), tmp_path / "ws", num_iterations=2,
                  enable_mixed_precision=True, save_every=0)
    before = {name: value.clone() for name, value in run.build().unwrapped.state_dict().items()}
    run.fit()
    assert run.accelerator.mixed_precision == dtype
    assert all(math.isfinite(row["loss/total"]) for row in run.history) and run.skipped_steps == 0
    assert any(not torch.equal(before[name], value) for name, value in run.unwrapped.state_dict().items())


def test_parameters_the_loss_never_reaches_are_named_at_build(tmp_path):
    "A loss that skips the initial disparity (multi_scale weights for the last 2 of 3 predictions) leaves its head untrained."
    loss = {"stereo": {"multi_scale": {"function": "multi_scale_loss", "params": {"weights": [0.7, 1.0]}}}}
    with pytest.warns(UserWarning, match=r"2 trainable parameter\(s\) get no gradient from the loss and will not be "
                                         r"trained: cost_filter\.to_cost\.weight, cost_filter\.to_cost\.bias\. "
                                         r"The model returns 3 predictions"):
        run = trainer(tiny_config(loss=loss), tmp_path / "run").build()
    assert run.accelerator.ddp_handler.find_unused_parameters          # what several processes would be told
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # every prediction scored: no warning
        run = trainer(tiny_config(), tmp_path / "other").build()
    assert not run.accelerator.ddp_handler.find_unused_parameters


# ----------------------------------------------------------------------------- resuming with another --num_iterations
def lr_by_step(run) -> dict:
    return {row["step"]: row["lr/base"] for row in run.history}


def test_resume_cannot_extend_a_schedule_laid_out_over_the_run(tmp_path):
    # one_cycle is laid out over --num_iterations: asking a resumed run for more steps is refused before any step
    config = tiny_config()
    config["lr_scheduler"] = {"name": "one_cycle"}
    trainer(config, tmp_path / "run", num_iterations=2).fit()
    workspace = Workspace(tmp_path / "run")
    from stereo_kit.train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError) as error:
        trainer(config, tmp_path / "run", num_iterations=4, checkpoint="latest").fit()
    message = str(error.value)
    assert message.startswith(f"{workspace.weights(2)}: --num_iterations 4 would extend a run whose lr_scheduler "
                              "'one_cycle' is laid out over 2 steps") and "\n" not in message
    assert "--num_iterations 2 or fewer" in message and f"--checkpoint {workspace.weights(2)}" in message
    assert workspace.complete_steps() == [2]                          # nothing was trained or written
    # the same through the command line: one line, exit status 1
    result = run_train(cli_args(write_config(tmp_path, config), tmp_path / "run", num_iterations=4, checkpoint="latest"))
    assert result.returncode == 1 and "would extend a run whose lr_scheduler 'one_cycle'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_resume_that_stops_earlier_keeps_the_schedules_shape(tmp_path):
    config = tiny_config()
    config["lr_scheduler"] = {"name": "warmup_cosine", "warmup_steps": 1}
    whole = trainer(config, tmp_path / "whole", num_iterations=4)
    whole.fit()
    stopped = trainer(config, tmp_path / "stopped", num_iterations=4, callbacks=[InterruptAt(2)])
    stopped.fit()
    assert Workspace(tmp_path / "stopped").complete_steps() == [2]
    shorter = trainer(config, tmp_path / "stopped", num_iterations=3, checkpoint="latest")
    shorter.fit()
    assert lr_by_step(shorter)[3] == lr_by_step(whole)[3]              # the 4-step cosine, ended a step early
    assert lr_by_step(whole)[3] > lr_by_step(whole)[4]


def test_a_schedule_independent_of_the_length_extends(tmp_path):
    config = tiny_config()
    config["lr_scheduler"] = {"name": "step", "step_size": 1, "gamma": 0.5}
    whole = trainer(config, tmp_path / "whole", num_iterations=4)
    whole.fit()
    trainer(config, tmp_path / "extended", num_iterations=2).fit()
    extended = trainer(config, tmp_path / "extended", num_iterations=4, checkpoint="latest")
    extended.fit()
    assert Workspace(tmp_path / "extended").complete_steps()[-1] == 4
    assert lr_by_step(extended) == {3: lr_by_step(whole)[3], 4: lr_by_step(whole)[4]}
    assert_identical(state_of(extended.unwrapped), state_of(whole.unwrapped))      # the same run, in two parts
