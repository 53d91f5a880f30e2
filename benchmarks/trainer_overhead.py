"""What the trainer costs on top of the training itself: `Trainer.fit()` steps/s beside a bare PyTorch loop.

    python benchmarks/trainer_overhead.py [--steps 30] [--repeats 3] [--batch-size 2] [--size 128x96] [--threads 1]

One model config (the tiny preset, `train_iters` 4), one set of batches: `--warmup` + `--steps` batches of
`data_samples` crops (`--size`, W×H) are read once with `build_dataloader` and kept in memory; every loop below is fed
from that list, in the same order, so data loading costs nothing anywhere. Three loops, each `--repeats` times,
interleaved (the order rotates every repeat, so a machine that speeds up or slows down favours no one):

* bare loop: `model.train()`; per step forward, the configured `StereoLoss`, backward,
  `torch.nn.utils.clip_grad_norm_(clip_grad_norm)`, `optimizer.step()` (AdamW, `build_optimizer`),
  `zero_grad(set_to_none=True)`, `scheduler.step()` (`build_scheduler`), EMA `update_parameters` — the same model,
  optimizer, schedule, loss, clipping and EMA the trainer builds, with plain PyTorch and nothing else;
* `Trainer.train_step`: the trainer's step (accelerate's `accumulate`/`backward`/`clip_grad_norm_`, the non-finite
  check and its all-process agreement, EMA, counters, float() of the loss terms) called in a plain loop;
* `Trainer.fit()`: the whole loop — the step, the progress bar (written to a discarded stream), the log window, a log
  row every `--log-every` steps (default 10, far more often than the spec's 500), the stop-signal check. The data
  stream `fit()` builds is replaced by the preloaded list. MLflow off, no visualisation, no eval, no save inside the
  timed steps (`save_every 0`; the final save comes after the last timed step), gradient checkpointing off in every
  loop.

Each loop runs `--warmup` untimed steps first (allocations), then times `--steps` steps, from the end of the last
warm-up step to the end of the last step (for `fit()`, the loop's own work between steps is inside that window).
Steps/s per repeat and the best of the repeats are printed; overhead = the extra time per step, (bare steps/s) /
(trainer steps/s) - 1, best against best. Target: overhead ≤ 3 %.

CPU only here, and the machine is a shared 2-core VM: single runs vary by several percent, so compare the best of
`--repeats 3` or more, and read an overhead within ±3 % as "no measurable overhead" rather than as a precise number.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import stereo_kit.train.trainer as trainer_module
from stereo_kit.config import resolve_config
from stereo_kit.data.loader import DataStats, build_dataloader
from stereo_kit.losses import build_loss
from stereo_kit.models import build_model
from stereo_kit.train.trainer import Trainer
from stereo_kit.train.utils import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.03


def make_config(width: int, height: int) -> dict:
    return {"model": {"preset": "tiny"},
            "data": {"datasets": [{"name": "samples", "path": str(ROOT / "data_samples")}],
                     "image_sizes": [[width, height]], "max_disparity": 64, "num_workers": 0, "index_cache": None},
            "loss": {"stereo": {"disparity_l1": {"function": "disparity_l1_loss", "weight": 1.0},
                                "multi_scale": {"function": "multi_scale_loss", "weight": 0.3,
                                                "params": {"weights": [0.5, 0.7, 1.0], "loss_type": "smooth_l1"}}}},
            "eval": {"datasets": []}}


class Preloaded:
    "Stands for the trainer's data stream: the preloaded batches in order, and the `stats` the log rows read."
    def __init__(self, batches: list[dict]): self.batches, self.stats = batches, DataStats()
    def __iter__(self): return iter(self.batches)


def rate(stamps: list[float], warmup: int) -> float:
    "Steps/s from the end of the last warm-up step to the end of the last step."
    return (len(stamps) - warmup) / (stamps[-1] - stamps[warmup - 1])


def bare_loop(config: dict, batches: list[dict], warmup: int, seed: int = 0) -> float:
    resolved = resolve_config(config)
    torch.manual_seed(seed)
    model = build_model(resolved.model)
    optimizer = build_optimizer(model, resolved.optimizer)
    scheduler = build_scheduler(optimizer, resolved.lr_scheduler, len(batches))
    loss = build_loss(resolved.loss, max_disparity=resolved.data.max_disparity)
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(resolved.ema_decay), use_buffers=True)
    max_norm = resolved.clip_grad_norm or float("inf")
    model.train()
    stamps = []
    for batch in batches:
        predictions = model(batch["left"], batch["right"])
        total, _ = loss(predictions, batch["disparity"], batch["valid"], batch["label_type"], left=batch["left"])
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema.update_parameters(model)
        stamps.append(time.perf_counter())
    return rate(stamps, warmup)


def options(batch_size: int, steps: int, log_every: int) -> dict:
    return dict(num_iterations=steps, batch_size_forward=batch_size, enable_gradient_checkpointing=False,
                enable_mlflow=False, save_every=0, log_every=log_every, vis_every=0)


def train_step_loop(config: dict, batches: list[dict], warmup: int, batch_size: int, log_every: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, Path(folder) / "run", **options(batch_size, len(batches), log_every)).build()
        stream, stamps = iter(batches), []
        for _ in batches:
            trainer.train_step(stream)
            stamps.append(time.perf_counter())
    return rate(stamps, warmup)


def fit_loop(config: dict, batches: list[dict], warmup: int, batch_size: int, log_every: int) -> float:
    original, stamps = trainer_module.build_dataloader, []
    trainer_module.build_dataloader = lambda *args, **kwargs: Preloaded(batches)
    try:
        with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stderr(io.StringIO()):
            trainer = Trainer(config, Path(folder) / "run", **options(batch_size, len(batches), log_every))
            def timed_step(stream):
                result = Trainer.train_step(trainer, stream)
                stamps.append(time.perf_counter())
                return result
            trainer.train_step = timed_step
            trainer.fit()
    finally:
        trainer_module.build_dataloader = original
    assert len(stamps) == len(batches) and trainer.step == len(batches) and trainer.skipped_steps == 0
    return rate(stamps, warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    parser.add_argument("--repeats", type=int, default=3, help="times each loop is run, interleaved")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each loop")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", default="128x96", help="crop W×H, multiples of 32")
    parser.add_argument("--log-every", type=int, default=10, help="fit(): a log row every this many steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadiest on a shared machine; two processes' threads fighting over "
                             "2 cores make steps several times slower and erratic)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    config = make_config(width, height)
    stream = iter(build_dataloader(config, args.batch_size, seed=0, num_workers=0))
    batches = [next(stream) for _ in range(args.warmup + args.steps)]

    loops = {"bare loop": lambda: bare_loop(config, batches, args.warmup),
             "Trainer.train_step": lambda: train_step_loop(config, batches, args.warmup, args.batch_size, args.log_every),
             "Trainer.fit": lambda: fit_loop(config, batches, args.warmup, args.batch_size, args.log_every)}
    names, rates = list(loops), {name: [] for name in loops}
    print(f"tiny preset, {width}×{height}, batch {args.batch_size}, {args.steps} timed steps (+{args.warmup} warm-up), "
          f"{args.repeats} interleaved repeats, {torch.get_num_threads()} torch threads, CPU")
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order: rates[name].append(loops[name]())
        print(f"  repeat {repeat + 1}: " + ", ".join(f"{name} {rates[name][-1]:.2f}" for name in names) + " steps/s")

    bare = max(rates["bare loop"])
    print(f"\n{'loop':20s} {'best steps/s':>12s} {'median':>8s} {'overhead (best)':>16s}")
    for name in names:
        best, overhead = max(rates[name]), bare / max(rates[name]) - 1
        print(f"{name:20s} {best:12.2f} {statistics.median(rates[name]):8.2f} "
              f"{'-' if name == 'bare loop' else f'{100 * overhead:+.1f} %':>16s}")
    overhead = bare / max(rates["Trainer.fit"]) - 1
    verdict = "met" if overhead <= TARGET else "NOT met"
    print(f"\ntarget: Trainer.fit time per step at most {100 * TARGET:.0f} % above the bare loop's: {verdict} "
          f"({100 * overhead:+.1f} %)")


if __name__ == "__main__":
    main()
