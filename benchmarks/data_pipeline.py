"""Data pipeline throughput at 640×480 with every augmentation on, against the bare cost of decoding the same files.

    python benchmarks/data_pipeline.py [--samples 12] [--batches 12] [--batch-size 4] [--repeats 1]

data_samples/ is 448×320, so the benchmark first renders `--samples` scenes at 640×480 with
`stereo_kit.data.synthetic.random_scene` into a temporary folder in the standard layout (JPEG views, 8-bit RGB disparity
PNG, left disparity only — so every horizontal flip derives the right disparity, the costly case). It then measures,
in one run and on the same files:

* bare decode: `read_image` ×2 + `read_disparity`, one process, samples/s;
* the loader with augmentation off (read, crop to 640×480, tensors, collate, hand-over from the workers): what the
  loading machinery alone costs;
* the pipeline (`build_dataloader`, batches of 640×480, every augmentation switched on — at its default probability,
  and again with every probability set to 1, the worst case) with 1 and 2 workers, as processes and as threads,
  samples/s, and per worker as a ratio to the bare decode rate;
* the same with process workers and `batch_image_dtype: "uint8"` (what a GPU trainer would ask for: the training
  process then skips the float32 conversion of the images, which the default batches include).

Target: ratio ≥ 0.5 (the pipeline, per worker, at least half as fast as decoding alone).

The machine is noisy (a shared 2-core VM: single runs of one configuration vary by ±20 %). `--repeats N` measures
every rate N times in a row and prints the best, for the bare decode and the pipeline alike, so the ratio compares
like with like; use it (e.g. `--repeats 3`) when comparing two versions of the code.
"""
import argparse
import tempfile
import time
import warnings
from pathlib import Path

from stereo_kit.io import read_disparity, read_image, write_disparity, write_image
from stereo_kit.data.synthetic import random_scene
from stereo_kit.config import AugmentationConfig
from stereo_kit.data.datasets import find_standard_scenes
from stereo_kit.data.loader import build_dataloader


def render_dataset(root: Path, count: int) -> Path:
    for i in range(count):
        scene = random_scene("planes" if i % 2 else "objects", height=480, width=640, max_disparity=96, seed=100 + i)
        write_image(root / f"left/rgb/{i:04d}.jpg", scene.left)
        write_image(root / f"right/rgb/{i:04d}.jpg", scene.right)
        write_disparity(root / f"left/disparity/{i:04d}.png", scene.disparity_left, "depth_uint8")
    return root


def bare_decode_rate(root: Path, seconds: float = 3.0, repeats: int = 1) -> float:
    samples, rates = find_standard_scenes(root)[0].samples, []
    for _ in range(repeats):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            paths = samples[done % len(samples)]
            read_image(paths.left), read_image(paths.right), read_disparity(paths.disparity)
            done += 1
        rates.append(done / (time.perf_counter() - start))
    return max(rates)


def pipeline_rate(config: dict, batch_size: int, batches: int, workers: int, repeats: int = 1) -> float:
    stream, rates = iter(build_dataloader(config, batch_size, seed=0, num_workers=workers)), []
    for _ in range(2): next(stream)                          # start-up (worker processes) is not throughput
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches): next(stream)
        rates.append(batches * batch_size / (time.perf_counter() - start))
    return max(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="measure each rate this many times; print the best")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as folder:
        root = render_dataset(Path(folder) / "bench", args.samples)
        every_op_always = {name: {"probability": 1.0} for name in AugmentationConfig.model_fields}
        config = {"datasets": [{"name": "bench", "path": str(root), "image_augmentation": AugmentationConfig.ops("image")}],
                  "image_sizes": [[640, 480]], "max_disparity": 192, "stereo_augmentation": True, "index_cache": None}
        print(f"{args.samples} rendered samples, 640×480, batch {args.batch_size}, all augmentations on"
              + (f", best of {args.repeats}" if args.repeats > 1 else ""))
        bare_loader = {**config, "stereo_augmentation": False, "datasets": [{**config["datasets"][0], "image_augmentation": []}]}
        groups = (("no augmentation (read, crop, collate)", {}, bare_loader), ("default probabilities", {}, config),
                  ("every probability 1", every_op_always, config))
        for label, augmentation, group_config in groups:
            decode = bare_decode_rate(root, repeats=args.repeats)   # measured again beside each group: the machine drifts
            print(f"{'bare decode (1 process)':50s} {decode:7.1f} samples/s")
            for worker_type, image_dtype in (("process", "float32"), ("thread", "float32"), ("process", "uint8")):
                for workers in (1, 2):
                    run = {**group_config, "worker_type": worker_type, "augmentation": augmentation,
                           "batch_image_dtype": image_dtype}
                    rate = pipeline_rate(run, args.batch_size, args.batches, workers, args.repeats)
                    name = f"{label}, {workers} {worker_type} worker(s)" + (", uint8" if image_dtype == "uint8" else "")
                    print(f"{name:50s} {rate:7.1f} samples/s   per worker / bare decode = {rate / workers / decode:.2f}")


if __name__ == "__main__":
    main()
