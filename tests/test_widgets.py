"""Widgets beyond their notebook: training in a real Jupyter kernel (interrupted from outside, and on two processes through
accelerate's `notebook_launcher`), and the viewer and inspector on loader batches and bad settings."""
import json
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stereo_kit.config import load_config
from stereo_kit.data.loader import build_dataloader
from stereo_kit.train.checkpoint import Workspace, load_training_state
from stereo_kit.widgets import AugmentationInspector, DisparityViewer, parameter_slider

ROOT = Path(__file__).resolve().parents[1]


def config_file(folder: Path, config: dict | None = None) -> str:
    "`config` (default `quick_config()`) written to a file in `folder`, for code that runs in a kernel."
    path = folder / "config.json"
    path.write_text(json.dumps(config or quick_config()))
    return str(path)


def quick_config() -> dict:
    "The quickstart config, evaluating on one rendered sample."
    config = load_config(ROOT / "configs/train/quickstart.json")
    config["eval"]["datasets"] = [{"name": "rendered", "path": str(ROOT / "data_samples/rendered_objects"), "max_samples": 1}]
    config["data"]["num_workers"] = 0
    return config


class Kernel:
    "A real IPython kernel (what JupyterLab starts), with helpers to run code and read what it shows."
    def __init__(self):
        from jupyter_client.manager import start_new_kernel
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(ROOT))

    def run(self, code: str, timeout: float = 120, until=None) -> list[dict]:
        "Execute `code`; return the iopub messages up to its reply. `until(message)` true: return early (still running)."
        msg_id, messages = self.client.execute(textwrap.dedent(code)), []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try: message = self.client.get_iopub_msg(timeout=1)
            except Exception: continue
            if message["parent_header"].get("msg_id") != msg_id: continue
            messages.append(message)
            if until is not None and until(message): return messages
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle": return messages
        raise TimeoutError(f"the kernel did not finish in {timeout} s:\n{code}")

    def output(self, code: str, timeout: float = 120) -> str:
        "What `code` prints; a traceback fails the test."
        messages = self.run(code, timeout)
        errors = [m["content"] for m in messages if m["msg_type"] == "error"]
        assert errors == [], "\n".join("\n".join(e["traceback"]) for e in errors)
        return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture
def kernel():
    kernel = Kernel()
    yield kernel
    kernel.close()


def _shows_step(step: int):
    "True for a widget update that shows the monitor at `step` or later."
    def check(message):
        if message["msg_type"] != "comm_msg": return False
        value = message["content"]["data"].get("state", {}).get("value", "")
        return isinstance(value, str) and any(f"step <b>{s}</b>" in value for s in range(step, step + 50))
    return check


@pytest.mark.slow
def test_interrupting_the_kernel_saves_a_checkpoint_and_stops(kernel, tmp_path):
    workspace = tmp_path / "run"
    kernel.output(f"""
        from stereo_kit.widgets import train_in_notebook
        config = {config_file(tmp_path)!r}
    """)
    started = kernel.run(f"""
        trainer = train_in_notebook(config, {str(workspace)!r}, num_iterations=10000, batch_size_forward=1, log_every=1,
                                    save_every=0, enable_mlflow=False)
    """, timeout=180, until=_shows_step(3))
    assert _shows_step(3)(started[-1])                       # the monitor showed step 3: training is live
    kernel.manager.interrupt_kernel()                         # the ■ button: SIGINT to the kernel
    finished = kernel.run("print(trainer.step)", timeout=120)   # queued behind the interrupted cell
    stopped_at = int("".join(m["content"]["text"] for m in finished if m["msg_type"] == "stream"))
    assert 3 <= stopped_at < 10000
    status = kernel.output("print(trainer.callbacks[0].status.value)")
    assert f"stopped at step {stopped_at}" in status and "checkpoint saved" in status
    assert load_training_state(Workspace(workspace), stopped_at)["step"] == stopped_at
    assert (workspace / "checkpoint" / f"{stopped_at:08d}.pt").exists()
    # the same cell again resumes from the checkpoint
    kernel.output(f"""
        trainer = train_in_notebook(config, {str(workspace)!r}, num_iterations={stopped_at + 2}, batch_size_forward=1,
                                    log_every=1, save_every=0, enable_mlflow=False)
        print(trainer.history[0]["step"], trainer.step)
    """, timeout=180)
    assert load_training_state(Workspace(workspace), stopped_at + 2)["step"] == stopped_at + 2


@pytest.mark.slow
def test_two_processes_from_a_notebook(kernel, tmp_path):
    """Two CPU processes through `notebook_launcher`, with a loss that leaves the initial disparity head untrained (DDP
    must be told to expect unused parameters, or its second step fails)."""
    workspace, config = tmp_path / "run", quick_config()
    config["model"]["train_iters"] = 3                                     # 5 predictions (initial, 3 updates, refined)
    config["loss"]["stereo"]["multi_scale"]["params"]["weights"] = [0.5, 0.7, 1.0]      # the last 3: none on the initial
    printed = kernel.output(f"""
        from stereo_kit.widgets import train_in_notebook
        monitor = train_in_notebook({config_file(tmp_path, config)!r}, {str(workspace)!r}, num_processes=2, num_iterations=4,
                                    batch_size_forward=1, log_every=2, vis_every=4, enable_mlflow=False)
        print([row["step"] for row in monitor.history])
        print(monitor.panel.image[:2] == b"\\xff\\xd8", "EPE" in monitor.evaluation.value and "nan" not in monitor.evaluation.value)
    """, timeout=300)
    assert "[2, 4]" in printed and "True True" in printed, printed
    assert [load_training_state(Workspace(workspace), 4)["world_size"]] == [2]


def test_viewer_on_a_loader_batch_reads_out_its_values():
    config = quick_config()
    batch = next(iter(build_dataloader(config["data"], batch_size=2, seed=0, num_workers=0)))
    prediction = batch["disparity"] + 1.5
    viewer = DisparityViewer(batch, prediction=prediction)
    assert viewer.index.max == 1
    viewer.index.value = 1
    valid = batch["valid"][1, 0].numpy()
    y, x = np.argwhere(valid)[0]
    truth = float(batch["disparity"][1, 0, y, x])
    viewer.canvases["error"].cursor = [int(x), int(y)]
    assert viewer.readout.value == (f"x {x}, y {y} · ground truth {truth:.2f} px · prediction {truth + 1.5:.2f} px "
                                    f"· error 1.50 px")
    invalid = np.argwhere(~valid)
    if len(invalid):
        y, x = invalid[0]
        assert "ground truth: none" in viewer.readout_at(int(x), int(y))
    # the warp by the ground truth agrees better than the warp by a prediction shifted by 1.5 px
    by_truth = viewer.images()["warp"]
    viewer.warp_by.value = "prediction"
    assert by_truth[valid].mean() < viewer.images()["warp"][valid].mean()


def test_viewer_from_plain_arrays_without_ground_truth():
    rng = np.random.default_rng(0)
    left = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    viewer = DisparityViewer((left, np.roll(left, -3, axis=1)), prediction=torch.full((1, 1, 48, 64), 3.0))
    assert viewer.readout_at(10, 5) == "x 10, y 5 · prediction 3.00 px"
    warp = viewer.images()["warp"]        # no ground truth: the warp check falls back to nothing, then the prediction
    assert not warp.any()
    viewer.warp_by.value = "prediction"
    difference = viewer.images()["warp"].astype(float)
    assert difference[:, 3:-3].mean() < 1                  # right shifted by 3 px, warped back by 3 px: the left view


def test_inspector_reports_bad_settings_with_their_key_path():
    inspector = AugmentationInspector({"rendered": str(ROOT / "data_samples/rendered_planes")}, size=(256, 192))
    scale = next(op for op in inspector.ops if op.name == "scale").sliders["scale"]
    scale.min = -1.0
    scale.value = (-0.5, 1.0)
    assert inspector.check() == ["data.augmentation.scale.scale: expected [low, high] with 0 < low <= high, got [-0.5, 1.0]"]
    assert "config problems: data.augmentation.scale.scale" in inspector.status.value
    scale.value = (0.5, 1.0)
    assert inspector.check() == [] and "valid config" in inspector.status.value
    assert json.loads(inspector.json.value)["augmentation"] == {"scale": {"scale": [0.5, 1.0]}}


def test_every_op_switch_changes_the_pipeline():
    inspector = AugmentationInspector({"rendered": str(ROOT / "data_samples/rendered_objects")}, size=(256, 192), seed=3)
    views = lambda: [inspector.canvases[f"augmented {view}"].array.copy() for view in ("left", "right")]
    for op in inspector.ops:
        before = views()
        op.switch.value = not op.switch.value
        changed = any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(before, views()))
        assert changed, f"switching {op.name} did not change the augmented view"
        op.switch.value = not op.switch.value


def test_parameter_slider_kinds():
    assert type(parameter_slider("count", (1, 3))).__name__ == "IntRangeSlider"
    assert type(parameter_slider("probability", 0.5)).__name__ == "FloatSlider"
    with pytest.raises(KeyError, match="no slider range"):
        parameter_slider("unknown", 1.0)
