"""ONNX on the CPU against PyTorch eager: latency per pair and peak memory for the tiny and small presets at 320×256
and 640×480 (width×height), with 1 and 2 threads, side by side in one run.

    python benchmarks/export.py [--repeats 5] [--presets tiny small] [--sizes 320x256 640x480] [--threads 1 2]

Each preset is exported once per size with `stereo_kit.export.to_onnx`, and the export's own check against PyTorch is
printed. The weights are random (seed 0): latency and memory do not depend on their values. The small preset's
DINOv2 is built with vit_trainable true, since the config layer refuses a frozen DINOv2 with random weights.
Every measurement runs in a fresh process, so a peak memory (VmHWM) belongs to one runtime alone. One process
holds PyTorch and the model. The other holds onnxruntime and the file and never imports torch, as a deployment
would. Latency is the fastest of --repeats timed runs after one warm-up run, at the preset's valid_iters
(tiny 8, small 16). On a machine shared with other work, the fastest run is the one least disturbed; the load
average is printed with the table. With as many threads as cores, a busy machine slows both runtimes by more
than their own difference.

Target: onnxruntime is not slower than PyTorch eager at the same thread count, that is eager / onnxruntime >= 1.0,
in every row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

PRESETS = {"tiny": {"preset": "tiny"}, "small": {"preset": "small", "vit_trainable": True}}


def memory_mib() -> dict[str, float]:
    "This process's resident memory now (VmRSS) and at its peak (VmHWM), MiB (Linux)."
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def worker(args):
    "One runtime in this process: load, warm up, time `repeats` runs; print latency and memory as JSON."
    import numpy as np
    pair, (threads,) = np.load(args.pair), args.threads
    left, right = pair["left"], pair["right"]
    if args.worker == "eager":
        import torch
        from stereo_kit.models import load_weights
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_weights(args.model).eval()
        left, right = torch.from_numpy(left), torch.from_numpy(right)
        def run():
            with torch.inference_mode(): model(left, right)
    else:
        from stereo_kit.export import OnnxStereo
        runtime = OnnxStereo(args.model, threads=threads)
        run = lambda: runtime.run(left, right)
    loaded = memory_mib()["VmRSS"]
    run()                                                               # warm-up: allocations, onnxruntime's arenas
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"latency_s": min(times), "loaded_mib": loaded, "peak_mib": memory_mib()["VmHWM"],
                      "torch_imported": "torch" in sys.modules}))


def measure(kind: str, model: Path, pair: Path, threads: int, repeats: int) -> dict:
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--pair", str(pair),
               "--threads", str(threads), "--repeats", str(repeats)]
    run = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=3600)
    if run.returncode: raise RuntimeError(f"{kind} worker failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def export_models(presets, sizes, folder: Path) -> dict:
    "Weights file, ONNX file and check pair of each (preset, size)."
    import numpy as np
    import torch
    from stereo_kit.export import _as_batch, to_onnx, verification_pair
    from stereo_kit.models import build_model, save_weights
    exported = {}
    for preset in presets:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                          # "random DINOv2 weights": on purpose here
            model = build_model(PRESETS[preset])
        weights = folder / f"{preset}.pt"
        save_weights(weights, model)
        for width, height in sizes:
            left, right = verification_pair(height, width, model.config["max_disp"])
            pair = folder / f"{preset}_{width}x{height}.npz"
            np.savez(pair, left=_as_batch(left), right=_as_batch(right))
            report = to_onnx(model, folder / f"{preset}_{width}x{height}.onnx", height, width, pair=(left, right))
            print(f"{preset} {width}×{height}: {report}".replace(str(folder) + "/", ""), flush=True)
            exported[preset, (width, height)] = weights, report.path, pair
    return exported


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=list(PRESETS))
    parser.add_argument("--sizes", nargs="+", default=["320x256", "640x480"], help="width x height")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=["eager", "onnx"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker: return worker(args)

    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        exported = export_models(args.presets, sizes, Path(folder))
        print()
        for (preset, (width, height)), (weights, onnx_file, pair) in exported.items():
            for threads in args.threads:
                eager = measure("eager", weights, pair, threads, args.repeats)
                onnx = measure("onnx", onnx_file, pair, threads, args.repeats)
                assert not onnx["torch_imported"], "the onnxruntime process imported torch"
                rows.append((preset, f"{width}×{height}", threads, eager, onnx))
                print(f"measured {preset} {width}×{height} with {threads} thread(s)", flush=True)

    print(f"\nlatency per pair (fastest of {args.repeats}) and peak resident memory; eager = PyTorch "
          f"{__import__('torch').__version__}, onnxruntime {__import__('onnxruntime').__version__} CPU; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (1 min) at the end\n")
    print(f"{'preset':7s} {'W×H':8s} {'threads':>7s} {'eager ms':>9s} {'onnx ms':>9s} {'eager/onnx':>10s} "
          f"{'eager peak MiB':>14s} {'onnx peak MiB':>13s}")
    met = True
    for preset, size, threads, eager, onnx in rows:
        ratio = eager["latency_s"] / onnx["latency_s"]
        met &= ratio >= 1.0
        memory = [f"{m['peak_mib']:.0f} (+{m['peak_mib'] - m['loaded_mib']:.0f})" for m in (eager, onnx)]
        print(f"{preset:7s} {size:8s} {threads:7d} {1000 * eager['latency_s']:9.0f} {1000 * onnx['latency_s']:9.0f} "
              f"{ratio:10.2f} {memory[0]:>14s} {memory[1]:>13s}")
    print("\n(+N): the part of the peak reached while running, above the process after loading its model")
    print(f"target (onnxruntime not slower than PyTorch eager in every row): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
