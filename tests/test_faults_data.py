"""Data-level faults and the outcome each must have — a counted skip naming the file, a `ConfigError` naming the
key, or a reported index problem — and a training-length run over a dataset with about 1 % of its files broken in
each way, which must finish and blame exactly the broken files that were drawn."""
import json
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

from stereo_kit.config import ConfigError
from stereo_kit.data import check, datasets, loader
from stereo_kit.data.datasets import find_standard_scenes, index_dataset
from stereo_kit.data.loader import build_dataloader, slot_rng
from stereo_kit.io import read_disparity, read_image, write_disparity, write_image

SIZE = (64, 48)                                       # small copies keep a 1200-sample run to seconds
ROLES = {"left": "left/rgb/{}.jpg", "right": "right/rgb/{}.jpg", "disparity": "left/disparity/{}.png",
         "disparity_right": "right/disparity/{}.png"}


@pytest.fixture(scope="session")
def small_scenes(tmp_path_factory, data_samples) -> Path:
    "data_samples' rendered scenes at 64×48: real images, disparity resized with its values scaled by the width."
    root = tmp_path_factory.mktemp("small_scenes")
    for source in sorted(data_samples.glob("rendered_*/*/*/*.*")):
        target = root / source.relative_to(data_samples)
        if source.parent.name == "rgb":
            write_image(target, cv2.resize(read_image(source), SIZE, interpolation=cv2.INTER_AREA))
            continue
        disparity, valid = read_disparity(source)
        nearest = lambda array: cv2.resize(array, SIZE, interpolation=cv2.INTER_NEAREST)
        write_disparity(target, nearest(disparity) * (SIZE[0] / disparity.shape[1]), "depth_uint8",
                        nearest(valid.view(np.uint8)).view(bool))
    return root


def link_tree(source: Path, target: Path):
    "Hard-link every file of `source` under `target` (a fault must replace a file, never write through a link)."
    for path in source.rglob("*"):
        if path.is_file():
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target / path.relative_to(source))


def replace(path: Path, data: bytes):
    path.unlink()
    path.write_bytes(data)


def settle(root: Path):
    "Date every folder under `root` two seconds back, so an index cache built now is trusted (not racy)."
    past = time.time_ns() - 2_000_000_000
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]: os.utime(folder, ns=(past, past))


def config_of(root: Path, **extra) -> dict:
    return {"datasets": [{"name": "data", "path": str(root)}], "image_sizes": [list(SIZE)], "max_disparity": 192,
            "index_cache": str(root.parent / "cache"), "max_bad_fraction": 1.0, **extra}


def take(batches, steps: int) -> list:
    stream = iter(batches)
    return [next(stream) for _ in range(steps)]


def raising_reader(failures: dict[str, type]):
    "`read_sample`, except that a sample whose left image is in `failures` raises that exception type."
    def read(paths, max_pixels=None):
        if str(paths.left) in failures: raise failures[str(paths.left)](f"simulated for {paths.left.name}")
        return datasets.read_sample(paths, max_pixels)
    return read


def simulate(monkeypatch, failures: dict[str, type]):
    "Make reading the samples of `failures` raise in the loader (and its forked workers) and in check-data."
    reader = raising_reader(failures)
    monkeypatch.setattr(loader, "read_sample", reader)
    monkeypatch.setattr(check, "read_sample", reader)


# ---- the faults: each breaks sample `stem` of a scene (or the tree around it) ---------------------------------------

def truncated(role: str, keep: float = 0.6) -> Callable:
    def fault(scene, stem, monkeypatch):
        path = scene / ROLES[role].format(stem)
        replace(path, path.read_bytes()[:int(path.stat().st_size * keep)])
    return fault


def corrupt_bytes(scene, stem, monkeypatch):
    path = scene / ROLES["right"].format(stem)
    replace(path, np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def empty_file(scene, stem, monkeypatch): replace(scene / ROLES["disparity_right"].format(stem), b"")


def rewritten_disparity(disparity: np.ndarray) -> Callable:
    def fault(scene, stem, monkeypatch):
        path = scene / ROLES["disparity"].format(stem)
        path.unlink()
        write_disparity(path, disparity, "depth_uint8")
    return fault


wrong_size_disparity = rewritten_disparity(np.full((SIZE[1] // 2, SIZE[0] // 2), 5, np.float32))
all_invalid_disparity = rewritten_disparity(np.zeros(SIZE[::-1], np.float32))


def folder_named_like_an_image(scene, stem, monkeypatch):
    path = scene / ROLES["left"].format(stem)
    path.unlink()
    path.mkdir()


def duplicate_stem(scene, stem, monkeypatch):
    write_image(scene / f"left/rgb/{stem}.png", read_image(scene / ROLES["left"].format(stem)))


def raises(kind: type) -> Callable:
    return lambda scene, stem, monkeypatch: simulate(monkeypatch, {str(scene / ROLES["left"].format(stem)): kind})


def symlinked_scene(scene, stem, monkeypatch):
    (scene.parent / "linked").symlink_to(scene.parents[2] / "elsewhere", target_is_directory=True)


def symlink_loop(scene, stem, monkeypatch):
    (scene.parent / "loop").symlink_to(scene.parents[1], target_is_directory=True)


def cached_then(change: Callable) -> Callable:
    "Index with the cache once the tree has settled, then `change` a frame of the scene (three folders down)."
    def fault(scene, stem, monkeypatch):
        root = scene.parents[1]
        settle(root)
        index_dataset(root, "standard", cache_dir=root.parent / "cache")
        change(scene)
    return fault


def add_frame(scene):
    for role in ROLES.values(): (scene / role.format("0003")).write_bytes((scene / role.format("0000")).read_bytes())


def delete_frame(scene):
    for role in ROLES.values(): (scene / role.format("0002")).unlink()


# ---- the outcomes -------------------------------------------------------------------------------------------------

@dataclass
class Skip:
    "Training skips and counts every draw of the sample, blaming `file` with `reason`; check-data lists that file."
    file: str
    reason: str

    def check(self, root: Path, scene: Path):
        batches = build_dataloader(config_of(root), batch_size=4, seed=0, num_workers=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            take(batches, 6)
        blamed = str(scene / self.file)
        assert batches.stats.bad > 0 and batches.stats.bad_files == Counter({blamed: batches.stats.bad})
        assert batches.stats.reasons == Counter({self.reason: batches.stats.bad})
        skipped = [str(w.message) for w in caught if "skipped a bad sample" in str(w.message)]
        assert len(skipped) == 1 and blamed in skipped[0], skipped                  # one warning per reason
        summary = check.summarize_scene(index_dataset(root, "standard"))
        assert summary.samples == 2 and len(summary.problems) == 1 and summary.problems[0].startswith(blamed)


@dataclass
class IndexProblem:
    "The index holds `samples` and reports one problem naming `file`; training runs on them and counts the problem."
    file: str
    text: str
    samples: list

    def check(self, root: Path, scene: Path):
        index = index_dataset(root, "standard", cache_dir=root.parent / "cache")
        assert [sample.name for sample in index.samples] == self.samples
        assert len(index.problems) == 1 and index.problems[0].startswith(str(root / self.file)), index.problems
        assert self.text in index.problems[0], index.problems
        with pytest.warns(UserWarning, match="1 problem"):
            batches = build_dataloader(config_of(root), batch_size=4, seed=0, num_workers=0)
        take(batches, 2)
        assert batches.stats.index_problems == 1 and batches.stats.bad == 0


@dataclass
class Indexed:
    "The index (through the cache) holds exactly `names`, with no problem."
    names: list

    def check(self, root: Path, scene: Path):
        index = index_dataset(root, "standard", cache_dir=root.parent / "cache")
        assert [sample.name for sample in index.samples] == self.names and index.problems == []


@dataclass
class ConfigProblem:
    "`action(config)` raises one ConfigError, one of whose problems is at `key`."
    key: str
    action: Callable

    def check(self, root: Path, scene: Path):
        with pytest.raises(ConfigError) as error: self.action(config_of(root))
        assert any(problem.startswith(f"{self.key}: ") for problem in error.value.problems), error.value.problems


@dataclass
class ConfigProblems:
    "`action(config)` raises one ConfigError holding every problem of `expected` (each the start of one), at once."
    expected: list
    action: Callable

    def check(self, root: Path, scene: Path):
        with pytest.raises(ConfigError) as error: self.action(config_of(root))
        problems = error.value.problems
        assert len(problems) == len(self.expected), problems
        for start in self.expected: assert sum(problem.startswith(start) for problem in problems) == 1, (start, problems)


def with_datasets(*changes: dict, build=lambda config: build_dataloader(config, 4, seed=0)) -> Callable:
    "`build` on the config with one dataset entry per `changes`: the scene's entry with those keys changed."
    return lambda config: build({**config, "datasets": [{**config["datasets"][0], **change} for change in changes]})


def check_data(config: dict):
    return check.summarize_config({"data": config})


def with_dataset(**changes) -> Callable:
    return lambda config: build_dataloader({**config, "datasets": [{**config["datasets"][0], **changes}]}, 4, seed=0)


SCENE = ["group/scene/0000", "group/scene/0001", "group/scene/0002"]
WITHOUT_0001 = [SCENE[0], SCENE[2]]
FAULTS = [
    pytest.param(truncated("disparity"), Skip("left/disparity/0001.png", "StereoIOError in a disparity"),
                 id="truncated PNG"),
    pytest.param(truncated("left"), Skip("left/rgb/0001.jpg", "StereoIOError in a left image"), id="truncated JPEG"),
    pytest.param(corrupt_bytes, Skip("right/rgb/0001.jpg", "StereoIOError in a right image"), id="corrupt bytes"),
    pytest.param(empty_file, Skip("right/disparity/0001.png", "StereoIOError in a right disparity"), id="empty file"),
    pytest.param(wrong_size_disparity, Skip("left/disparity/0001.png", "StereoIOError in a disparity"),
                 id="wrong-size disparity"),
    pytest.param(all_invalid_disparity, Skip("left/disparity/0001.png", "StereoIOError in a disparity"),
                 id="all-invalid disparity"),
    *[pytest.param(raises(kind), Skip("left/rgb/0001.jpg", kind.__name__), id=f"reader raises {kind.__name__}")
      for kind in (IndexError, ValueError, PermissionError, MemoryError)],
    pytest.param(folder_named_like_an_image,
                 IndexProblem("group/scene/left/rgb/0001.jpg", "a folder named like a .jpg", WITHOUT_0001),
                 id="folder named like an image"),
    pytest.param(duplicate_stem,
                 IndexProblem("group/scene/left/rgb/0001.jpg", "/left/rgb/0001.png: 2 files with stem", WITHOUT_0001),
                 id="duplicate stems"),
    pytest.param(symlinked_scene, Indexed(["group/linked/0000", "group/linked/0001", "group/linked/0002", *SCENE]),
                 id="symlinked scene"),
    pytest.param(symlink_loop, IndexProblem("group/loop", "already searched (a symlink loop", SCENE),
                 id="symlink loop"),
    pytest.param(cached_then(add_frame), Indexed([*SCENE, "group/scene/0003"]), id="cache: frame added"),
    pytest.param(cached_then(delete_frame), Indexed(SCENE[:2]), id="cache: frame deleted"),
    pytest.param(None, ConfigProblem("batch_size", lambda config: build_dataloader(config, 0, seed=0)),
                 id="batch size 0"),
    pytest.param(None, ConfigProblem("data.datasets[0].weight", with_dataset(weight=float("nan"))), id="NaN weight"),
    pytest.param(None, ConfigProblem("data.datasets[0].name", with_dataset(name=["data"])), id="list as a name"),
    pytest.param(None, ConfigProblem("data.max_disparity", lambda config: build_dataloader(
        {**config, "max_disparity": float("inf")}, 4, seed=0)), id="infinite max_disparity"),
    pytest.param(None, ConfigProblem("data.datasets[0].options.frame_folder",
                                     with_dataset(options={"frame_folder": "x"})), id="unknown format option"),
    pytest.param(None, ConfigProblem("model.volume_groups", lambda config: check.summarize_config(
        {"model": {"volume_groups": 5}, "data": config})), id="check-data: model block mistake"),
    # weights each finite and positive whose sum is not: numpy failed on the first batch ("do not sum to 1")
    *[pytest.param(None, ConfigProblems(["data.datasets: the weights sum to inf; expected a finite positive sum (weights "
                                         "are relative: scale them all down)"],
                                        with_datasets({"weight": 1e308}, {"name": "other", "weight": 1e308}, build=build)),
                   id=f"weights 1e308 twice, {what}") for what, build in [
        ("training", lambda config: build_dataloader(config, 4, seed=0)), ("check-data", check_data)]],
    pytest.param(None, ConfigProblems(["data.datasets: the weights sum to inf"], with_datasets(
        {"weight": 1.5e308}, {"name": "b", "weight": 1e308}, {"name": "c", "weight": 1e-300})), id="weights 1.5e308 + 1e308"),
    # C32: a name used twice is reported with every other entry's problems, not only once the entries are valid
    *[pytest.param(None, ConfigProblems(expected, with_datasets(*entries, build=build)), id=f"duplicate name and {what}")
      for what, entries, expected, build in [
        ("a bad weight", [{}, {"weight": -1}], ["data.datasets[1].weight: expected a positive number",
                                                "data.datasets: expected unique dataset names; ['data'] used more than once"],
         lambda config: build_dataloader(config, 4, seed=0)),
        ("a bad weight, check-data", [{}, {"weight": -1}],
         ["data.datasets[1].weight: expected a positive number",
          "data.datasets: expected unique dataset names; ['data'] used more than once"], check_data),
        ("an unknown format and a missing path", [{}, {"format": "kitti"}, {"name": "x", "path": None}],
         ["data.datasets[1].format: expected one of", "data.datasets[2].path: required for format 'standard'",
          "data.datasets: expected unique dataset names; ['data'] used more than once"],
         lambda config: build_dataloader(config, 4, seed=0)),
        ("weights summing to inf", [{"weight": 1e308}, {"weight": 1e308}],
         ["data.datasets: expected unique dataset names; ['data'] used more than once",
          "data.datasets: the weights sum to inf"], lambda config: build_dataloader(config, 4, seed=0))]],
]


@pytest.mark.parametrize("fault, outcome", FAULTS)
def test_fault_matrix(tmp_path, small_scenes, monkeypatch, fault, outcome):
    scene = tmp_path / "data/group/scene"
    link_tree(small_scenes / "rendered_objects", scene)
    link_tree(small_scenes / "rendered_planes", tmp_path / "elsewhere")
    if fault is not None: fault(scene, "0001", monkeypatch)
    outcome.check(tmp_path / "data", scene)


def test_an_unchanged_dataset_is_read_from_the_cache(tmp_path, small_scenes):
    link_tree(small_scenes / "rendered_objects", tmp_path / "data/group/scene")
    settle(tmp_path / "data")
    index_dataset(tmp_path / "data", "standard", cache_dir=tmp_path / "cache")
    cache_file, = (tmp_path / "cache").glob("*.json")
    planted = json.loads(cache_file.read_text()); planted["problems"] = ["from the cache"]
    cache_file.write_text(json.dumps(planted))
    assert index_dataset(tmp_path / "data", "standard", cache_dir=tmp_path / "cache").problems == ["from the cache"]


# ---- a training-length run ----------------------------------------------------------------------------------------

FILE_FAULTS = {"truncated PNG": truncated("disparity"), "truncated JPEG": truncated("left"),
               "corrupt bytes": corrupt_bytes, "empty file": empty_file, "wrong-size disparity": wrong_size_disparity,
               "all-invalid disparity": all_invalid_disparity}
BLAMED = {"truncated PNG": "disparity", "truncated JPEG": "left", "corrupt bytes": "right",
          "empty file": "disparity_right", "wrong-size disparity": "disparity", "all-invalid disparity": "disparity"}
RAISED = (IndexError, ValueError, PermissionError, MemoryError)


def build_long_dataset(root: Path, small_scenes: Path, monkeypatch) -> tuple[dict[str, str], int]:
    """200 samples in four scenes of 50 (the last one reached through a symlink), hard links to the 6 small samples
    that have right disparity; two samples broken in each file way and two raising each exception, and beside them
    two folders named like images, two duplicate stems and a symlink loop. Returns {left image: file to blame} of
    the samples that fail when read, and the number of index problems."""
    sources = [small_scenes / scene for scene in ("rendered_objects", "rendered_planes")]
    elsewhere = root.parent / "elsewhere/scene_3"
    for scene in [*(root / f"scene_{i}" for i in range(3)), elsewhere]:
        for stem in range(50):
            for role in ROLES.values():
                target = scene / role.format(f"{stem:04d}")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(sources[stem % 2] / role.format(f"{stem // 2 % 3:04d}"), target)
    (root / "scene_3").symlink_to(elsewhere, target_is_directory=True)
    (root / "links").mkdir()
    (root / "links/loop").symlink_to(root, target_is_directory=True)
    victims = ((root / f"scene_{scene}", f"{stem:04d}") for scene, stem in
               np.random.default_rng(0).permutation([(scene, stem) for scene in range(4) for stem in range(50)]))
    broken, failures = {}, {}
    for way, fault in FILE_FAULTS.items():
        for scene, stem in (next(victims), next(victims)):
            fault(scene, stem, monkeypatch)
            broken[str(scene / ROLES["left"].format(stem))] = str(scene / ROLES[BLAMED[way]].format(stem))
    for kind in RAISED:
        for scene, stem in (next(victims), next(victims)):
            left = str(scene / ROLES["left"].format(stem))
            failures[left], broken[left] = kind, left
    simulate(monkeypatch, failures)
    for index_fault in (folder_named_like_an_image, folder_named_like_an_image, duplicate_stem, duplicate_stem):
        index_fault(*next(victims), monkeypatch)
    return broken, 5


def expected_bad_draws(batches, broken: dict[str, str], steps: int, batch_size: int) -> Counter:
    "Replay the draws of every slot (a sample failing on read consumes nothing else of its slot's generator)."
    counts = Counter()
    for step in range(steps):
        for slot in range(batch_size):
            rng = slot_rng(batches.seed, step, slot)
            while str((paths := batches.mixture.draw(rng)[1]).left) in broken: counts[broken[str(paths.left)]] += 1
    return counts


@pytest.mark.parametrize("workers, steps, met", [(0, 300, 16), (2, 150, 12)])
def test_a_training_length_run_blames_exactly_the_broken_files_drawn(tmp_path, small_scenes, monkeypatch,
                                                                     workers, steps, met):
    root = tmp_path / "data"
    broken, index_problems = build_long_dataset(root, small_scenes, monkeypatch)
    config = config_of(root, max_bad_fraction=0.3, index_cache=None)
    config["datasets"][0]["image_augmentation"] = ["jittering", "eraser", "noise", "blur"]
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = build_dataloader(config, batch_size=4, seed=0, num_workers=workers)
        assert batches.mixture.indexed_samples == 200 - 4
        seen = take(batches, steps)
    elapsed = time.perf_counter() - started
    stats = batches.stats
    expected = expected_bad_draws(batches, broken, steps, 4)
    assert len(expected) >= met                                 # the run is long enough to meet most broken files
    assert stats.bad_files == expected                          # each drawn one once as a key, counted, nothing else
    assert stats.read == 4 * steps and stats.index_problems == index_problems
    assert all(path not in broken for batch in seen for path in batch["left_path"])
    skipped = [str(w.message) for w in caught if "skipped a bad sample" in str(w.message)]
    assert len(skipped) == len(stats.reasons)                   # one warning per reason, the rest counted silently
    summary = stats.summary()
    assert all(summary.count(path) == 1 for path in stats.bad_files)
    print(f"{workers} workers: {steps} steps, {stats.read + stats.bad} samples tried, {stats.bad} skipped from "
          f"{len(stats.bad_files)} of {len(broken)} broken files, {elapsed:.1f} s")
    if workers == 0:                                            # check-data lists every broken file, drawn or not
        with pytest.warns(UserWarning, match="a symlink loop"): scenes = find_standard_scenes(root)
        summaries = [check.summarize_scene(scene) for scene in scenes]
        problems = [problem for summary in summaries for problem in summary.problems]
        assert sum(summary.samples for summary in summaries) == 200 - 4 - len(broken)
        assert all(sum(problem.startswith(blamed + ":") for problem in problems) == 1 for blamed in broken.values())
        assert len(problems) == len(broken) + index_problems - 1       # the loop is the search's, not a scene's
