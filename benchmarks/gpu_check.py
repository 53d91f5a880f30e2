"""The prepared GPU check (issue 21): proves each CUDA path of training, evaluation and prediction, and measures what a
user plans a cluster run with, in one command sized for a short lease on one GPU (about 8 minutes on an H200).

    bash scripts/gpu_check.sh [--out DIR] [--budget 450] [--stages tests,train,...]   # on the GPU machine
    bash scripts/gpu_check.sh --dry-run --out /tmp/gpu_check                          # anywhere, CPU, about 2 min

Everything measured goes to DIR/gpu_check.json (rewritten after every run, so a run stopped half-way keeps what it
measured) and a short table, DIR/gpu_check.md, printed again at the end. DIR defaults to $OUT when it is set (the
device tool brings back what is written there), else workspace/gpu_check. The stages, in order; the first one that
breaks stops the check with its traceback and exit status 1:

1. tests: `pytest -m cuda` over the test files that carry the marker;
2. train: `configs/train/stereo_v1.json`'s blocks (its loss, data settings and augmentation; optimizer and schedule
   defaults) on the synthetic dataset (rendered at 960×540, the batch cropped to the paper's 320×736, H×W), batch 4,
   the loader on 14 worker processes, for the small and base presets, then large while the time allows, each in fp32,
   bf16 and fp16 (accelerate's GradScaler): samples/s and step time over the timed steps (warm-up steps excluded),
   peak GPU memory, the share of step time spent waiting for data, steps skipped as non-finite. One extra step of
   base in fp32 and in bf16 runs under the profiler: kernel time against wall time, and the costliest kernels;
3. variants: base in bf16 with `train.channels_last`, and with `train.compile` (in a child process with a time
   limit: compiling this network takes minutes), each against the plain run of stage 2;
4. checkpointing: base in bf16 on one batch kept on the GPU (no data loading), at the largest batch that fits
   without gradient checkpointing (extrapolated from the peak memory of batches 1 and 2, then tried): peak memory
   and step time with checkpointing and without;
5. cli: `stereo-kit train` (configs/train/quickstart.json, a few steps, eval on data_samples at the end), then
   `stereo-kit eval` and `stereo-kit predict` on its checkpoint, each in its own process, each shown to have used
   the GPU (its peak CUDA memory).

The model presets are the config layer's; every preset gets stereo_v1's `max_disp` (192), and large is stereo_v1's
own model block. The GPU machine has no DINOv2 weights and no network: the check writes a DINOv2 folder of RANDOM
weights (`save_pretrained`) and points `model.pretrained` at it, so the ViT is frozen and loaded exactly as a
downloaded one would be: speed and memory are those of the real configuration, the loss values mean nothing.

Targets: bf16 at least 1.6× the samples/s of fp32 on base; data wait under 5 % of step time (the worst run of stage
2); gradient checkpointing saving at least half the peak memory for at most 1.3× the step time.

`--dry-run` runs the same code on the CPU so that it never rots (tests/test_gpu_check.py runs it, in about 1.5
minutes on 2 cores): the tiny preset with a tiny DINOv2, 64×96 crops, batch 2, 2 workers, 1 warm-up and 2 timed
steps, one torch thread per process, every stage once, with the packages the GPU image lacks hidden (`DEVICE_LACKS`:
MLflow, widgets, notebooks). It skips only what needs CUDA, or means nothing without it, and says so: the fp16 runs
(no GradScaler without CUDA), the bf16 runs (emulated on a CPU, several times slower than fp32; the variants and
checkpointing run in fp32 instead), the largest-batch search (CUDA memory statistics); and it compiles with dynamo's
`aot_eager` backend (graph capture and autograd, no code generation: inductor's C++ build of this network takes
about 7 minutes on a 2-core CPU). Its figures judge no target.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import gc
import itertools
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tests", "train", "variants", "checkpointing", "cli")
STAGE_SHARE = {"tests": 0.08, "train": 0.50, "variants": 0.78, "checkpointing": 0.90, "cli": 1.0}  # of --budget, cumulative
PRECISIONS = ("fp32", "bf16", "fp16")
TARGETS = {"bf16_speedup": 1.6, "data_wait_fraction": 0.05, "checkpointing_memory_saved": 0.5,
           "checkpointing_time_ratio": 1.3}
CHILD_MARK = "GPU_CHECK_CHILD "       # a child process's last line: this, then its result as JSON
# pyproject's dependencies that the GPU image lacks (MLflow, widgets, notebooks). The dry run hides them, in its own
# process and its children, so that CI fails as soon as a checked path starts to import one.
DEVICE_LACKS = ("mlflow", "sqlalchemy", "alembic", "ipywidgets", "anywidget", "IPython", "nbdev", "jupyterlab")
HIDE_VARIABLE = "STEREO_KIT_GPU_CHECK_HIDE"


@dataclass(frozen=True)
class Settings:
    "What one check runs: the full one on a GPU, or the dry run."
    presets: tuple[str, ...] = ("small", "base", "large")
    main_preset: str = "base"              # the preset of the targets, the variants and the checkpointing stage
    optional_presets: tuple[str, ...] = ("large",)   # run last, while the time allows
    height: int = 320
    width: int = 736
    render: tuple[int, int] = (960, 540)   # synthetic scenes, W×H, before augmentation and the crop
    render_max_disparity: float = 160.0
    batch_size: int = 4
    workers: int = 14
    warmup: int = 3
    steps: int = 6
    batch_limit: int = 64                  # the largest-batch search stops here (time)
    memory_fraction: float = 0.85          # of the GPU's memory, for the largest-batch extrapolation
    cli_steps: int = 4
    vit_size: str | None = None            # None: the preset's
    dry_run: bool = False


def settings_from(data: dict) -> Settings:
    "Settings from their JSON form (lists back to tuples)."
    return Settings(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


DRY_RUN = Settings(presets=("tiny",), main_preset="tiny", optional_presets=(), height=64, width=96, render=(160, 112),
                   render_max_disparity=32.0, batch_size=2, workers=2, warmup=1, steps=2, batch_limit=2,
                   cli_steps=2, vit_size="tiny", dry_run=True)


# ---------------------------------------------------------------------------------------------------------------
# the report: one JSON, rewritten after every run, and a short table

class Report:
    "The JSON of the check, written atomically to `out`/gpu_check.json (and the table to gpu_check.md) on every save."
    def __init__(self, out: Path, settings: Settings, budget: float):
        self.out, self.started = out, time.perf_counter()
        self.data = {"check": "stereo_kit GPU check (issue 21)", "dry_run": settings.dry_run, "status": "running",
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_seconds": budget,
                     "settings": asdict(settings), "environment": environment(),
                     "stages": {name: {"status": "not run"} for name in STAGES}, "targets": {}}

    def stage(self, name: str) -> dict: return self.data["stages"][name]

    def save(self):
        from stereo_kit.io import atomic_path
        self.data["seconds"] = round(time.perf_counter() - self.started, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / "gpu_check.json") as temporary:
            temporary.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        with atomic_path(self.out / "gpu_check.md") as temporary: temporary.write_text(table(self.data) + "\n")


def environment() -> dict:
    import torch
    cuda = torch.cuda.is_available()
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
             "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
             "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
             "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if cuda: found["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for package in ("accelerate", "transformers", "pydantic", "fastcore"):
        try: found[package] = __import__(package).__version__
        except Exception as error: found[package] = f"missing ({type(error).__name__})"
    return found


def _number(value, format: str, scale: float = 1.0) -> str:
    return "-" if value is None else format.format(value * scale)


def table(data: dict) -> str:
    "The measurements as markdown: the training runs, the variants, checkpointing, the CLI, then the targets."
    stages, lines = data["stages"], []
    where = data["environment"]["device"] + (" (DRY RUN: CPU, tiny preset; no figure here is a GPU figure)"
                                             if data["dry_run"] else "")
    lines += [f"stereo_kit GPU check on {where}: {data['status']} in {data.get('seconds', 0):.0f} s", ""]
    runs = [dict(run, variant="plain") for run in stages["train"].get("runs", [])]
    runs += stages["variants"].get("runs", [])
    if runs:
        lines += ["| preset | precision | variant | batch | samples/s | step ms | peak GB | data wait | skipped |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for run in runs:
            if "skipped" in run or "error" in run:
                lines.append(f"| {run['preset']} | {run['precision']} | {run.get('variant', 'plain')} | | "
                             f"{run.get('skipped') or run.get('error')} | | | | |")
                continue
            lines.append(f"| {run['preset']} | {run['precision']} | {run['variant']} | {run['batch_size']} | "
                         f"{run['samples_per_second']:.2f} | {1000 * run['step_seconds']:.0f} | "
                         f"{_number(run['peak_memory_gib'], '{:.1f}')} | {100 * run['data_wait_fraction']:.1f} % | "
                         f"{run['skipped_steps']} |")
        lines.append("")
    for run in stages["train"].get("profiles", []):
        top = ", ".join(f"{name} {share:.0%}" for name, share in run["top"][:3])
        lines.append(f"profile {run['preset']} {run['precision']}: kernels busy {_number(run['kernel_fraction'], '{:.0%}')}"
                     f" of a {1000 * run['wall_seconds']:.0f} ms step; costliest: {top}")
    checkpointing = stages["checkpointing"]
    if "with" in checkpointing:
        on, off = checkpointing["with"], checkpointing["without"]
        lines += ["", f"checkpointing at batch {checkpointing['batch_size']} ({checkpointing['batch_found']}): "
                  f"{1000 * off['step_seconds']:.0f} -> {1000 * on['step_seconds']:.0f} ms per step, peak "
                  f"{_number(off['peak_memory_gib'], '{:.1f}')} -> {_number(on['peak_memory_gib'], '{:.1f}')} GB"]
    cli = stages["cli"]
    for name in ("train", "eval", "predict"):
        if name in cli:
            run = cli[name]
            lines.append(f"stereo-kit {name}: {run['seconds']:.1f} s, peak CUDA memory "
                         f"{_number(run.get('cuda_peak_mib'), '{:.0f}')} MiB")
    if data["targets"]:
        lines += ["", "| target | wanted | measured | met |", "|---|---|---|---|"]
        for name, target in data["targets"].items():
            lines.append(f"| {name} | {target['wanted']} | {target['measured']} | {target['met']} |")
    for name in STAGES:
        stage = stages[name]
        if stage["status"] not in ("passed",):
            lines.append(f"stage {name}: {stage['status']}" + (f": {stage['error']}" if "error" in stage else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# configs

def stereo_v1() -> dict:
    from stereo_kit.config import load_config
    return load_config(ROOT / "configs/train/stereo_v1.json")


def random_dinov2(folder: Path, vit_size: str) -> Path:
    "A DINOv2 folder of random weights (`save_pretrained`): the device has no downloaded ones."
    import torch
    from transformers import Dinov2Config, Dinov2Model
    from stereo_kit.models.features import VIT_PATCH_SIZE, VIT_SIZES
    path = folder / f"dinov2-{vit_size}-random"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(patch_size=VIT_PATCH_SIZE, **VIT_SIZES[vit_size])).save_pretrained(path)
    return path


def training_config(settings: Settings, preset: str, folder: Path, precision: str = "bf16", **train) -> dict:
    "stereo_v1's blocks with the preset's model (random DINOv2 folder) and the synthetic dataset at the check's crop."
    from stereo_kit.config import ModelConfig
    v1 = stereo_v1()
    config = copy.deepcopy(v1)
    model = dict(v1["model"]) if preset == v1["model"].get("preset") else {"preset": preset, "max_disp": v1["model"]["max_disp"]}
    model.pop("pretrained", None)
    if settings.vit_size: model.update(feature_type="dinov2", vit_size=settings.vit_size)
    vit_size = ModelConfig.model_validate({**model, "vit_trainable": True}).vit_size
    config["model"] = {**model, "pretrained": str(random_dinov2(folder, vit_size))}
    entry = v1["data"]["datasets"][0]
    config["data"] = {**v1["data"], "image_sizes": [[settings.width, settings.height]], "index_cache": None,
                      "datasets": [{"name": "synthetic", "format": "synthetic", "label_type": entry["label_type"],
                                    "image_augmentation": entry.get("image_augmentation", []),
                                    "options": {"size": list(settings.render),
                                                "max_disparity": settings.render_max_disparity}}]}
    config["train"] = {**v1.get("train", {}), "num_workers": settings.workers,
                       "mixed_precision_dtype": "bf16" if precision == "fp32" else precision, **train}
    config["eval"] = {"datasets": []}
    return config


# ---------------------------------------------------------------------------------------------------------------
# training runs

def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _sync():
    import torch
    if torch.cuda.is_available(): torch.cuda.synchronize()


def _peak_gib() -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _reset_peak():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _release():
    import torch
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()


def build_trainer(config: dict, workspace: Path, batch_size: int, precision: str, checkpointing: bool, steps: int):
    "A built `Trainer` (the real one: accelerate, autocast, GradScaler, EMA), MLflow off; its warnings collected."
    from stereo_kit.train.trainer import Trainer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(config, workspace, batch_size_forward=batch_size, enable_mixed_precision=precision != "fp32",
                          enable_gradient_checkpointing=checkpointing, enable_mlflow=False, num_iterations=steps,
                          save_every=0, seed=0).build()
    trainer.build_warnings = sorted({str(w.message)[:200] for w in caught})
    return trainer


def timed_steps(trainer, stream, warmup: int, steps: int) -> list[dict]:
    "Run `warmup + steps` optimizer steps; per step its wall time (synchronised), data wait, loss, and whether applied."
    rows = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        result = trainer.train_step(stream)
        _sync()
        rows.append({"seconds": time.perf_counter() - started, "data_wait": result["data_wait"],
                     "loss": result["loss"], "applied": bool(result["applied"])})
        trainer.step += 1
    return rows


def summarize(rows: list[dict], warmup: int, batch_size: int) -> dict:
    timed = rows[warmup:]
    seconds = sum(row["seconds"] for row in timed)
    return {"samples_per_second": batch_size * len(timed) / seconds,
            "step_seconds": statistics.median(row["seconds"] for row in timed),
            "data_wait_fraction": sum(row["data_wait"] for row in timed) / seconds,
            "warmup_step_seconds": [round(row["seconds"], 4) for row in rows[:warmup]],
            "timed_step_seconds": [round(row["seconds"], 4) for row in timed],
            "losses": [row["loss"] for row in rows], "skipped_steps": sum(not row["applied"] for row in rows),
            "skipped_timed_steps": sum(not row["applied"] for row in timed)}


def check_finite(run: dict):
    "A broken path, not a number to report: a non-finite loss or a skipped step in fp32/bf16, only non-finite fp16 losses."
    finite = [math.isfinite(loss) for loss in run["losses"]]
    if run["precision"] in ("fp32", "bf16") and (not all(finite) or run["skipped_steps"]):
        raise RuntimeError(f"{run['preset']} {run['precision']}: losses {run['losses']}, {run['skipped_steps']} step(s) "
                           f"skipped as non-finite: the {run['precision']} training path is broken")
    if run["precision"] == "fp16" and not any(finite):
        raise RuntimeError(f"{run['preset']} fp16: every loss was non-finite ({run['losses']})")


def profile_step(trainer, stream) -> dict:
    "One more step under torch.profiler: kernel (or CPU op) time against wall time, and the costliest names."
    import torch
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        trainer.train_step(stream)
        _sync()
        wall = time.perf_counter() - started
    from torch.autograd import DeviceType
    # on CUDA the kernels themselves (their own device time), on the CPU every op's own CPU time; microseconds
    events = [event for event in profiler.key_averages() if not cuda or event.device_type == DeviceType.CUDA]
    def own(event) -> float:
        if not cuda: return event.self_cpu_time_total
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
    busy = sum(own(event) for event in events) / 1e6
    top = sorted(((event.key, own(event) / 1e6) for event in events), key=lambda item: -item[1])[:8]
    return {"wall_seconds": wall, "kernel_seconds": busy if cuda else None,
            "kernel_fraction": busy / wall if cuda else None,
            "top": [(name[:60], seconds / max(busy, 1e-12)) for name, seconds in top],
            "measured": "CUDA kernel time" if cuda else "CPU self time"}


def train_run(settings: Settings, folder: Path, preset: str, precision: str, profile: bool = False,
              variant: str = "plain", **train) -> dict:
    "One training run on the data loader: build, warm up, time; the run's numbers."
    config = training_config(settings, preset, folder, precision, **train)
    run = {"preset": preset, "precision": precision, "variant": variant, "batch_size": settings.batch_size,
           "workers": settings.workers, "gradient_checkpointing": True, "image_size": [settings.height, settings.width]}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as workspace:
        trainer = build_trainer(config, Path(workspace) / "run", settings.batch_size, precision, True,
                                settings.warmup + settings.steps + 1)
        run["build_seconds"] = time.perf_counter() - started
        run["build_warnings"] = trainer.build_warnings
        scaler = trainer.accelerator.scaler
        stream = trainer._start_data()
        try:
            _reset_peak()
            rows = timed_steps(trainer, stream, settings.warmup, settings.steps)
            run.update(summarize(rows, settings.warmup, settings.batch_size), peak_memory_gib=_peak_gib(),
                       grad_scaler=type(scaler).__name__ if scaler is not None else None,
                       loss_scale=float(scaler.get_scale()) if scaler is not None else None,
                       data=trainer.batches.stats.as_dict())
            if profile: run["profile"] = profile_step(trainer, stream)
        finally:
            stream.close()                       # ends the loader's worker processes
            del trainer, stream
            _release()
    run["seconds"] = time.perf_counter() - started
    return run


def child_train_run(request: Path) -> dict:
    "A `train_run` in this (child) process, from the JSON `request` the parent wrote."
    arguments = json.loads(request.read_text())
    settings = settings_from(arguments["settings"])
    if settings.dry_run:           # graph capture and autograd without code generation: see the module's docstring
        import torch
        compile_module = torch.nn.Module.compile
        torch.nn.Module.compile = lambda self, *args, **kwargs: compile_module(self, *args, **{"backend": "aot_eager",
                                                                                               **kwargs})
    return train_run(settings, Path(arguments["folder"]), arguments["preset"], arguments["precision"],
                     variant=arguments["variant"], **arguments["train"])


def run_child(arguments: list[str], timeout: float, folder: Path, name: str) -> tuple[dict | None, dict]:
    "Run this script as a child process (own session, killed with its workers on timeout); (its result, what it did)."
    log = folder / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as output:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *arguments], cwd=ROOT, stdout=output,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try: code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)           # the child and its data-loader workers
            child.wait()
            code = None
    text = log.read_text(errors="replace")
    done = {"seconds": time.perf_counter() - started, "returncode": code, "log_tail": text[-3000:]}
    results = [line[len(CHILD_MARK):] for line in text.splitlines() if line.startswith(CHILD_MARK)]
    return (json.loads(results[-1]) if results else None), done


# ---------------------------------------------------------------------------------------------------------------
# the stages

class Budget:
    "Seconds left for a stage (its cumulative share of the whole budget) and a guess of what the next item costs."
    def __init__(self, total: float): self.started, self.total = time.perf_counter(), total

    def left(self, stage: str) -> float:
        return self.started + STAGE_SHARE[stage] * self.total - time.perf_counter()

    def allows(self, stage: str, estimate: float) -> bool: return self.left(stage) >= estimate


def stage_tests(settings: Settings, report: Report, budget: Budget, folder: Path):
    "pytest -m cuda over the test files that hold the marker; on a GPU every one must pass (none skipped)."
    stage = report.stage("tests")
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in path.read_text())
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", *files]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(60, budget.left("tests") + 60))
    output = done.stdout + done.stderr
    counts = {kind: int(number) for number, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output)}
    stage.update(files=files, command=" ".join(command[1:]), returncode=done.returncode, counts=counts,
                 seconds=time.perf_counter() - started, output_tail=output[-4000:])
    if done.returncode != 0 or not counts.get("passed", 0) + counts.get("skipped", 0):
        raise RuntimeError(f"pytest -m cuda exited with {done.returncode} ({counts}):\n{output[-2000:]}")
    if _cuda() and counts.get("skipped"):
        raise RuntimeError(f"pytest -m cuda skipped {counts['skipped']} test(s) on a CUDA machine:\n{output[-2000:]}")
    if not _cuda(): stage["note"] = "no CUDA here: every CUDA test skipped, as it should be"


def stage_train(settings: Settings, report: Report, budget: Budget, folder: Path):
    "Every preset in every precision on the data loader; the main preset first (the targets), the optional ones last."
    stage = report.stage("train")
    stage["runs"], stage["profiles"] = [], []
    estimate = 0.0
    presets = sorted(settings.presets, key=lambda p: (p in settings.optional_presets, p != settings.main_preset))
    for preset in presets:
        for precision in PRECISIONS:
            run = {"preset": preset, "precision": precision}
            if precision == "fp16" and not _cuda():
                run["skipped"] = "needs CUDA: accelerate makes no GradScaler without it"
            elif precision == "bf16" and not _cuda():
                run["skipped"] = "needs CUDA: bf16 autocast on this CPU is emulated, several times slower than fp32"
            elif preset in settings.optional_presets and not budget.allows("train", 1.5 * estimate):
                run["skipped"] = f"over the stage's time budget ({budget.left('train'):.0f} s left)"
            elif any(r.get("error", "").startswith("out of memory") for r in stage["runs"] if r["preset"] == preset):
                run["skipped"] = "out of memory in an earlier precision"
            else:
                profile = preset == settings.main_preset and precision in ("fp32", "bf16")
                try: run = train_run(settings, folder, preset, precision, profile=profile)
                except Exception as error:
                    if not _out_of_memory(error): raise
                    run["error"] = f"out of memory at batch {settings.batch_size}"
                if "error" in run: _release()            # here, once the exception no longer holds the run's tensors
                else:
                    check_finite(run)
                    estimate = max(estimate, run["seconds"])
                    if "profile" in run: stage["profiles"].append({"preset": preset, "precision": precision,
                                                                   **run.pop("profile")})
            stage["runs"].append(run)
            print(_run_line(run), flush=True)
            report.save()
    if not any("samples_per_second" in run for run in stage["runs"]): raise RuntimeError("no training run finished")


def _out_of_memory(error: Exception) -> bool:
    import torch
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _run_line(run: dict) -> str:
    label = f"  {run['preset']:6s} {run['precision']:5s} {run.get('variant', 'plain'):13s}"
    if "samples_per_second" not in run: return f"{label} {run.get('skipped') or run.get('error')}"
    return (f"{label} {run['samples_per_second']:8.2f} samples/s  {1000 * run['step_seconds']:7.0f} ms/step  peak "
            f"{_number(run['peak_memory_gib'], '{:.1f}')} GB  data wait {100 * run['data_wait_fraction']:.1f} %  "
            f"skipped {run['skipped_steps']}")


def _baseline(report: Report, preset: str, precision: str) -> dict | None:
    return next((run for run in report.stage("train").get("runs", []) if run["preset"] == preset
                 and run["precision"] == precision and "samples_per_second" in run), None)


def stage_variants(settings: Settings, report: Report, budget: Budget, folder: Path):
    "channels_last in this process; compile in a child process with a time limit (what is left of the stage)."
    stage = report.stage("variants")
    precision = "bf16" if _cuda() else "fp32"
    stage["runs"] = []
    preset = settings.main_preset
    run = train_run(settings, folder, preset, precision, variant="channels_last", channels_last=True)
    check_finite(run)
    stage["runs"].append(run)
    print(_run_line(run), flush=True)
    report.save()

    request = folder / "compile_request.json"
    request.write_text(json.dumps({"settings": asdict(settings), "folder": str(folder),
                                   "preset": preset, "precision": precision, "variant": "compile",
                                   "train": {"compile": True}}))
    limit = max(60.0, budget.left("variants"))
    result, done = run_child(["--child-run", str(request)], limit, folder, "compile")
    stage["compile_child"] = done
    if result is not None:
        check_finite(result)
        result.update(compile_seconds=result["warmup_step_seconds"][0],
                      backend="aot_eager (dry run)" if settings.dry_run else "inductor (torch.compile's default)")
        run = result
    elif done["returncode"] is None:
        run = {"preset": preset, "precision": precision, "variant": "compile",
               "skipped": f"compiling did not finish within {limit:.0f} s (the stage's time): compile time alone "
                          "outweighs a short run"}
    else:
        raise RuntimeError(f"train.compile: the child process exited with {done['returncode']}:\n{done['log_tail']}")
    stage["runs"].append(run)
    print(_run_line(run), flush=True)
    baseline = _baseline(report, preset, precision)
    if baseline:
        stage["speedup_over_plain"] = {r["variant"]: r["samples_per_second"] / baseline["samples_per_second"]
                                       for r in stage["runs"] if "samples_per_second" in r}


def stage_checkpointing(settings: Settings, report: Report, budget: Budget, folder: Path):
    "Checkpointing on vs off at the largest batch that fits without it, on one batch kept on the device."
    import torch
    stage = report.stage("checkpointing")
    precision = "bf16" if _cuda() else "fp32"
    preset = settings.main_preset
    config = training_config(settings, preset, folder, precision)
    with tempfile.TemporaryDirectory(dir=folder) as workspace:
        trainer = build_trainer(config, Path(workspace) / "run", settings.batch_size, precision, False, 1000)
        from stereo_kit.data.loader import build_dataloader
        samples = next(iter(build_dataloader(config["data"], settings.batch_size, seed=0, num_workers=0)))
        samples = trainer._to_device(samples)

        def batch_of(size: int) -> dict:
            "`size` samples: the rendered ones repeated (the same work per sample as new ones)."
            repeat = -(-size // settings.batch_size)
            def grown(value):
                if torch.is_tensor(value): return torch.cat([value] * repeat)[:size]
                return (value * repeat)[:size] if isinstance(value, list) else value
            return {key: grown(value) for key, value in samples.items()}

        def measure(size: int, checkpointing: bool, warmup: int = 1, steps: int = 2) -> dict:
            trainer.unwrapped.enable_gradient_checkpointing(checkpointing)
            _release()
            _reset_peak()
            rows = timed_steps(trainer, itertools.repeat(batch_of(size)), warmup, steps)
            found = {"batch_size": size, "gradient_checkpointing": checkpointing,
                     **summarize(rows, warmup, size), "peak_memory_gib": _peak_gib()}
            if not all(math.isfinite(loss) for loss in found["losses"]):
                raise RuntimeError(f"checkpointing={checkpointing}, batch {size}: non-finite losses {found['losses']}")
            return found

        try:
            if _cuda():
                # two probes far enough apart that step time grows with the batch (small batches wait on launches)
                try: small, large = measure(2, False, 1, 1), measure(8, False, 1, 1)
                except torch.cuda.OutOfMemoryError:
                    trainer.optimizer.zero_grad(set_to_none=True)
                    _release()
                    small, large = measure(1, False, 1, 1), measure(2, False, 1, 1)
                apart = large["batch_size"] - small["batch_size"]
                per_sample = (large["peak_memory_gib"] - small["peak_memory_gib"]) / apart
                fixed = small["peak_memory_gib"] - small["batch_size"] * per_sample
                total = torch.cuda.get_device_properties(0).total_memory / 2**30
                by_memory = int((settings.memory_fraction * total - fixed) / max(per_sample, 1e-3))
                # and by time: the six steps below (with and without, 1 + 2 each) must fit in what is left of the stage
                seconds_per_sample = max((large["step_seconds"] - small["step_seconds"]) / apart, 1e-3)
                step_seconds = lambda size: large["step_seconds"] + (size - large["batch_size"]) * seconds_per_sample
                by_time = max((size for size in range(2, settings.batch_limit + 1)
                               if 7 * step_seconds(size) <= budget.left("checkpointing")), default=2)
                size = max(2, min(settings.batch_limit, by_memory, by_time))
                bound = min(("memory", by_memory), ("time", by_time), ("the cap", settings.batch_limit),
                            key=lambda item: item[1])[0]
                stage["probes"] = [small, large]
                stage["memory_model"] = {"fixed_gib": fixed, "per_sample_gib": per_sample, "gpu_gib": total,
                                         "batch_by_memory": by_memory, "batch_by_time": by_time,
                                         "extrapolated_batch": size, "bound": bound}
                for _ in range(4):
                    try:
                        without = measure(size, False)
                        break
                    except torch.cuda.OutOfMemoryError:
                        trainer.optimizer.zero_grad(set_to_none=True)
                        size = max(1, int(size * 0.75))
                else: raise RuntimeError("no batch fitted without gradient checkpointing")
                stage["batch_found"] = (f"extrapolated from batches {small['batch_size']} and {large['batch_size']}; "
                                        f"bound by {bound}"
                                        + (" (NOT the largest that fits)" if bound != "memory" else "")
                                        + ("" if size == stage["memory_model"]["extrapolated_batch"] else
                                           ", lowered after running out of memory"))
            else:
                size = settings.batch_size
                without = measure(size, False)
                stage["batch_found"] = "no search: needs CUDA memory statistics (dry run: the batch size as set)"
            with_ = measure(size, True)
        finally:
            del trainer
            _release()
    stage.update(batch_size=size, precision=precision, preset=preset, without=without)
    stage["with"] = with_
    stage["time_ratio"] = with_["step_seconds"] / without["step_seconds"]
    if without["peak_memory_gib"]:
        stage["memory_saved"] = 1 - with_["peak_memory_gib"] / without["peak_memory_gib"]
    print(f"  checkpointing at batch {size}: {1000 * without['step_seconds']:.0f} -> {1000 * with_['step_seconds']:.0f} "
          f"ms/step, peak {_number(without['peak_memory_gib'], '{:.1f}')} -> "
          f"{_number(with_['peak_memory_gib'], '{:.1f}')} GB", flush=True)


def stage_cli(settings: Settings, report: Report, budget: Budget, folder: Path):
    "stereo-kit train, eval and predict as a user runs them, each in its own process; each must have used the GPU."
    from stereo_kit.config import load_config
    from stereo_kit.io import read_disparity, read_image
    stage = report.stage("cli")
    config = load_config(ROOT / "configs/train/quickstart.json")
    config["train"] = {**config.get("train", {}), "mixed_precision_dtype": "bf16"}
    config["eval"]["datasets"] = [{**entry, "path": str(ROOT / entry["path"]), "max_samples": 1}
                                  for entry in config["eval"]["datasets"]][: 1 if settings.dry_run else None]
    if settings.dry_run: config["data"]["image_sizes"] = [[settings.width, settings.height]]
    config_file, workspace = folder / "quickstart_check.json", folder / "cli_run"
    config_file.write_text(json.dumps(config, indent=2))
    left = sorted((ROOT / "data_samples/middlebury_motorcycle/left/rgb").iterdir())[0]
    right = ROOT / "data_samples/middlebury_motorcycle/right/rgb" / left.name
    checkpoint = workspace / "checkpoint" / f"{settings.cli_steps:08d}.pt"
    output = folder / "predicted.pfm"
    commands = {
        "train": ["train", "--config", str(config_file), "--workspace", str(workspace), "--enable_mlflow", "false",
                  "--num_iterations", str(settings.cli_steps), "--batch_size_forward", "2", "--log_every", "1",
                  "--save_every", "0", "--enable_mixed_precision", "true" if _cuda() else "false"],
        "eval": ["eval", "--checkpoint", str(checkpoint), "--config", str(config_file), "--json", "--no-sgbm"],
        "predict": ["predict", "--checkpoint", str(checkpoint), str(left), str(right), "--output", str(output)],
    }
    for name, arguments in commands.items():
        result, done = run_child(["--cli", *arguments], max(120.0, budget.left("cli")), folder, f"cli_{name}")
        stage[name] = {"command": "stereo-kit " + " ".join(arguments), **done, **(result or {})}
        if done["returncode"] != 0:
            raise RuntimeError(f"stereo-kit {name} exited with {done['returncode']}:\n{done['log_tail']}")
        if _cuda() and not (result or {}).get("cuda_peak_mib"):
            raise RuntimeError(f"stereo-kit {name} did not use the GPU (no CUDA memory allocated)")
        print(f"  stereo-kit {name}: {done['seconds']:.1f} s, peak CUDA memory "
              f"{_number((result or {}).get('cuda_peak_mib'), '{:.0f}')} MiB", flush=True)
    model_row = json.loads(stage["eval"]["stdout"])[checkpoint.name]
    if not all(math.isfinite(metrics["epe"]) and metrics["images"] == 1 for metrics in model_row.values()):
        raise RuntimeError(f"stereo-kit eval: unexpected scores {model_row}")
    stage["eval"]["scores"] = model_row
    disparity, _ = read_disparity(output)
    if disparity.shape != read_image(left).shape[:2]:
        raise RuntimeError(f"stereo-kit predict wrote a {disparity.shape} disparity for a {read_image(left).shape} image")
    if not _cuda(): stage["note"] = "no CUDA here: the commands ran on the CPU"


def cli_child(arguments: list[str]) -> int:
    "Run `stereo-kit ARGUMENTS` in this process, then print its peak CUDA memory as the child's result."
    import torch
    from stereo_kit.cli import main
    code, printed = 0, io.StringIO()
    try:
        with contextlib.redirect_stdout(printed): main.main(arguments, prog_name="stereo-kit", standalone_mode=True)
    except SystemExit as exit: code = exit.code or 0
    finally:
        print(printed.getvalue(), flush=True)
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        print(CHILD_MARK + json.dumps({"cuda_peak_mib": peak, "stdout": printed.getvalue()[-20000:]}), flush=True)
    return code if isinstance(code, int) else 1


# ---------------------------------------------------------------------------------------------------------------
# targets and the whole check

def judge(report: Report):
    "Each target: wanted, measured, met (None when not measured, or on the dry run's CPU figures)."
    stages, targets, dry = report.data["stages"], {}, report.data["dry_run"]
    main = report.data["settings"]["main_preset"]
    def verdict(ok: bool | None): return None if ok is None or dry else bool(ok)
    fp32, bf16 = _baseline(report, main, "fp32"), _baseline(report, main, "bf16")
    if fp32 and bf16:
        ratio = bf16["samples_per_second"] / fp32["samples_per_second"]
        targets["bf16_speedup"] = {"wanted": f">= {TARGETS['bf16_speedup']}x fp32 samples/s ({main})",
                                   "measured": f"{ratio:.2f}x", "value": ratio,
                                   "met": verdict(ratio >= TARGETS["bf16_speedup"])}
    waits = [(run["data_wait_fraction"], f"{run['preset']} {run['precision']}")
             for run in stages["train"].get("runs", []) if "data_wait_fraction" in run]
    if waits:
        worst, where = max(waits)
        targets["data_wait"] = {"wanted": f"< {100 * TARGETS['data_wait_fraction']:.0f} % of step time "
                                          f"({report.data['settings']['workers']} workers)",
                                "measured": f"{100 * worst:.1f} % (worst: {where})", "value": worst,
                                "met": verdict(worst < TARGETS["data_wait_fraction"])}
    checkpointing = stages["checkpointing"]
    if "memory_saved" in checkpointing:
        saved = checkpointing["memory_saved"]
        targets["checkpointing_memory"] = {"wanted": f">= {100 * TARGETS['checkpointing_memory_saved']:.0f} % less peak "
                                                     "memory", "measured": f"{100 * saved:.0f} % less", "value": saved,
                                           "met": verdict(saved >= TARGETS["checkpointing_memory_saved"])}
    if "time_ratio" in checkpointing:
        ratio = checkpointing["time_ratio"]
        targets["checkpointing_time"] = {"wanted": f"<= {TARGETS['checkpointing_time_ratio']}x step time",
                                         "measured": f"{ratio:.2f}x", "value": ratio,
                                         "met": verdict(ratio <= TARGETS["checkpointing_time_ratio"])}
    report.data["targets"] = targets


RUNNERS = {"tests": stage_tests, "train": stage_train, "variants": stage_variants, "checkpointing": stage_checkpointing,
           "cli": stage_cli}


def run_check(settings: Settings, out: Path, stages: list[str], budget_seconds: float) -> int:
    import torch
    report, budget = Report(out, settings, budget_seconds), Budget(budget_seconds)
    mode = "DRY RUN on the CPU" if settings.dry_run else report.data["environment"]["device"]
    print(f"stereo_kit GPU check: {mode}; stages {', '.join(stages)}; budget {budget_seconds:.0f} s; results in {out}",
          flush=True)
    if not settings.dry_run and not torch.cuda.is_available():
        report.data.update(status="failed", error="no CUDA device: run with --dry-run on a machine without a GPU")
        report.save()
        print(report.data["error"], file=sys.stderr)
        return 1
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        for name in STAGES:
            stage = report.stage(name)
            if name not in stages: stage["status"] = "skipped (not asked for with --stages)"; continue
            if failed: stage["status"] = "not run: an earlier stage failed"; continue
            print(f"== {name}", flush=True)
            started = time.perf_counter()
            stage["status"] = "running"
            try:
                RUNNERS[name](settings, report, budget, Path(scratch))
                stage["status"] = "passed"
            except Exception as error:
                failed = True
                stage.update(status="failed", error=f"{type(error).__name__}: {str(error)[:2000]}",
                             traceback=traceback.format_exc()[-6000:])
                traceback.print_exc()
            stage["seconds"] = round(time.perf_counter() - started, 1)
            judge(report)
            report.save()
    report.data["status"] = "failed" if failed else "passed"
    report.save()
    print("\n" + table(report.data), flush=True)
    return 1 if failed else 0


def quiet():
    "No progress bars from transformers (writing and loading the DINOv2 folder) in the check's output."
    from transformers.utils import logging
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu_check.json and gpu_check.md (default: $OUT if set, else workspace/gpu_check)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, 64×96, 2 steps: every stage once")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (default 450 on a GPU, 1200 for the dry run); each stage "
                             "may use its cumulative share; items that would not fit are skipped and say so")
    parser.add_argument("--presets", default=None, help="comma-separated presets for the train stage (default "
                                                        "small,base,large; large only while the time allows)")
    parser.add_argument("--child-run", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cli", nargs=argparse.REMAINDER, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:      # one thread per process (children inherit it): on a busy 2-core CPU, two make steps 10x slower
        os.environ.update({"OMP_NUM_THREADS": "1", HIDE_VARIABLE: ",".join(DEVICE_LACKS)})
    for name in filter(None, os.environ.get(HIDE_VARIABLE, "").split(",")):
        sys.modules[name] = None          # `import name` raises ImportError, as on the GPU image
    quiet()
    if args.cli is not None: sys.exit(cli_child(args.cli))
    warnings.simplefilter("ignore")
    if args.child_run is not None:
        result = child_train_run(args.child_run)
        print(CHILD_MARK + json.dumps(result, default=str), flush=True)
        return
    settings = DRY_RUN if args.dry_run else Settings()
    if args.presets:
        presets = tuple(args.presets.split(","))
        settings = replace(settings, presets=presets, main_preset=settings.main_preset if settings.main_preset in
                           presets else presets[0])
    stages = [name.strip() for name in args.stages.split(",") if name.strip()]
    if unknown := [name for name in stages if name not in STAGES]: parser.error(f"--stages: unknown {unknown}; of {STAGES}")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "workspace/gpu_check")
    budget = args.budget or (1200.0 if settings.dry_run else 450.0)
    sys.exit(run_check(settings, out.resolve(), stages, budget))


if __name__ == "__main__":
    main()
