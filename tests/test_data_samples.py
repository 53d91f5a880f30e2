"""data_samples/ is real, small, and geometrically right: the right view warped by the disparity gives the left."""
import cv2
import numpy as np
import pytest

from stereo_kit.data.datasets import find_standard_scenes
from stereo_kit.io import read_disparity, read_image

SCENES = ["middlebury_motorcycle", "rendered_objects", "rendered_planes"]


def test_size_and_layout(data_samples):
    total = sum(p.stat().st_size for p in data_samples.rglob("*") if p.is_file())
    assert total < 5e6, f"data_samples is {total / 1e6:.1f} MB"
    scenes = {scene.name: scene for scene in find_standard_scenes(data_samples)}
    assert sorted(scenes) == SCENES
    assert all(not scene.problems and len(scene.samples) >= 3 for scene in scenes.values())
    assert (data_samples / "README.md").is_file()


def warp_right_to_left(right, disparity):
    "Bilinear sample of the right image at (x - d, y): OpenCV's remap, independent of stereo_kit."
    height, width = disparity.shape
    map_x = (np.arange(width, dtype=np.float32)[None] - disparity).astype(np.float32)
    map_y = np.repeat(np.arange(height, dtype=np.float32)[:, None], width, axis=1)
    return cv2.remap(right.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderValue=np.nan)


@pytest.mark.parametrize("scene", SCENES)
def test_photometric_consistency(data_samples, scene):
    # The stored disparity is where the photometric error is smallest: shifting it by ±1 or ±2 px makes the warped
    # right image match the left worse. (A crop or scale that broke the geometry would move the minimum.)
    for sample in find_standard_scenes(data_samples / scene)[0].samples:
        left, right = read_image(sample.left).astype(np.float32), read_image(sample.right)
        disparity, valid = read_disparity(sample.disparity)
        errors = {}
        for offset in (-2.0, -1.0, 0.0, 1.0, 2.0):
            warped = warp_right_to_left(right, disparity + offset)
            keep = valid & np.isfinite(warped).all(axis=2)
            errors[offset] = float(np.mean(np.abs(warped - left).mean(axis=2)[keep]))
        assert min(errors, key=errors.get) == 0.0, (sample.left, errors)
        assert errors[0.0] < 0.8 * min(errors[-2.0], errors[2.0]), (sample.left, errors)


def test_middlebury_crop_matches_skimage(data_samples, motorcycle):
    left, _, disparity = motorcycle
    read_left = read_image(data_samples / "middlebury_motorcycle/left/rgb/0000.jpg")
    error = np.abs(read_left.astype(int) - left[90:410, :448]).mean()
    shifted = np.abs(read_left.astype(int) - left[91:411, 1:449]).mean()
    assert error < 3.0 and error < 0.5 * shifted, (error, shifted)                 # JPEG quality 95, same window
    read, valid = read_disparity(data_samples / "middlebury_motorcycle/left/disparity/0000.png")
    window = disparity[90:410, :448]
    np.testing.assert_array_equal(valid, np.isfinite(window) & (window > 0))
    assert np.abs(read[valid] - window[valid]).max() <= 0.0005 + 1e-5


@pytest.mark.parametrize("scene", ["rendered_objects", "rendered_planes"])
def test_rendered_right_disparity_is_consistent(data_samples, scene):
    # Left pixel x with disparity d is right pixel x - d: where both see the same surface, the disparities agree.
    for sample in find_standard_scenes(data_samples / scene)[0].samples:
        left_disparity, _ = read_disparity(sample.disparity)
        right_disparity, right_valid = read_disparity(sample.disparity_right)
        assert right_valid.all()
        height, width = left_disparity.shape
        y, x = np.mgrid[0:height, 0:width]
        x_right = np.rint(x - left_disparity).astype(int)
        inside = (x_right >= 0) & (x_right < width)
        gap = np.abs(right_disparity[y[inside], x_right[inside]] - left_disparity[inside])
        assert np.mean(gap < 0.1) > 0.8, f"{sample.left}: only {np.mean(gap < 0.1):.0%} left-right consistent"
