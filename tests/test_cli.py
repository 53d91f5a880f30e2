"""The `stereo-kit` console script, run as a user runs it."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest


def run(*args, cwd=None):
    return subprocess.run(["stereo-kit", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_check_data_prints_every_scene(data_samples):
    result = run("check-data", str(data_samples))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["scene", "samples"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert rows["middlebury_motorcycle"][1:3] == ["4", "448×320"]
    assert rows["rendered_planes"][1] == "3" and rows["rendered_objects"][1] == "3"
    assert rows["middlebury_motorcycle"][-2:] == ["7.2", "%"]          # Middlebury has ~7 % invalid pixels
    assert rows["rendered_planes"][-2:] == ["0.0", "%"]


def test_check_data_strict_reports_problems(tmp_path, data_samples):
    scene = tmp_path / "scene"
    shutil.copytree(data_samples / "rendered_planes", scene)
    (scene / "right/rgb/0002.jpg").unlink()
    (scene / "left/rgb/0001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    relaxed, strict = run("check-data", str(tmp_path)), run("check-data", str(tmp_path), "--strict")
    assert relaxed.returncode == 0 and strict.returncode == 1
    assert "2 problem(s)" in strict.stdout
    assert f"{scene / 'left/rgb/0002.jpg'}: no counterpart in right/rgb" in strict.stdout
    assert f"{scene / 'left/rgb/0001.jpg'}: truncated JPEG" in strict.stdout
    assert strict.stdout.splitlines()[1].split()[:2] == ["scene", "1"]


def test_check_data_on_a_folder_without_scenes(tmp_path):
    result = run("check-data", str(tmp_path))
    assert result.returncode == 1 and "no scene found" in result.stderr


def test_version():
    result = run("--version")
    assert result.returncode == 0 and "version" in result.stdout


def test_check_data_exits_non_zero_when_no_sample_is_usable(tmp_path, data_samples):
    scene = tmp_path / "scene"
    shutil.copytree(data_samples / "rendered_planes", scene)
    for image in (scene / "left/rgb").iterdir(): image.write_bytes(image.read_bytes()[:100])     # every left image cut
    result = run("check-data", str(tmp_path), "--no-progress")
    assert result.returncode == 1 and "no usable sample" in result.stderr
    assert result.stdout.splitlines()[1].split()[:2] == ["scene", "0"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    import torch
    from stereo_kit.models import build_model, save_weights
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_weights(path, build_model({"preset": "tiny", "max_disp": 96, "valid_iters": 2}))
    return path


def test_eval_prints_the_model_beside_stereo_sgbm(tmp_path, tiny_weights, data_samples):
    config = {"data": {"datasets": [{"name": "synthetic", "format": "synthetic"}], "image_sizes": [[64, 48]],
                       "max_disparity": 96},
              "eval": {"datasets": [{"name": "planes", "path": str(data_samples / "rendered_planes"), "max_samples": 1}]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run("eval", "--checkpoint", str(tiny_weights), "--config", str(tmp_path / "config.json"), "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert set(scores) == {"tiny.pt", "StereoSGBM"} and scores["tiny.pt"]["planes"]["images"] == 1
    assert scores["StereoSGBM"]["planes"]["epe"] < scores["tiny.pt"]["planes"]["epe"]      # random weights lose
    table = run("eval", "--checkpoint", str(tiny_weights), "--config", str(tmp_path / "config.json"), "--no-sgbm")
    assert table.returncode == 0 and table.stdout.splitlines()[1].split()[:3] == ["tiny.pt", "planes", "1"]


@pytest.mark.parametrize("output, format", [("out.png", "depth_uint8"), ("out.pfm", "pfm"), ("kitti.png", "kitti_png")])
def test_predict_writes_every_disparity_format_and_a_preview(tmp_path, tiny_weights, data_samples, output, format):
    from stereo_kit.io import read_disparity, read_image
    left = data_samples / "middlebury_motorcycle/left/rgb/0001.jpg"          # 448×320: not a multiple of 32
    right = data_samples / "middlebury_motorcycle/right/rgb/0001.jpg"
    extra = ["--format", format] if format == "kitti_png" else []
    result = run("predict", "--checkpoint", str(tiny_weights), str(left), str(right), "--output", str(tmp_path / output), *extra)
    assert result.returncode == 0, result.stderr
    disparity, valid = read_disparity(tmp_path / output)
    assert disparity.shape == read_image(left).shape[:2] and valid.mean() > 0.5
    preview = read_image(tmp_path / output.replace(Path(output).suffix, "_color.png"))
    assert preview.shape == (*disparity.shape, 3)


def test_predict_names_a_bad_input(tmp_path, tiny_weights, data_samples):
    broken = tmp_path / "left.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    result = run("predict", "--checkpoint", str(tiny_weights), str(broken),
                 str(data_samples / "middlebury_motorcycle/right/rgb/0001.jpg"), "--output", str(tmp_path / "out.png"))
    assert result.returncode == 1 and str(broken) in result.stderr and "Traceback" not in result.stderr


def test_trust_checkpoint_applies_only_to_the_official_model(tmp_path):
    config = {"data": {"datasets": [{"name": "synthetic", "format": "synthetic"}], "image_sizes": [[64, 48]],
                       "max_disparity": 64}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run("train", "--config", str(tmp_path / "config.json"), "--workspace", str(tmp_path / "ws"), "--trust_checkpoint")
    assert result.returncode == 2 and "--trust_checkpoint applies only to a model block with source" in result.stderr
    assert not (tmp_path / "ws").exists()
