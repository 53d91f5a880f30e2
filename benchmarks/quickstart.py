"""The quickstart, measured on this machine: README (a)'s training command end to end, its step time on a busy
machine, and the learning curves of the recipe against the alternatives it was chosen over.

    python benchmarks/quickstart.py                     # README (a) as written there: wall clock, the table, targets
    python benchmarks/quickstart.py --busy              # step time alone, then beside one CPU-bound process
    python benchmarks/quickstart.py --curves [NAME ...] # EPE on data_samples against minutes, per recipe (RECIPES)

Targets (issue: "a quickstart that really learns"):
* README (a)'s command, evaluation included, finishes in <= 10 minutes of wall clock;
* its EMA model beats OpenCV's StereoSGBM on both EPE and bad-2 on every `data_samples` set (it never trains on them:
  the quickstart trains on rendered scenes only, from random initialisation);
* `--busy`: a step beside one CPU-bound process (a busy loop, as another user's job would be) takes at most 2.5x the
  step alone.

`--curves` trains each recipe for its number of steps with an evaluation every `--eval_every` steps and writes
`benchmarks/results/quickstart_recipes.json` (the notebook `nbs/08b_quickstart.ipynb` plots it). Recipes may train
side by side (`--parallel 2`, the cores shared out between them): each evaluation is kept by step, and its minutes are
the step times the recipe's own seconds per step, measured afterwards alone on the machine, so the curves compare the
recipes as a user would run them, one at a time.
Run it on a quiet machine: every figure here is wall clock.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quickstart_recipes.json"     # and quickstart_readme.json, _busy.json
QUICKSTART = ROOT / "configs" / "train" / "quickstart.json"
TARGET_MINUTES, TARGET_BUSY_RATIO = 10.0, 2.5

# name -> (what differs from configs/train/quickstart.json, as dotted-key overrides; batch size; steps of training),
# None: as in the config and README (a)
NO_REFINEMENT = {"model.refine_radius": 0, "model.refine_propagate": 0, "loss.stereo.multi_scale.params.weights": [0.5, 1.0]}
RECIPES = {
    "quickstart": ({}, None, None),                                # configs/train/quickstart.json, README (a)'s steps
    "no propagation": ({"model.refine_propagate": 0}, None, None), # the refinement searches ±4 px around the estimate only
    "no refinement": (NO_REFINEMENT, None, None),                  # 1/4 resolution, upsampled
}


# ------------------------------------------------------------------------------------------------- README (a)
def readme_command() -> list[str]:
    "README (a)'s `stereo-kit train ...` command, as a user would copy it (continuation lines joined)."
    text = (ROOT / "README.md").read_text()
    block = next(block for block in re.findall(r"```bash\n(.*?)```", text, re.S) if "configs/train/quickstart.json" in block
                 and "stereo-kit train" in block)
    joined = re.sub(r"\\\n\s*", " ", block)
    line = next(line for line in joined.splitlines() if "stereo-kit train" in line)
    command = line[line.index("stereo-kit train"):]
    return shlex.split(command.split("#")[0])


def parse_table(output: str) -> dict[str, dict[str, dict[str, float]]]:
    "The final evaluation table of `stereo-kit train`'s output: {method: {dataset: {'epe': .., 'bad2': ..}}}."
    table = output[output.rindex("evaluation:"):]
    rows = {}
    for line in table.splitlines()[2:]:
        match = re.match(r"(model \(EMA\)|model|StereoSGBM)\s+(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)
        if match:
            method, dataset, _, epe, _, bad2 = match.groups()
            rows.setdefault(method, {})[dataset] = {"epe": float(epe), "bad2": float(bad2)}
    return rows


def verdict(table: dict) -> dict[str, bool]:
    "Per dataset: does the model beat StereoSGBM on both EPE and bad-2?"
    model = next(rows for method, rows in table.items() if method.startswith("model"))
    sgbm = table["StereoSGBM"]
    return {name: model[name]["epe"] < sgbm[name]["epe"] and model[name]["bad2"] < sgbm[name]["bad2"] for name in sgbm}


def run_readme(workspace: Path) -> dict:
    command = readme_command()
    command[command.index("--workspace") + 1] = str(workspace)
    print("README (a):", " ".join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    minutes = (time.perf_counter() - started) / 60
    if result.returncode != 0:
        sys.exit(f"README (a) failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    table = parse_table(result.stdout)
    table_start = result.stdout.rindex("evaluation:")
    table_start = result.stdout.rfind("\n", 0, table_start) + 1            # the line "step N evaluation:"
    bar = [line for line in re.split(r"[\r\n]", result.stderr) if line.startswith("train: 100%")]
    tail = "\n".join(bar[-1:] + [result.stdout[table_start:].strip()])
    print(tail)
    beaten = verdict(table)
    print(f"\nwall clock, evaluation included: {minutes:.1f} min (target <= {TARGET_MINUTES:g}): "
          f"{'met' if minutes <= TARGET_MINUTES else 'NOT met'}")
    for name, ok in beaten.items():
        model = next(rows for method, rows in table.items() if method.startswith("model"))[name]
        sgbm = table["StereoSGBM"][name]
        print(f"{name:24s} EPE {model['epe']:.3f} vs SGBM {sgbm['epe']:.3f} (x{model['epe'] / sgbm['epe']:.2f}), bad-2 "
              f"{model['bad2']:.2f} % vs {sgbm['bad2']:.2f} %: {'better on both' if ok else 'NOT better on both'}")
    print(f"target (better than StereoSGBM on EPE and bad-2 on every set): {'met' if all(beaten.values()) else 'NOT met'}")
    return {"command": " ".join(command), "minutes": minutes, "table": table, "beaten": beaten, "output": tail.strip()}


# ------------------------------------------------------------------------------------------------- step times
def child_step_times(steps: int, warmup: int, overrides: dict, batch: int | None, threads: int | None) -> dict:
    "Run in a fresh process: the quickstart trainer for `warmup` + `steps` steps; seconds per step after warm-up."
    from stereo_kit.train.options import prepare_cpu_environment
    prepare_cpu_environment()                                  # what `stereo-kit train` does before importing torch
    import torch
    if threads: torch.set_num_threads(threads)
    from stereo_kit.train.trainer import Trainer
    config = with_overrides(json.loads(QUICKSTART.read_text()), overrides)
    config["eval"]["datasets"] = []
    marks = []

    class Clock:
        def on_log(self, trainer, row): marks.append(time.perf_counter())
        def on_vis(self, trainer, paths): pass
        def on_eval(self, trainer, results): pass

    options = dict(num_iterations=warmup + steps, log_every=1, save_every=0, enable_mlflow=False, enable_ema=True,
                   enable_gradient_checkpointing=False)
    if batch: options["batch_size_forward"] = batch
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, Path(folder) / "run", callbacks=[Clock()], **options)
        trainer.fit()
    seconds = [b - a for a, b in zip(marks[warmup - 1:], marks[warmup:])]
    return {"median": statistics.median(seconds), "seconds": seconds, "threads": torch.get_num_threads(),
            "workers": trainer.batches.num_workers}


def step_times(steps: int, warmup: int, overrides: dict | None = None, batch: int | None = None,
               threads: int | None = None) -> dict:
    "`child_step_times` in a subprocess (a fresh process, as `stereo-kit train` starts)."
    arguments = [sys.executable, __file__, "--child", json.dumps({"steps": steps, "warmup": warmup, "batch": batch,
                                                                     "overrides": overrides or {}, "threads": threads})]
    result = subprocess.run(arguments, cwd=ROOT, capture_output=True, text=True)
    if result.returncode: sys.exit(f"step timing failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_busy(steps: int, warmup: int) -> dict:
    alone = step_times(steps, warmup)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])          # one CPU-bound process, all the time
    try: busy = step_times(steps, warmup)
    finally: hog.kill(); hog.wait()
    ratio = busy["median"] / alone["median"]
    print(f"quickstart step, median of {steps} after {warmup} warm-up steps ({alone['threads']} torch thread(s), "
          f"{alone['workers']} loader worker(s)):")
    print(f"  alone:                          {alone['median']:.3f} s")
    print(f"  beside one CPU-bound process:   {busy['median']:.3f} s")
    print(f"  ratio {ratio:.2f} (target <= {TARGET_BUSY_RATIO:g}): {'met' if ratio <= TARGET_BUSY_RATIO else 'NOT met'}")
    return {"alone": alone, "busy": busy, "ratio": ratio}


# ------------------------------------------------------------------------------------------------- recipes
def with_overrides(config: dict, overrides: dict) -> dict:
    "Set dotted keys (`data.datasets.0.options.size`) of `config` to their values."
    for key, value in overrides.items():
        node, parts = config, key.split(".")
        for part in parts[:-1]: node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value
    return config


def readme_steps() -> int:
    "README (a)'s `--num_iterations`."
    command = readme_command()
    return int(command[command.index("--num_iterations") + 1])


def child_curve(name: str, eval_every: int, threads: int | None = None) -> dict:
    "Run in a fresh process: train recipe `name` with an evaluation every `eval_every` steps; EPE and bad-2 by step."
    overrides, batch, steps = RECIPES[name]
    steps = steps or readme_steps()
    from stereo_kit.train.options import prepare_cpu_environment
    prepare_cpu_environment()
    import torch
    if threads: torch.set_num_threads(threads)
    from stereo_kit.train.trainer import Trainer
    config = with_overrides(json.loads(QUICKSTART.read_text()), overrides)
    config["eval"]["every"] = eval_every
    for entry in config["eval"]["datasets"]: entry["path"] = str(ROOT / entry["path"])
    points = []

    class Recorder:
        def on_log(self, trainer, row): pass
        def on_vis(self, trainer, paths): pass
        def on_eval(self, trainer, results):
            if points and points[-1]["step"] == trainer.step: return        # fit()'s closing evaluation, again
            points.append({"step": trainer.step,
                           **{dataset: {"epe": m["epe"], "bad2": m["bad2"]} for dataset, m in results.items()}})

    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, Path(folder) / "run", callbacks=[Recorder()], num_iterations=steps, log_every=50,
                          save_every=0, enable_mlflow=False, enable_gradient_checkpointing=False,
                          **({"batch_size_forward": batch} if batch else {}))
        trainer.fit()
    return {"name": name, "overrides": overrides, "batch": trainer.options.batch_size_forward, "steps": steps,
            "points": points}


def run_curves(names: list[str], eval_every: int, parallel: int = 1) -> dict:
    "Each recipe in a fresh process, `parallel` at a time; then each one's step time alone; the curves in `RESULTS`."
    curves, threads = {}, max(1, (os.cpu_count() or 1) // parallel)
    for start in range(0, len(names), parallel):
        group = names[start:start + parallel]
        children = {name: subprocess.Popen([sys.executable, __file__, "--curve-child", name, "--eval_every",
                                            str(eval_every), "--threads", str(threads)], cwd=ROOT,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for name in group}
        for name, child in children.items():
            print(f"recipe {name}: {RECIPES[name]}", flush=True)
            out, err = child.communicate()
            if child.returncode: sys.exit(f"recipe {name} failed:\n{err[-3000:]}")
            curves[name] = json.loads(out.strip().splitlines()[-1])
    for name, curve in curves.items():                    # minutes as a user would see them: the recipe alone
        overrides, batch, _ = RECIPES[name]
        seconds = step_times(10, 3, overrides, batch)["median"]
        curve["seconds_per_step"] = seconds
        for point in curve["points"]: point["minutes"] = point["step"] * seconds / 60
        last = curve["points"][-1]
        print(f"{name}: {seconds:.2f} s/step alone; {last['minutes']:.1f} min, step {last['step']}: " + ", ".join(
            f"{dataset} EPE {m['epe']:.2f} bad-2 {m['bad2']:.1f} %" for dataset, m in last.items() if isinstance(m, dict)),
            flush=True)
    return curves


def save_result(name: str, result: dict):
    "Keep a measurement for the notebook (`benchmarks/results/quickstart_<name>.json`), with where it was taken."
    import platform
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    path = RESULTS.parent / f"quickstart_{name}.json"
    result = {"measured": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
              **result}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {path.relative_to(ROOT)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", action="store_true", help="step time alone and beside one CPU-bound process")
    parser.add_argument("--curves", nargs="*", default=None, help="recipes to train (default: all of RECIPES)")
    parser.add_argument("--workspace", default="workspace/benchmark_quickstart")
    parser.add_argument("--steps", type=int, default=20, help="--busy: timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="--busy: untimed steps first")
    parser.add_argument("--eval_every", type=int, default=200, help="--curves: steps between evaluations")
    parser.add_argument("--parallel", type=int, default=1, help="--curves: recipes trained side by side")
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--curve-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        request = json.loads(args.child)
        print(json.dumps(child_step_times(request["steps"], request["warmup"], request["overrides"], request["batch"],
                                          request["threads"])))
    elif args.curve_child is not None:
        print(json.dumps(child_curve(args.curve_child, args.eval_every, args.threads)))
    elif args.busy:
        save_result("busy", run_busy(args.steps, args.warmup))
    elif args.curves is not None:
        measured = run_curves(args.curves or list(RECIPES), args.eval_every, args.parallel)
        kept = json.loads(RESULTS.read_text())["recipes"] if RESULTS.exists() else {}   # curves not rerun stay
        save_result("recipes", {"recipes": {name: curve for name, curve in {**kept, **measured}.items() if name in RECIPES}})
    else:
        workspace = Path(args.workspace)
        if workspace.exists():
            import shutil
            shutil.rmtree(workspace)                       # a fresh run every time: the numbers are the recipe's
        save_result("readme", run_readme(workspace))


if __name__ == "__main__":
    main()
