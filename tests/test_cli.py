"""The `stereo-kit` console script, run as a user runs it."""
import shutil
import subprocess


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
