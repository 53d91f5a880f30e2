"""How fast the widgets answer a slider: the AugmentationInspector's kernel-side redraw against the bare work it must
do (the training pipeline's `augment` twice — with and without the image ops — and encoding the four changed panels),
and the DisparityViewer's redraw against encoding its six panels, measured side by side in one run.

    python benchmarks/widget_redraw.py [--repeats 30]

Targets: a redraw within 100 ms on a 448×320 Middlebury crop (interactive), and at most 1.5× the bare work (the
widget adds little beyond what it must compute). The browser's slider-to-redraw latency, which adds the round trip
and the image decode, is measured by tests/test_browser.py.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def timed(function, repeats: int) -> float:
    "Median seconds of `function()` over `repeats` calls (after one warm-up)."
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import cv2
    from stereo_kit.config import AugmentationConfig
    from stereo_kit.data.augment import augment, stereo_agreement
    from stereo_kit.viz import colorize_disparity
    from stereo_kit.widgets import AugmentationInspector, DisparityViewer, encode_image, warp_check
    cv2.setNumThreads(1)

    scene = str(ROOT / "data_samples/middlebury_motorcycle")
    inspector = AugmentationInspector({"motorcycle": scene}, size=(320, 240))
    sample = inspector.original()
    settings = inspector.settings()
    params = AugmentationConfig.model_validate({op.name: {**op.params(), "probability": 1.0} for op in inspector.ops})
    seeds = iter(range(1, 10**6))

    def bare_augmentation():
        seed = next(seeds)
        result = augment(dict(sample), np.random.default_rng(seed), (320, 240), settings["image_augmentation"], True, params)
        geometry = augment(dict(sample), np.random.default_rng(seed), (320, 240), [], True, params)
        stereo_agreement(geometry)
        for image in (result["left"], result["right"], colorize_disparity(result["disparity"], result["valid"]),
                      warp_check(geometry["left"], geometry["right"], geometry["disparity"], geometry["valid"])[0]):
            encode_image(image)

    def inspector_redraw(): inspector.seed.value = next(seeds)

    viewer = DisparityViewer(scene, prediction=lambda left, right: cv2.GaussianBlur(sample["disparity"], (0, 0), 3))
    modes = iter(["overlay", "difference"] * (args.repeats + 2))

    def bare_panels():
        for image in viewer.images().values(): encode_image(image)

    def viewer_redraw(): viewer.warp_mode.value = next(modes)

    rows = []
    for name, bare, widget in (("AugmentationInspector", bare_augmentation, inspector_redraw),
                               ("DisparityViewer", bare_panels, viewer_redraw)):
        bare_s, widget_s = timed(bare, args.repeats), timed(widget, args.repeats)
        rows.append((name, bare_s, widget_s))
        print(f"{name:22s} bare work {bare_s * 1000:6.1f} ms · widget redraw {widget_s * 1000:6.1f} ms · "
              f"ratio {widget_s / bare_s:4.2f}")
    fast = all(widget_s <= 0.100 for _, _, widget_s in rows)
    lean = all(widget_s <= 1.5 * bare_s for _, bare_s, widget_s in rows)
    print(f"target redraw <= 100 ms: {'met' if fast else 'NOT met'}; target <= 1.5x the bare work: "
          f"{'met' if lean else 'NOT met'}")


if __name__ == "__main__":
    main()
