"""The quickstart model against the classical matcher: train `configs/train/quickstart.json` (the tiny preset on
procedurally rendered scenes), then score its EMA weights and OpenCV's StereoSGBM on the same `data_samples` images
(real Middlebury crops and rendered scenes the model never saw), side by side, in one run.

    python benchmarks/quickstart.py [--num_iterations 600] [--workspace workspace/benchmark_quickstart]

Target: the model beats StereoSGBM on both EPE and bad-2 on every dataset of the config's eval block.
"""
from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/train/quickstart.json"))
    parser.add_argument("--workspace", default="workspace/benchmark_quickstart")
    parser.add_argument("--num_iterations", type=int, default=600)
    parser.add_argument("--batch_size_forward", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from stereo_kit.train.evaluate import evaluate, format_results, predict_disparity, sgbm_disparity
    from stereo_kit.train.trainer import Trainer

    workspace = Path(args.workspace)
    shutil.rmtree(workspace, ignore_errors=True)            # a fresh run every time: the numbers are the recipe's
    started = time.perf_counter()
    trainer = Trainer(args.config, workspace, num_iterations=args.num_iterations, batch_size_forward=args.batch_size_forward,
                      log_every=max(args.num_iterations // 10, 1), save_every=0, enable_mlflow=False, seed=args.seed,
                      enable_gradient_checkpointing=False)
    trainer.fit()
    minutes = (time.perf_counter() - started) / 60

    datasets, data = trainer.config.eval.datasets, trainer.config.data
    max_disparity = trainer.config.eval.max_disparity or data.max_disparity
    model = trainer.ema.module if trainer.ema is not None else trainer.unwrapped
    results = {"quickstart (EMA)": evaluate(lambda left, right: predict_disparity(model, left, right), datasets, max_disparity),
               "StereoSGBM": evaluate(lambda left, right: sgbm_disparity(left, right, max_disparity), datasets, max_disparity)}
    print(f"\n{args.num_iterations} steps of batch {args.batch_size_forward} in {minutes:.1f} min on this machine\n")
    print(format_results(results))
    model_scores, reference = results.values()
    beaten = {name: model_scores[name]["epe"] < reference[name]["epe"] and model_scores[name]["bad2"] < reference[name]["bad2"]
              for name in reference}
    for name, ok in beaten.items():
        ratio = model_scores[name]["epe"] / reference[name]["epe"]
        print(f"{name:24s} EPE model / SGBM = {ratio:.2f}, bad-2 {model_scores[name]['bad2']:.1f} % vs "
              f"{reference[name]['bad2']:.1f} %: {'better on both' if ok else 'NOT better on both'}")
    print(f"target (better than StereoSGBM on EPE and bad-2 everywhere): {'met' if all(beaten.values()) else 'NOT met'}")


if __name__ == "__main__":
    main()
