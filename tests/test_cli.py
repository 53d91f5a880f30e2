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


def test_eval_of_a_runs_checkpoint_prints_the_minutes_the_run_took(tmp_path, data_samples):
    from stereo_kit.models import build_model
    from stereo_kit.train.checkpoint import Workspace, rng_state, save_checkpoint
    model = build_model({"preset": "tiny", "max_disp": 96, "valid_iters": 2})
    workspace = Workspace(tmp_path / "run")
    save_checkpoint(workspace, 600, model, {"data_step": 600, "rng": rng_state(), "elapsed_seconds": 543.0}, model)
    config = {"data": {"datasets": [{"name": "synthetic", "format": "synthetic"}], "image_sizes": [[64, 48]],
                       "max_disparity": 96},
              "eval": {"datasets": [{"name": "planes", "path": str(data_samples / "rendered_planes"), "max_samples": 1}]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run("eval", "--checkpoint", str(workspace.ema(600)), "--config", str(tmp_path / "config.json"), "--no-sgbm")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (f"{workspace.ema(600)}: step 600 of the run in {workspace.root}, 9.1 min of "
                                             "wall clock to get there (build, data, steps, evaluations and saves)")
    assert result.stdout.splitlines()[2].split()[:2] == ["00000600_ema.pt", "planes"]


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


def test_train_command_parses_back_to_the_same_options():
    "The command a notebook prints for a cluster (`train_command`) means to the CLI what the notebook ran."
    import shlex
    from stereo_kit.cli import train
    from stereo_kit.train.options import TrainOptions, train_command
    options = dict(num_iterations=600, batch_size_forward=2, enable_ema=False, enable_mlflow=False, vis_every=50,
                   checkpoint="latest")
    words = shlex.split(train_command("configs/train/quickstart.json", "workspace/my run", **options))
    assert words[:2] == ["accelerate", "launch"] and words[2] == "scripts/train.py"
    context = train.make_context("train", words[3:])
    parsed = {name: value for name, value in context.params.items() if name in TrainOptions.__dataclass_fields__}
    assert TrainOptions(**parsed) == TrainOptions(**options)
    assert str(context.params["config_file"]) == "configs/train/quickstart.json"
    assert str(context.params["workspace"]) == "workspace/my run"


def test_slurm_script_launches_the_configured_run(tmp_path):
    "scripts/slurm_train.sh under stand-ins for srun/scontrol/accelerate: the command each node would run."
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"scontrol": 'printf "node-a\\nnode-b\\n"', "srun": 'exec "$@"',
             "accelerate": f'printf "%s\\n" "$@" > {tmp_path}/accelerate_args'}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2",
           "SLURM_NODEID": "1", "GPUS_PER_NODE": "4", "CONFIG": "configs/train/quickstart.json",
           "WORKSPACE": "workspace/quickstart"}
    result = subprocess.run(["bash", str(root / "scripts/slurm_train.sh"), "--num_iterations", "600"], env=env,
                            capture_output=True, text=True, cwd=root, timeout=30)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "accelerate_args").read_text().split()
    assert args[:2] == ["launch", "--multi_gpu"]
    value = lambda flag: args[args.index(flag) + 1]
    assert (value("--num_machines"), value("--num_processes"), value("--machine_rank"), value("--main_process_ip")) \
        == ("2", "8", "1", "node-a")
    assert value("--config") == "configs/train/quickstart.json" and value("--workspace") == "workspace/quickstart"
    assert value("--checkpoint") == "latest" and value("--num_iterations") == "600"
