"""The readers of the public training mixture on trees laid out as the official downloads, their encodings decoded
independently here, and the silent traps (an entry that matches nothing, a split that drops subsets, ETH3D's two
layouts, a 16-bit PNG whose scale would be guessed) each made loud."""
import json
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from stereo_kit.config import validate_config
from stereo_kit.data import miniature
from stereo_kit.data.datasets import (EmptyDatasetError, describe_index, index_dataset, read_sample, require_samples)
from stereo_kit.data.loader import DataQualityError, build_dataloader
from stereo_kit.io import StereoIOError, write_disparity
from stereo_kit.testing import make_fake_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("format", sorted(miniature.MINIATURES))
def test_each_reader_reads_its_official_tree_back(tmp_path, format):
    mini = miniature.MINIATURES[format](tmp_path / format)
    index = index_dataset(mini.root, format)
    assert miniature.mismatches(mini, index.samples, read_sample) == []
    assert len(index.matched) == 2, index.matched                  # both parts of the tree found


def png16(path: Path, codes) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    codes = np.asarray(codes, np.uint16)
    assert cv2.imwrite(str(path), codes)
    return codes


def test_16_bit_encodings_are_never_guessed(tmp_path):
    codes = png16(tmp_path / "crestereo/tree/x_left.disp.png", [[64, 3200], [0, 17]])
    for name in ("x_left.jpg", "x_right.jpg"):
        cv2.imwrite(str(tmp_path / "crestereo/tree" / name), np.full((2, 2, 3), 90, np.uint8))
    sample = index_dataset(tmp_path / "crestereo", "crestereo").samples[0]
    disparity = read_sample(sample)["disparity"]
    np.testing.assert_array_equal(disparity, np.array([[2.0, 100.0], [0.0, 17 / 32]], np.float32))   # /32, not /256
    # the same codes as InStereo2K's left_disp.png are /100
    scene = tmp_path / "instereo2k/train/part1/000001"
    png16(scene / "left_disp.png", codes)
    for name in ("left.png", "right.png"): cv2.imwrite(str(scene / name), np.full((2, 2, 3), 90, np.uint8))
    read = read_sample(index_dataset(tmp_path / "instereo2k", "instereo2k").samples[0])["disparity"]
    np.testing.assert_array_equal(read, (codes / 100).astype(np.float32))
    # and in the standard layout a 16-bit PNG is refused until its encoding is named
    standard = tmp_path / "standard/scene"
    for folder in ("left/rgb", "right/rgb", "left/disparity"): (standard / folder).mkdir(parents=True)
    for view in ("left", "right"): cv2.imwrite(str(standard / view / "rgb/0.png"), np.full((2, 2, 3), 90, np.uint8))
    png16(standard / "left/disparity/0.png", codes)
    with pytest.raises(StereoIOError, match="a 16-bit PNG disparity, whose scale depends on the dataset"):
        read_sample(index_dataset(tmp_path / "standard", "standard").samples[0])
    named = index_dataset(tmp_path / "standard", "standard", {"disparity_format": "png16_100"}).samples[0]
    np.testing.assert_array_equal(read_sample(named)["disparity"], (codes / 100).astype(np.float32))


def test_depth_datasets_use_their_camera_files(tmp_path):
    "Falling Things: disparity = fx · 6 cm / depth, fx from the scene's own _camera_settings.json."
    mini = miniature.fallingthings(tmp_path / "fat")
    scene = mini.root / "fat/mixed/kitchen_0"
    settings = json.loads((scene / "_camera_settings.json").read_text())
    settings["camera_settings"][0]["intrinsic_settings"]["fx"] = 500.0
    (scene / "_camera_settings.json").write_text(json.dumps(settings))
    sample = next(s for s in index_dataset(mini.root, "fallingthings").samples if s.name.startswith("fat/mixed"))
    depth = cv2.imread(str(scene / "000000.left.depth.png"), cv2.IMREAD_UNCHANGED).astype(np.float64) / 10_000
    arrays = read_sample(sample)
    np.testing.assert_allclose(arrays["disparity"][depth > 0], 500.0 * 0.06 / depth[depth > 0], rtol=1e-6)
    assert (arrays["valid"] == (depth > 0)).all()


def test_vkitti2_sky_is_unknown_and_the_baseline_comes_from_the_extrinsics(tmp_path):
    mini = miniature.vkitti2(tmp_path / "vkitti2")
    index = index_dataset(mini.root, "vkitti2")
    sample = index.samples[0]
    assert sample.depth_to_disparity == pytest.approx(miniature.VKITTI2_FOCAL * miniature.VKITTI2_BASELINE, rel=1e-7)
    depth = cv2.imread(str(sample.disparity), cv2.IMREAD_UNCHANGED)
    assert (depth == 65535).any() and not read_sample(sample)["valid"][depth == 65535].any()


def test_the_index_cache_keeps_depth_factors(tmp_path):
    import time
    mini = miniature.tartanair(tmp_path / "tartanair")
    time.sleep(0.06)                                               # folders settle (the cache's clock-tick rule)
    first = index_dataset(mini.root, "tartanair", cache_dir=tmp_path / "cache")
    cached = index_dataset(mini.root, "tartanair", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").glob("*.json")) and cached.samples == first.samples
    assert cached.samples[0].depth_to_disparity == 80.0 and cached.samples[0].disparity_format == "tartanair_depth"


def test_sceneflow_split_at_the_root_says_what_it_dropped(tmp_path):
    root = make_fake_dataset("sceneflow", tmp_path / "sceneflow")
    index = index_dataset(root, "sceneflow", {"split": "TRAIN"})
    assert [s.name for s in index.samples] == ["FlyingThings3D/TRAIN/A/0000/0006"]
    dropped = [p for p in index.problems if "Monkaa: split 'TRAIN' keeps none" in p]
    assert len(dropped) == 1 and "give it its own dataset entry without split" in dropped[0]


@pytest.mark.parametrize("path, split, expected", [
    ("sceneflow", "train", "did you mean 'TRAIN'? (case matters)"),          # wrong case
    ("sceneflow/Monkaa", "TRAIN", "this subset has no split folders"),       # a split on a subset without one
])
def test_a_split_that_keeps_nothing_is_refused_with_its_reason(tmp_path, path, split, expected):
    make_fake_dataset("sceneflow", tmp_path / "sceneflow")
    index = index_dataset(tmp_path / path, "sceneflow", {"split": split}, name="things")
    assert index.samples == [] and any(expected in p for p in index.problems), index.problems
    assert index.problems[-1].startswith(f"{tmp_path / path}: no sceneflow sample found; expected")
    with pytest.raises(EmptyDatasetError, match="an entry that matches nothing is refused"):
        require_samples(index)
    data = {"datasets": [{"name": "things", "path": str(tmp_path / path), "format": "sceneflow",
                          "options": {"split": split}}], "image_sizes": [[32, 32]], "max_disparity": 64,
            "index_cache": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataQualityError, match=expected.split("?")[0].replace("(", r"\(").replace(")", r"\)")):
            build_dataloader(data, batch_size=1, seed=0, num_workers=0)


def test_eth3d_both_layouts(tmp_path):
    split, merged = miniature.eth3d(tmp_path / "split", merged=False), miniature.eth3d(tmp_path / "merged", merged=True)
    for mini in (split, merged):
        index = index_dataset(mini.root, "eth3d")
        assert index.problems == [] and miniature.mismatches(mini, index.samples, read_sample) == []


def test_eth3d_images_folder_with_a_gt_sibling(tmp_path):
    mini = miniature.eth3d(tmp_path / "eth3d", merged=False)
    images = tmp_path / "images"
    shutil.move(str(mini.root / "two_view_training"), str(images))
    shutil.move(str(mini.root / "two_view_training_gt"), str(tmp_path / "images_gt"))
    assert [s.name for s in index_dataset(images, "eth3d").samples] == ["delivery_area_1l", "playground_2s"]


def test_middeval3_never_mixes_resolutions(tmp_path):
    mini = miniature.middeval3(tmp_path / "m", resolutions=("Q", "H"))
    mixed = index_dataset(mini.root, "middeval3")
    assert mixed.samples == [] and "set options.resolution to one of ['Q', 'H']" in mixed.problems[0]
    half = index_dataset(mini.root, "middeval3", {"resolution": "H"})
    assert [s.name for s in half.samples] == ["Adirondack", "Teddy"]
    assert all("trainingH" in str(s.left) for s in half.samples)


def test_describe_index_counts_each_part(tmp_path):
    root = make_fake_dataset("sceneflow", tmp_path / "sceneflow")
    line = describe_index(index_dataset(root, "sceneflow", name="sf"))
    assert line == f"'sf' at {root}: 2 sample(s) (FlyingThings3D 1, Monkaa 1); 1 problem(s) while indexing"


@pytest.mark.parametrize("name", ["general_mixture.json", "sceneflow.json"])
def test_shipped_public_configs_validate_and_name_their_paths(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = json.loads((ROOT / "configs/train" / name).read_text())
    assert validate_config(config, check_paths=False) == []
    paths = [p.split(":")[0] for p in validate_config(config)]        # only the folders a user fills in are missing
    assert set(paths) == {"model.pretrained"} | {f"data.datasets[{i}].path" for i in range(len(config["data"]["datasets"]))} \
        | {f"eval.datasets[{i}].path" for i in range(len(config["eval"]["datasets"]))}
    formats = [entry["format"] for entry in config["data"]["datasets"]]
    if name == "sceneflow.json":           # the papers' SceneFlow: FlyingThings3D TRAIN + Monkaa + Driving, sampled by size
        assert [(e["name"], e["options"].get("split"), e["weight"]) for e in config["data"]["datasets"]] == [
            ("flyingthings3d", "TRAIN", 22390), ("monkaa", None, 8664), ("driving", None, 4400)]
    else:
        assert {"crestereo", "sintel", "fallingthings", "instereo2k", "vkitti2", "tartanair", "spring",
                "drivingstereo", "sceneflow"} <= set(formats)


def test_bad_files_are_listed_in_the_workspace_file(tmp_path, data_samples):
    shutil.copytree(data_samples / "rendered_objects", tmp_path / "scene")
    broken = [tmp_path / "scene/left/rgb/0001.jpg", tmp_path / "scene/left/rgb/0002.jpg"]
    for path in broken: path.write_bytes(path.read_bytes()[:1500])         # two files, one kind of problem
    config = {"datasets": [{"name": "scene", "path": str(tmp_path / "scene")}], "image_sizes": [[128, 96]],
              "max_disparity": 192, "index_cache": None, "max_bad_fraction": 0.9, "bad_check_min_samples": 1000}
    loader = build_dataloader(config, batch_size=4, seed=0, num_workers=0)
    loader.bad_files_path = tmp_path / "workspace/bad_files.tsv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = iter(loader)
        for _ in range(6): next(stream)
    loader.write_bad_files()
    rows = [line.split("\t") for line in loader.bad_files_path.read_text().splitlines()]
    assert rows[0] == ["file", "reason", "count", "first_message"]
    assert sorted(row[0] for row in rows[1:]) == sorted(map(str, broken))
    assert sum(int(row[2]) for row in rows[1:]) == loader.stats.bad
    skipped = [str(w.message) for w in caught if "skipped a bad sample" in str(w.message)]
    assert len(skipped) == 1 and str(loader.bad_files_path) in skipped[0]     # one warning, naming the list


@pytest.mark.slow
def test_a_training_run_lists_its_bad_files_and_what_each_entry_matched(tmp_path, data_samples, capsys,
                                                                        one_torch_thread):
    from stereo_kit.train.trainer import Trainer
    shutil.copytree(data_samples / "rendered_planes", tmp_path / "planes")
    broken = [tmp_path / "planes/left/rgb/0001.jpg", tmp_path / "planes/left/rgb/0002.jpg"]
    for path in broken: path.write_bytes(path.read_bytes()[:1500])
    config = {"model": {"preset": "tiny", "max_disp": 64, "train_iters": 2, "valid_iters": 2},
              "data": {"datasets": [{"name": "planes", "path": str(tmp_path / "planes")}], "image_sizes": [[96, 64]],
                       "max_disparity": 64, "num_workers": 0, "index_cache": None, "max_bad_fraction": 0.9,
                       "bad_check_min_samples": 1000},
              "loss": {"stereo": {"l1": {"function": "disparity_l1_loss"},
                                  "multi_scale": {"function": "multi_scale_loss", "weight": 0.3,
                                                  "params": {"weights": [0.5, 0.7, 1.0]}}}}}
    options = dict(batch_size_forward=2, enable_gradient_checkpointing=False, enable_mlflow=False, log_every=1,
                   num_iterations=4, save_every=0, vis_every=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(config, tmp_path / "run", **options).fit()
    listed = (tmp_path / "run/bad_files.tsv").read_text().splitlines()
    assert listed[0] == "file\treason\tcount\tfirst_message"
    assert {line.split("\t")[0] for line in listed[1:]} == set(map(str, broken))
    assert any(str(tmp_path / "run/bad_files.tsv") in str(w.message) for w in caught)
    assert f"data: 'planes' at {tmp_path / 'planes'}: 3 sample(s)" in capsys.readouterr().out
    # an eval dataset that matches nothing stops the run before its first step, not after the last
    config["eval"] = {"datasets": [{"name": "nothing", "path": str(tmp_path), "format": "kitti2015"}]}
    with pytest.raises(EmptyDatasetError, match="eval.datasets: 'nothing'"):
        Trainer(config, tmp_path / "run2", **options).fit()
    assert not (tmp_path / "run2/checkpoint").exists()
