"""The data pipeline where a notebook cannot go: worker processes, two distributed ranks, the CLI, bad data in workers."""
import json
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from stereo_kit.config import Scale
from stereo_kit.data.augment import as_sample, horizontal_flip, random_scale, stereo_agreement
from stereo_kit.data.loader import DataQualityError, build_dataloader
from stereo_kit.testing import assert_same_batches, take

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def config_for(data_samples, **extra):
    return {"datasets": [{"name": "motorcycle", "path": str(data_samples / "middlebury_motorcycle"), "weight": 2,
                          "image_augmentation": ["jittering", "noise"]},
                         {"name": "all", "path": str(data_samples), "weight": 1,
                          "image_augmentation": ["jittering", "eraser", "noise", "blur"]}],
            "image_sizes": [[320, 256], [256, 192]], "max_disparity": 64, "index_cache": None, **extra}


@pytest.mark.parametrize("worker_type", ["process", "thread"])
def test_zero_one_two_workers_give_identical_batches(data_samples, worker_type):
    config = config_for(data_samples, worker_type=worker_type)
    reference = take(build_dataloader(config, batch_size=3, seed=1, num_workers=0), 4)
    assert len({tuple(b["left"].shape[2:]) for b in reference}) == 2          # both sizes occur, one per batch
    for workers in (1, 2):
        assert_same_batches(reference, take(build_dataloader(config, batch_size=3, seed=1, num_workers=workers), 4))
    other_seed = take(build_dataloader(config, batch_size=3, seed=2, num_workers=0), 1)[0]
    assert not torch.equal(other_seed["left"], reference[0]["left"])


def test_uint8_batches_from_process_workers_are_the_float_batches(data_samples):
    config = config_for(data_samples)
    as_float = take(build_dataloader(config, batch_size=3, seed=4, num_workers=0), 3)
    as_uint8 = take(build_dataloader({**config, "batch_image_dtype": "uint8"}, batch_size=3, seed=4, num_workers=2), 3)
    for a, b in zip(as_float, as_uint8, strict=True):
        assert a["left"].dtype == torch.float32 and b["left"].dtype == torch.uint8 and b["left"].is_contiguous()
        for key in ("left", "right"): assert torch.equal(a[key], b[key].float()), key
        for key in ("disparity", "valid"): assert torch.equal(a[key], b[key]), key


def test_resume_with_workers_continues_the_same_stream(data_samples):
    config = config_for(data_samples)
    uninterrupted = take(build_dataloader(config, batch_size=2, seed=3, num_workers=0), 5)
    resumed = take(build_dataloader(config, batch_size=2, seed=3, num_workers=2, start_step=3), 2)
    assert_same_batches(uninterrupted[3:], resumed)


SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    from accelerate import Accelerator
    from stereo_kit.data.loader import build_dataloader
    accelerator = Accelerator(cpu=True)
    config, out = json.loads(sys.argv[1]), sys.argv[2]
    loader = build_dataloader(config, batch_size=2, seed=5, num_workers=1, rank=accelerator.process_index,
                              world_size=accelerator.num_processes)
    stream, rows = iter(loader), []
    for _ in range(3):
        batch = next(stream)
        rows.append({"step": batch["step"], "paths": batch["left_path"],
                     "sums": batch["left"].double().sum(dim=(1, 2, 3)).tolist()})
    with open(f"{out}/rank{accelerator.process_index}.json", "w") as f: json.dump(rows, f)
""")


def test_two_ranks_under_accelerate_see_distinct_slots(data_samples, tmp_path):
    config = config_for(data_samples)
    (tmp_path / "shard.py").write_text(SHARD_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(tmp_path / "shard.py"), json.dumps(config), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = take(build_dataloader(config, batch_size=4, seed=5, num_workers=0), 3)
    for step, batch in enumerate(whole):
        sums = batch["left"].double().sum(dim=(1, 2, 3)).tolist()
        for rank in (0, 1):
            assert ranks[rank][step]["step"] == step
            np.testing.assert_allclose(ranks[rank][step]["sums"], sums[rank::2], rtol=1e-9)
            assert ranks[rank][step]["paths"] == batch["left_path"][rank::2]
        assert len(set(sums)) == 4                                   # the four slots are four different samples


def run_cli(*args):
    return subprocess.run(["stereo-kit", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_check_data_with_the_quickstart_config():
    result = run_cli("check-data", "--config", "configs/train/quickstart.json", "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["dataset", "samples"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    width, height = json.loads((ROOT / "configs" / "train" / "quickstart.json").read_text())["data"]["datasets"][0]["options"]["size"]
    assert rows["synthetic"][1:3] == ["8", f"{width}×{height}"] and rows["synthetic"][-2:] == ["0.0", "%"]   # 8 rendered


def test_check_data_config_reports_every_problem(tmp_path, data_samples):
    config = json.loads((ROOT / "configs/train/quickstart.json").read_text())
    config["data"]["datasets"][0].update(weight=0, format="kitti2017")
    config["data"]["image_sizes"] = [[320]]
    (tmp_path / "bad.json").write_text(json.dumps(config))
    result = run_cli("check-data", "--config", str(tmp_path / "bad.json"))
    assert result.returncode == 1
    for expected in ("data.datasets[0].weight: expected a positive number, got 0", "data.datasets[0].format: expected one of",
                     "data.image_sizes[0]: expected [width, height], two positive integers"):
        assert expected in result.stderr, result.stderr


def test_check_data_config_on_other_formats(tmp_path):
    from stereo_kit.testing import make_fake_dataset
    datasets = []
    for format in ("sceneflow", "kitti2015", "middlebury", "eth3d"):
        make_fake_dataset(format, tmp_path / format)
        datasets.append({"name": format, "path": str(tmp_path / format), "format": format})
    config = {"data": {"datasets": datasets, "image_sizes": [[64, 48]], "max_disparity": 192, "index_cache": None}}
    (tmp_path / "formats.json").write_text(json.dumps(config))
    result = run_cli("check-data", "--config", str(tmp_path / "formats.json"), "--no-progress", "--strict")
    assert result.returncode == 1                                    # each fake tree has one unpaired file
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:5]}
    assert {name: row[1] for name, row in rows.items()} == {"sceneflow": "2", "kitti2015": "1", "middlebury": "2", "eth3d": "1"}
    assert "4 problem(s)" in result.stdout


def test_bad_sample_in_a_worker_is_skipped_counted_and_named(tmp_path, data_samples):
    shutil.copytree(data_samples / "rendered_objects", tmp_path / "scene")
    corrupt = tmp_path / "scene/left/rgb/0002.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:2000])
    config = {"datasets": [{"name": "scene", "path": str(tmp_path / "scene")}], "image_sizes": [[256, 192]],
              "max_disparity": 192, "index_cache": None, "max_bad_fraction": 0.6, "bad_check_min_samples": 100}
    loader = build_dataloader(config, batch_size=4, seed=0, num_workers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = take(loader, 3)
    assert all(batch["left"].shape == (4, 3, 192, 256) for batch in batches)
    assert all(path != str(corrupt) for batch in batches for path in batch["left_path"])
    assert loader.stats.read == 12 and loader.stats.bad >= 1
    assert list(loader.stats.bad_files) == [str(corrupt)]
    assert sum("0002.jpg: truncated JPEG" in str(w.message) for w in caught) == 1       # warned once per file
    strict = build_dataloader({**config, "max_bad_fraction": 0.01, "bad_check_min_samples": 4}, 4, seed=0, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataQualityError, match="0002.jpg"): take(strict, 5)


def test_flip_and_scale_keep_geometry_on_the_full_skimage_pair(motorcycle):
    left, right, disparity = motorcycle
    sample = as_sample(left, right, disparity)            # inf and NaN mark unknown pixels
    assert not sample["valid"].all() and np.isfinite(sample["disparity"][sample["valid"]]).all()
    baseline = stereo_agreement(sample)
    assert baseline > 0.85
    flipped = horizontal_flip(sample)
    assert stereo_agreement(flipped) > baseline - 0.02
    mirror = lambda array: array[:, ::-1]
    not_swapped = {**sample, "left": mirror(left), "right": mirror(right), "disparity": mirror(sample["disparity"]),
                   "valid": mirror(sample["valid"])}
    assert stereo_agreement(not_swapped) < baseline - 0.3
    scaled = random_scale(sample, np.random.default_rng(0), Scale(scale=(0.6, 0.6), probability=1))
    assert stereo_agreement(scaled) > baseline - 0.03
    assert stereo_agreement({**scaled, "disparity": scaled["disparity"] / 0.6}) < baseline - 0.1
