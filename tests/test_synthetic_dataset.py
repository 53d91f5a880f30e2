"""The `synthetic` dataset format end to end: rendered on the fly, reproducible per (seed, step, slot), exact in both
views, mixed by weight with a dataset on disk, the same from worker processes, and summarised by `check-data`."""
import json
import math
import subprocess

import numpy as np
import pytest
import torch

from stereo_kit.config import SyntheticOptions, validate_config
from stereo_kit.data.augment import stereo_agreement
from stereo_kit.data.datasets import generate_sample
from stereo_kit.data.loader import build_dataloader, slot_rng
from stereo_kit.data.synthetic import synthetic_sample, synthetic_scene
from stereo_kit.testing import assert_same_batches, take

RENDERED = {"name": "scenes", "format": "synthetic", "weight": 3, "image_augmentation": ["jittering", "noise"],
            "options": {"size": [320, 256], "max_disparity": 48}}


def config_for(data_samples, **extra):
    "The Middlebury crops and rendered scenes, one to three."
    return {"datasets": [{"name": "motorcycle", "path": str(data_samples / "middlebury_motorcycle"), "weight": 1},
                         RENDERED],
            "image_sizes": [[256, 192]], "max_disparity": 64, "index_cache": None, **extra}


def test_the_same_seed_step_and_slot_give_the_same_batch(data_samples):
    config = config_for(data_samples)
    first = take(build_dataloader(config, batch_size=4, seed=3, num_workers=0), 2)
    assert "scenes" in first[0]["dataset"] + first[1]["dataset"]
    assert_same_batches(first, take(build_dataloader(config, batch_size=4, seed=3, num_workers=0), 2))
    assert_same_batches(first[1:], take(build_dataloader(config, batch_size=4, seed=3, num_workers=0, start_step=1), 1))
    other = take(build_dataloader(config, batch_size=4, seed=4, num_workers=0), 1)[0]
    assert other["left_path"] != first[0]["left_path"] and not torch.equal(other["left"], first[0]["left"])


def test_a_rendered_sample_names_its_scene_seed_which_renders_it_again():
    options = SyntheticOptions(size=(320, 256), max_disparity=48)
    plain = {"datasets": [{**RENDERED, "image_augmentation": []}], "image_sizes": [[320, 256]], "max_disparity": 64,
             "stereo_augmentation": False}
    batch = take(build_dataloader(plain, batch_size=2, seed=0, num_workers=0), 1)[0]
    for slot, source in enumerate(batch["left_path"]):
        fmt, name, seed = source.split(":")
        assert (fmt, name) == ("synthetic", "scenes") and batch["right_path"][slot] == source
        scene = synthetic_scene(int(seed), options)          # no augmentation at the render size: the scene itself
        assert torch.equal(batch["left"][slot], torch.from_numpy(scene.left).permute(2, 0, 1).float())
        assert torch.equal(batch["disparity"][slot, 0], torch.from_numpy(scene.disparity_left))
        assert bool(batch["valid"][slot].all())               # every pixel has ground truth


def test_the_mixture_draws_the_rendered_dataset_by_its_weight(data_samples):
    batches = build_dataloader(config_for(data_samples), batch_size=4, seed=0, num_workers=0)
    assert batches.indexes[1] is None and batches.mixture.indexed_samples == 4
    draws = [batches.mixture.draw(slot_rng(0, step, slot)) for step in range(1000) for slot in range(4)]
    assert all((paths is None) == (dataset == 1) for dataset, paths in draws)
    share, expected = np.mean([dataset == 1 for dataset, _ in draws]), 3 / 4
    assert abs(share - expected) < 5 * math.sqrt(expected * (1 - expected) / len(draws)), share   # 5 sigma: ±0.034
    for step, batch in enumerate(take(batches, 3)):      # and the batches take exactly those draws
        names = ["scenes" if dataset == 1 else "motorcycle" for dataset, _ in draws[4 * step:4 * step + 4]]
        assert batch["dataset"] == names


def right_disparity_at_matches(scene):
    """Geometric check, independent of the images: (where the left pixel's surface is also the one seen at both right
    neighbours of x - d, the right disparity there interpolated linearly, the left disparity), over the pixels whose
    x - d lands inside the right view."""
    height, width = scene.disparity_left.shape
    y, x = np.mgrid[0:height, 0:width]
    x_right = x - scene.disparity_left
    floor = np.floor(x_right).astype(int)
    inside = (floor >= 0) & (floor + 1 < width)
    y, x, x_right, floor = y[inside], x[inside], x_right[inside], floor[inside]
    same = ((scene.surface_right[y, floor] == scene.surface_left[y, x])
            & (scene.surface_right[y, floor + 1] == scene.surface_left[y, x]))
    fraction = x_right - floor
    interpolated = (1 - fraction) * scene.disparity_right[y, floor] + fraction * scene.disparity_right[y, floor + 1]
    return same, interpolated, scene.disparity_left[y, x]


@pytest.mark.parametrize("kind", ["planes", "objects"])
def test_both_views_disparity_is_exact_and_valid_everywhere(kind):
    options = SyntheticOptions(kinds=[kind])
    for slot in range(4):
        sample = synthetic_sample(np.random.default_rng(slot), options)
        assert sample["valid"].all() and sample["valid_right"].all()
        # photometric: the right view warped by the left disparity matches the left view wherever both see the point
        # (the rest is bilinear resampling of the textures' one-pixel strokes, twice)
        assert stereo_agreement(sample, non_occluded=True) > 0.98
        # geometric: the right disparity at x - d, interpolated linearly (exact on a plane), is d
        same, interpolated, expected = right_disparity_at_matches(synthetic_scene(sample["seed"], options))
        assert same.mean() > 0.8
        np.testing.assert_allclose(interpolated[same], expected[same], atol=1e-3)


def test_things_scenes_disparity_is_exact_on_slanted_and_curved_surfaces():
    "The right disparity at x - d is d wherever both views see the same surface: planes, balls and troughs alike."
    options = SyntheticOptions(kinds=["things"], size=(256, 192), objects=(3, 10), max_disparity=72.0)
    for slot in range(4):
        sample = synthetic_sample(np.random.default_rng(slot), options)
        assert sample["valid"].all() and sample["valid_right"].all()
        scene = synthetic_scene(sample["seed"], options)
        np.testing.assert_array_equal(scene.left, synthetic_scene(sample["seed"], options).left)   # deterministic
        same, interpolated, expected = right_disparity_at_matches(scene)
        assert same.mean() > 0.75
        # linear interpolation across one pixel of a curved surface: its curvature over 8, well under 0.03 px here
        np.testing.assert_allclose(interpolated[same], expected[same], atol=0.03)
        assert len(np.unique(scene.disparity_left.round(1))) > 50                 # slanted and curved, not flat cut-outs


def test_a_far_slanted_wall_stays_in_front_of_the_cameras():
    "Draws whose far wall once sloped through zero disparity at a corner (a pixel with no surface: a skipped sample)."
    options = SyntheticOptions(kinds=["things"], size=(256, 192), objects=(3, 10), max_disparity=72.0)
    for slot in (94, 149, 174, 175, 274, 290):
        sample = synthetic_sample(np.random.default_rng(slot), options)
        assert sample["valid"].all() and sample["disparity"].min() > 0


def test_generated_samples_follow_their_options():
    options = {"kinds": ["objects"], "size": [200, 100], "min_disparity": 10, "max_disparity": 20, "objects": [1, 1]}
    sample = generate_sample("synthetic", np.random.default_rng(0), options)
    assert sample["left"].shape == (100, 200, 3) and sample["left"].dtype == np.uint8
    assert 10 <= sample["disparity"].min() and sample["disparity"].max() < 20 + 5
    again = generate_sample("synthetic", np.random.default_rng(0), options)
    assert again["seed"] == sample["seed"] and np.array_equal(again["right"], sample["right"])


def test_two_worker_processes_give_the_batches_of_none(data_samples):
    config = config_for(data_samples)
    reference = take(build_dataloader(config, batch_size=3, seed=1, num_workers=0), 3)
    assert any(name == "scenes" for batch in reference for name in batch["dataset"])
    assert_same_batches(reference, take(build_dataloader(config, batch_size=3, seed=1, num_workers=2), 3))


def test_evaluation_refuses_a_rendered_dataset(data_samples):
    config = {"data": config_for(data_samples), "eval": {"datasets": [{"name": "scenes", "format": "synthetic"}]}}
    assert validate_config(config) == [
        "eval.datasets[0].format: evaluation needs a dataset on disk, not a procedural format, got 'synthetic'"]


def test_check_data_prints_a_row_for_the_rendered_dataset(tmp_path, data_samples):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"data": config_for(data_samples)}))
    result = subprocess.run(["stereo-kit", "check-data", "--config", str(path), "--no-progress"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:] if line.strip()}
    assert rows["motorcycle"][1:3] == ["4", "448×320"]
    assert rows["scenes"][1:3] == ["8", "320×256"] and rows["scenes"][-2:] == ["0.0", "%"]
