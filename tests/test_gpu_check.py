"""The prepared GPU check (scripts/gpu_check.sh, benchmarks/gpu_check.py): its dry run on the CPU, every stage once, so
it never rots; how it judges the targets; and the CUDA paths it exists for, as `cuda`-marked tests that the check
runs first with `pytest -m cuda` (skipped without a GPU)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def load_check():
    "benchmarks/gpu_check.py as a module (benchmarks/ is no package)."
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def tiny_config(**train) -> dict:
    "Quickstart's blocks on small crops, no workers, no evaluation."
    config = json.loads((ROOT / "configs/train/quickstart.json").read_text())
    config["data"].update(image_sizes=[[96, 64]], num_workers=0)
    config["eval"] = {"datasets": []}
    config["train"] = {**config.get("train", {}), **train}
    return config


# ---------------------------------------------------------------------------------------------------------------
# the check itself, on the CPU

@pytest.mark.slow
def test_the_dry_run_runs_every_stage_on_the_cpu_and_reports_each(tmp_path):
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}         # the CPU path, also on a machine with a GPU
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800, env=environment)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert report["dry_run"] is True and report["status"] == "passed"
    assert list(stages) == ["tests", "train", "variants", "checkpointing", "cli"]
    assert {name: stage["status"] for name, stage in stages.items()} == dict.fromkeys(stages, "passed")

    assert "test_losses_metrics.py" in " ".join(stages["tests"]["files"]) and stages["tests"]["counts"]["skipped"] >= 1
    runs = {run["precision"]: run for run in stages["train"]["runs"]}
    assert set(runs) == {"fp32", "bf16", "fp16"}
    assert runs["fp16"]["skipped"].startswith("needs CUDA") and runs["bf16"]["skipped"].startswith("needs CUDA")
    measured = runs["fp32"]
    assert measured["preset"] == "tiny" and measured["image_size"] == [64, 96] and measured["batch_size"] == 2
    assert len(measured["timed_step_seconds"]) == 2 and len(measured["warmup_step_seconds"]) == 1
    assert measured["samples_per_second"] == pytest.approx(2 * 2 / sum(measured["timed_step_seconds"]), rel=1e-3)
    assert 0 <= measured["data_wait_fraction"] < 1 and measured["skipped_steps"] == 0
    assert all(math.isfinite(loss) for loss in measured["losses"]) and measured["data"]["data/read"] >= 2 * 3
    assert measured["peak_memory_gib"] is None and measured["grad_scaler"] is None    # no CUDA
    assert stages["train"]["profiles"][0]["top"]                                     # the profiled step

    variants = {run["variant"]: run for run in stages["variants"]["runs"]}
    assert set(variants) == {"channels_last", "compile"} and all("samples_per_second" in run for run in variants.values())
    assert variants["compile"]["backend"].startswith("aot_eager") and stages["variants"]["compile_child"]["returncode"] == 0
    assert set(stages["variants"]["speedup_over_plain"]) == {"channels_last", "compile"}

    checkpointing = stages["checkpointing"]
    assert checkpointing["batch_size"] == 2 and "needs CUDA" in checkpointing["batch_found"]
    assert checkpointing["with"]["gradient_checkpointing"] and not checkpointing["without"]["gradient_checkpointing"]
    assert checkpointing["time_ratio"] == pytest.approx(
        checkpointing["with"]["step_seconds"] / checkpointing["without"]["step_seconds"])

    cli = stages["cli"]
    assert [cli[name]["returncode"] for name in ("train", "eval", "predict")] == [0, 0, 0]
    assert all(math.isfinite(metrics["epe"]) for metrics in cli["eval"]["scores"].values())
    assert set(report["targets"]) == {"data_wait", "checkpointing_time"}    # no bf16 run, no memory figure on the CPU
    assert all(target["met"] is None for target in report["targets"].values())   # CPU figures judge nothing
    text = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in text and "| tiny | fp32 | plain | 2 |" in text and text in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would start the whole check")
def test_without_a_gpu_the_full_check_refuses_and_says_why(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(tmp_path), "--stages", "train"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "no CUDA device: run with --dry-run" in done.stderr
    assert json.loads((tmp_path / "gpu_check.json").read_text())["status"] == "failed"


def test_the_targets_are_judged_from_the_runs():
    check = load_check()
    report = check.Report.__new__(check.Report)
    run = lambda precision, speed, wait: {"preset": "base", "precision": precision, "samples_per_second": speed,
                                          "data_wait_fraction": wait}
    report.data = {"dry_run": False, "settings": {"main_preset": "base", "workers": 14}, "stages": {
        "train": {"runs": [run("fp32", 10.0, 0.01), run("bf16", 17.0, 0.08), run("fp16", 15.0, 0.02),
                           {"preset": "large", "precision": "fp32", "skipped": "over the stage's time budget"}]},
        "checkpointing": {"memory_saved": 0.55, "time_ratio": 1.35}}}
    check.judge(report)
    targets = report.data["targets"]
    assert targets["bf16_speedup"]["value"] == pytest.approx(1.7) and targets["bf16_speedup"]["met"] is True
    assert targets["data_wait"]["value"] == 0.08 and targets["data_wait"]["met"] is False
    assert "base bf16" in targets["data_wait"]["measured"]                     # the worst run is named
    assert targets["checkpointing_memory"]["met"] is True and targets["checkpointing_time"]["met"] is False
    report.data["dry_run"] = True
    check.judge(report)
    assert all(target["met"] is None for target in report.data["targets"].values())


# ---------------------------------------------------------------------------------------------------------------
# the CUDA paths (scripts/gpu_check.sh runs these first, with -m cuda)

@pytest.mark.cuda
@needs_cuda
def test_fp16_grad_scaler_skips_an_overflowing_step_and_halves_its_scale(tmp_path):
    from stereo_kit.train.trainer import Trainer
    trainer = Trainer(tiny_config(mixed_precision_dtype="fp16"), tmp_path / "run", enable_mixed_precision=True,
                      batch_size_forward=2, enable_mlflow=False, enable_ema=False, num_iterations=50).build()
    scaler = trainer.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and trainer.accelerator.device.type == "cuda"
    stream = trainer._start_data()
    assert any(trainer.train_step(stream)["applied"] for _ in range(30))      # the scale has come down far enough
    weights = {name: p.detach().clone() for name, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    scale, skipped, loss = scaler.get_scale(), trainer.skipped_steps, trainer.loss

    def overflowing(*args, **kwargs):                      # fp16 activations' gradients overflow: the scaler's case
        total, terms = loss(*args, **kwargs)
        return total * 2.0**100, terms
    trainer.loss = overflowing
    assert trainer.train_step(stream)["applied"] is False
    assert scaler.get_scale() == scale / 2 and trainer.skipped_steps == skipped + 1
    assert all(torch.equal(p, weights[name]) for name, p in trainer.unwrapped.named_parameters() if p.requires_grad)
    trainer.loss = loss
    assert any(trainer.train_step(stream)["applied"] for _ in range(3))
    assert not all(torch.equal(p, weights[name]) for name, p in trainer.unwrapped.named_parameters() if p.requires_grad)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_model_on_cuda_computes_what_it_computes_on_the_cpu(dtype):
    from stereo_kit.models import build_model
    torch.manual_seed(0)
    model = build_model({"preset": "small", "vit_trainable": True}).eval()      # a ViT-S with random weights
    left = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(1)) * 255
    right = left.roll(-6, -1)
    with torch.no_grad():
        reference = model(left, right, iters=4)
        model.cuda()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            found = model(left.cuda(), right.cuda(), iters=4).float().cpu()
    assert torch.isfinite(found).all()
    # float32 differs by cuDNN's TF32 convolutions only; the autocast dtypes by their rounding
    tolerance = 1e-2 if dtype == torch.float32 else 5e-2
    assert (found - reference).norm() / reference.norm() < tolerance


@pytest.mark.cuda
@needs_cuda
def test_batches_come_pinned_and_reach_the_gpu_unchanged():
    from stereo_kit.data.loader import build_dataloader
    config = tiny_config()
    stream = iter(build_dataloader(config["data"], batch_size=2, seed=0, num_workers=2))
    batch = next(stream)
    tensors = {key: batch[key] for key in ("left", "right", "disparity", "valid")}
    assert all(tensor.is_pinned() for tensor in tensors.values())
    on_gpu = {key: tensor.to("cuda", non_blocking=True) for key, tensor in tensors.items()}
    torch.cuda.synchronize()
    assert all(torch.equal(on_gpu[key].cpu(), tensor) for key, tensor in tensors.items())
