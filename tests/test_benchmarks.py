"""The benchmark protocols on miniature trees laid out as the official downloads, scored against values computed here
from the trees' own arrays; the submission writers; StereoSGBM's range; and `stereo-kit eval --benchmark` as a user
runs it, including the evaluations that used to print `0 nan` and exit 0."""
import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from stereo_kit.benchmarks import (BENCHMARKS, SGBMReference, run_benchmark, sgbm_disparity, sgbm_range,
                                   write_eth3d_submission, write_kitti_submission, write_middlebury_submission)
from stereo_kit.data import miniature
from stereo_kit.data.datasets import EmptyDatasetError
from stereo_kit.io import read_pfm


def oracle(mini, change=lambda name, disparity: disparity):
    "A predictor that knows the tree: the ground truth of the pair it is shown, passed through `change`."
    by_image = {e["left"].tobytes(): (name, e["disparity"]) for name, e in mini.expected.items()}
    def predict(left, right, disparity_range=None):
        name, disparity = by_image[left.tobytes()]
        return change(name, disparity.astype(np.float64))
    return predict


def test_the_cli_lists_exactly_the_benchmarks():
    from stereo_kit.cli import BENCHMARK_NAMES
    assert set(BENCHMARK_NAMES) == set(BENCHMARKS)


def test_middlebury_quarter_resolution_clips_to_ndisp_and_averages_images(tmp_path):
    mini = miniature.middeval3(tmp_path, resolutions=("Q", "H"))
    names = [n for n in mini.expected if n.startswith("trainingQ")]
    # too far by 1000 px everywhere: clipped to ndisp, the error is ndisp - d on every pixel with ground truth
    far = run_benchmark(oracle(mini, lambda name, d: d + 1000), "middlebury", mini.root, "Q")
    bad, epe = [], []
    for name in names:
        known, occluded = mini.expected[name]["valid"], mini.extra[name]["occluded"]
        error = mini.extra[name]["ndisp"] - mini.expected[name]["disparity"].astype(np.float64)
        noc = known & ~occluded
        bad.append(((error > 2) & noc).sum() / noc.sum() * 100)
        epe.append(error[noc].mean())
    assert far["images"] == 2 and far["noc/bad2"] == pytest.approx(np.mean(bad))
    assert far["noc/epe"] == pytest.approx(np.mean(epe), rel=1e-5)
    assert far["index_problems"] == []


def test_kitti_d1_needs_both_3_px_and_5_percent(tmp_path):
    mini = miniature.kitti(tmp_path, year=2012)
    # +4 px everywhere: an outlier only where 4 px is more than 5 % of the truth (d < 80 px); pooled over all pixels
    shifted = run_benchmark(oracle(mini, lambda name, d: d + 4), "kitti2012", mini.root)
    outliers = pixels = noc_outliers = noc_pixels = 0
    for name, expected in mini.expected.items():
        known, disparity = expected["valid"], expected["disparity"].astype(np.float64)
        noc = known & ~mini.extra[name]["occluded"]
        outliers += ((4 > 0.05 * disparity) & known).sum(); pixels += known.sum()
        noc_outliers += ((4 > 0.05 * disparity) & noc).sum(); noc_pixels += noc.sum()
    assert 0 < outliers < pixels                                   # the 5 % rule matters on this tree
    assert shifted["all/d1"] == pytest.approx(100 * outliers / pixels)
    assert shifted["noc/d1"] == pytest.approx(100 * noc_outliers / noc_pixels)
    assert shifted["all/epe"] == pytest.approx(4, rel=1e-5) and shifted["all/bad3"] == 100


def test_an_exact_prediction_scores_zero_and_an_occluded_error_only_counts_in_all(tmp_path):
    trees = {"eth3d": miniature.eth3d(tmp_path / "eth3d"), "kitti2015": miniature.kitti(tmp_path / "kitti"),
             "middlebury": miniature.middeval3(tmp_path / "middlebury", resolutions=("H",))}
    for name, mini in trees.items():
        exact = run_benchmark(oracle(mini), name, mini.root)
        assert all(exact[key] == 0 for key, _ in BENCHMARKS[name].columns), (name, exact)
        wrong = run_benchmark(oracle(mini, lambda n, d: np.where(mini.extra[n]["occluded"], d + 30, d)), name, mini.root)
        assert wrong["noc/epe"] == 0 and wrong["all/epe"] > 0, (name, wrong)


def test_sceneflow_scores_the_test_frames_below_192_px(tmp_path):
    mini = miniature.flyingthings3d_test(tmp_path)
    scores = run_benchmark(oracle(mini, lambda n, d: np.where(d < 192, d + 2, np.nan)), "sceneflow", mini.root, "cleanpass")
    assert scores["images"] == 2 and scores["epe"] == pytest.approx(2, rel=1e-5)       # NaN beyond 192 px: not scored
    assert (scores["bad1"], scores["bad3"]) == (100, 0)
    with pytest.raises(ValueError, match="expected a variant in"):
        run_benchmark(oracle(mini), "sceneflow", mini.root, "final")


def test_sgbm_range_stays_below_the_width_where_opencv_fails_or_crashes():
    # OpenCV refuses numDisparities >= width and crashes at width + 1: the clamp keeps every width safe
    rng = np.random.default_rng(0)
    for width in (17, 31, 32, 33, 47, 48, 64, 191, 192, 193):
        left = rng.integers(0, 255, (24, width, 3), dtype=np.uint8)
        assert sgbm_range(192, width) < width
        assert sgbm_disparity(left, np.roll(left, -3, axis=1), 192).shape == (24, width)
    reference = SGBMReference(192)
    reference(np.zeros((8, 100, 3), np.uint8), np.zeros((8, 100, 3), np.uint8))
    reference(np.zeros((8, 400, 3), np.uint8), np.zeros((8, 400, 3), np.uint8))
    assert reference.clamped == 1 and "clamped below the image width on 1 image(s)" in reference.note


def test_submission_writers_follow_the_servers_layouts(tmp_path):
    disparity = np.array([[1.5, 2.25], [100.0, 0.0]], np.float32)
    kitti = write_kitti_submission(tmp_path, "000007_10", disparity)
    assert kitti == tmp_path / "disp_0/000007_10.png"
    raw = cv2.imread(str(kitti), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and (raw == np.array([[384, 576], [25600, 0]])).all()      # × 256
    middlebury = write_middlebury_submission(tmp_path, "testH", "Australia", disparity, 1.25, "SKit")
    assert middlebury == tmp_path / "testH/Australia/disp0SKit.pfm"
    assert (read_pfm(middlebury) == disparity).all() and (tmp_path / "testH/Australia/timeSKit.txt").read_text() == "1.25\n"
    eth3d = write_eth3d_submission(tmp_path, "lakeside_1l", disparity, 0.5)
    assert eth3d == tmp_path / "low_res_two_view/lakeside_1l.pfm"
    assert (tmp_path / "low_res_two_view/lakeside_1l.txt").read_text() == "runtime 0.500\n"


def test_an_empty_benchmark_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDatasetError, match="no kitti2015 sample found"):
        run_benchmark(lambda left, right, r: left[..., 0], "kitti2015", tmp_path / "empty")


# ---- the command line, as a user runs it ----

def run(*args, cwd=None):
    "The `stereo-kit` command in this process (the installed console script is the same `main`; see test_cli)."
    import os
    from click.testing import CliRunner
    from stereo_kit.cli import main
    previous = os.getcwd()
    try:
        if cwd is not None: os.chdir(cwd)
        result = CliRunner().invoke(main, [*args], catch_exceptions=False)
    finally: os.chdir(previous)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    import torch
    from stereo_kit.models import build_model, save_weights
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_weights(path, build_model({"preset": "tiny", "max_disp": 64, "valid_iters": 1}))
    return path


@pytest.mark.slow
def test_eval_benchmark_from_the_console_script(tmp_path, tiny_weights):
    "The installed `stereo-kit` runs a benchmark and exits 1, with the reason, on a folder without one."
    import os
    env = {**os.environ, "OMP_NUM_THREADS": "1"}                 # the tests share two cores
    mini = miniature.kitti(tmp_path / "kitti", size=(40, 24))
    ok = subprocess.run(["stereo-kit", "eval", "--benchmark", "kitti2015", "--checkpoint", str(tiny_weights), "--data",
                         str(mini.root), "--no-sgbm", "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["tiny.pt"]["kitti2015"]["images"] == 2
    (tmp_path / "empty").mkdir()
    empty = subprocess.run(["stereo-kit", "eval", "--benchmark", "kitti2015", "--checkpoint", str(tiny_weights),
                            "--data", str(tmp_path / "empty")], capture_output=True, text=True, timeout=300, env=env)
    assert empty.returncode == 1 and "no kitti2015 sample found" in empty.stderr and empty.stdout == ""


def test_eval_benchmark_prints_one_row_per_benchmark_and_method(tmp_path, tiny_weights, one_torch_thread):
    mini = miniature.middeval3(tmp_path / "m", size=(32, 32), resolutions=("Q", "H"))
    result = run("eval", "--benchmark", "middlebury", "--checkpoint", str(tiny_weights), "--data", str(mini.root),
                 "--error-maps", str(tmp_path / "maps"), "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert set(scores) == {"tiny.pt", "StereoSGBM"} and set(scores["tiny.pt"]) == {"middlebury-H"}
    assert scores["tiny.pt"]["middlebury-H"]["images"] == 2 and 0 <= scores["StereoSGBM"]["middlebury-H"]["noc/bad2"] <= 100
    assert sorted(p.name for p in (tmp_path / "maps/tiny.pt/middlebury-H").iterdir()) == [
        "Adirondack.png", "Teddy.png", "per_image.json"]
    table = run("eval", "--benchmark", "middlebury", "--checkpoint", str(tiny_weights), "--data", str(mini.root),
                "--resolution", "Q", "--no-sgbm")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["benchmark", "method", "images"] and lines[1].split()[:3] == ["middlebury-Q", "tiny.pt", "2"]


def test_eval_on_nothing_fails_with_the_reason(tmp_path, tiny_weights, one_torch_thread):
    (tmp_path / "empty").mkdir()
    result = run("eval", "--benchmark", "eth3d", "--checkpoint", str(tiny_weights), "--data", str(tmp_path / "empty"))
    assert result.returncode == 1 and "no eth3d sample found" in result.stderr and "nan" not in result.stdout
    missing = run("eval", "--benchmark", "kitti2015", "--checkpoint", str(tiny_weights), cwd=tmp_path)
    assert missing.returncode == 1 and "datasets/KITTI/2015: no such folder" in missing.stderr
    assert "give its folder with --data" in missing.stderr


def test_eval_config_refuses_an_eval_dataset_that_matches_nothing(tmp_path, tiny_weights, data_samples, one_torch_thread):
    from stereo_kit.testing import make_fake_dataset
    make_fake_dataset("sceneflow", tmp_path / "sceneflow")
    config = {"data": {"datasets": [{"name": "synthetic", "format": "synthetic"}], "image_sizes": [[64, 48]],
                       "max_disparity": 64},
              "eval": {"datasets": [{"name": "planes", "path": str(data_samples / "rendered_planes"), "max_samples": 1},
                                    {"name": "things", "path": str(tmp_path / "sceneflow"), "format": "sceneflow",
                                     "options": {"split": "Train"}}]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run("eval", "--checkpoint", str(tiny_weights), "--config", str(tmp_path / "config.json"), "--no-sgbm")
    assert result.returncode == 1 and "'things'" in result.stderr and "did you mean 'TRAIN'" in result.stderr
    config["eval"]["datasets"][1]["options"] = {}            # matches both subsets, with one unpaired frame
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run("eval", "--checkpoint", str(tiny_weights), "--config", str(tmp_path / "config.json"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tiny.pt"]["things"]["images"] == 2
    assert "things: 1 problem(s) while indexing" in result.stderr and "0007.png: no counterpart" in result.stderr
    check = run("check-data", "--config", str(tmp_path / "config.json"), "--no-progress")
    assert check.returncode == 0, check.stderr
    assert "eval:things" in check.stdout and "FlyingThings3D 1, Monkaa 1" in check.stdout
    config["eval"]["datasets"][1]["options"] = {"split": "Train"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    check = run("check-data", "--config", str(tmp_path / "config.json"), "--no-progress")
    assert check.returncode == 1 and "no usable sample in eval:things" in check.stderr
