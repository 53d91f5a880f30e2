"""Rebuild `data_samples/`: a tiny real stereo dataset in the FoundationStereo layout.

    python scripts/make_data_samples.py [--out data_samples]

Scenes:
  middlebury_motorcycle  crops and scalings of the Middlebury 2014 pair that scikit-image ships (left disparity only)
  rendered_planes        procedural slanted textured rectangles over a slanted background (both views' disparity)
  rendered_objects       procedural discs and ellipses at several depths (both views' disparity)

Deterministic: the same code gives the same files.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np

from stereo_kit.io import write_disparity, write_image
from stereo_kit.data.synthetic import random_scene

SAMPLE_WIDTH, SAMPLE_HEIGHT = 448, 320
# (scale, x0, y0): scale the full 741×500 pair, then crop SAMPLE_WIDTH×SAMPLE_HEIGHT at (x0, y0)
MIDDLEBURY_CROPS = [(1.0, 0, 90), (1.0, 293, 180), (0.8, 60, 40), (0.66, 24, 4)]


def resize_pair(left, right, disparity, scale):
    "Resize a pair and its disparity by `scale`; disparity values scale too, invalid pixels never mix with valid."
    if scale == 1.0: return left, right, disparity
    size = (round(left.shape[1] * scale), round(left.shape[0] * scale))
    left, right = (cv2.resize(image, size, interpolation=cv2.INTER_AREA) for image in (left, right))
    disparity = cv2.resize(disparity, size, interpolation=cv2.INTER_NEAREST) * (size[0] / disparity.shape[1])
    return left, right, disparity


def write_sample(scene_dir: Path, index: int, left, right, disparity_left, disparity_right=None):
    name = f"{index:04d}"
    write_image(scene_dir / "left/rgb" / f"{name}.jpg", left)
    write_image(scene_dir / "right/rgb" / f"{name}.jpg", right)
    write_disparity(scene_dir / "left/disparity" / f"{name}.png", disparity_left, "depth_uint8")
    if disparity_right is not None:
        write_disparity(scene_dir / "right/disparity" / f"{name}.png", disparity_right, "depth_uint8")


def make_middlebury(scene_dir: Path):
    from skimage.data import stereo_motorcycle
    left, right, disparity = stereo_motorcycle()
    disparity = np.where(np.isfinite(disparity), disparity, 0.0).astype(np.float32)
    for index, (scale, x0, y0) in enumerate(MIDDLEBURY_CROPS):
        scaled = resize_pair(left, right, disparity, scale)
        crop = tuple(array[y0:y0 + SAMPLE_HEIGHT, x0:x0 + SAMPLE_WIDTH] for array in scaled)
        assert crop[0].shape[:2] == (SAMPLE_HEIGHT, SAMPLE_WIDTH), (scale, x0, y0, crop[0].shape)
        write_sample(scene_dir, index, *crop)


def make_rendered(scene_dir: Path, kind: str, seeds):
    for index, seed in enumerate(seeds):
        scene = random_scene(kind, SAMPLE_HEIGHT, SAMPLE_WIDTH, min_disparity=4.0, max_disparity=72.0, seed=seed)
        write_sample(scene_dir, index, scene.left, scene.right, scene.disparity_left, scene.disparity_right)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data_samples")
    out = parser.parse_args().out
    for scene in ("middlebury_motorcycle", "rendered_planes", "rendered_objects"):
        shutil.rmtree(out / scene, ignore_errors=True)
    make_middlebury(out / "middlebury_motorcycle")
    make_rendered(out / "rendered_planes", "planes", seeds=(11, 12, 13))
    make_rendered(out / "rendered_objects", "objects", seeds=(21, 22, 23))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
