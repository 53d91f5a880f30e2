"""The released FoundationStereo from a user's clone (`model.source: "foundation_stereo_repo"`), against a STAND-IN
clone written into tmp_path by `write_stand_in_clone` (official layout, class name, constructor and forward contract,
a tiny real network; no NVIDIA code, no GPU): config checks, import hygiene, the checkpoint trust flag, fine-tuning
through the real Trainer with resume, and the CLI's `eval` and `predict` rebuilding the model through the clone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stereo_kit.config import validate_config
from stereo_kit.models import build_model, load_weights
from stereo_kit.models.official import (FoundationStereoRepo, OfficialModelError, import_foundation_stereo,
                                        write_stand_in_clone)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_samples"
FAST = dict(batch_size_forward=2, enable_mlflow=False, log_every=1, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")      # see conftest.py


@pytest.fixture
def block(tmp_path) -> dict:
    "A model block of the stand-in clone, with the trust its released-format checkpoint needs."
    return write_stand_in_clone(tmp_path / "FoundationStereo") | {"trust_checkpoint": True}


def finetune_config(block: dict) -> dict:
    return {"model": block,
            "data": {"datasets": [{"name": "planes", "path": str(SAMPLES / "rendered_planes")}],
                     "image_sizes": [[96, 64]], "max_disparity": 64, "num_workers": 0, "index_cache": None},
            "loss": {"stereo": {"sequence": {"function": "sequence_loss", "params": {"gamma": 0.9}}}},
            "optimizer": {"lr": 1e-3, "param_groups": [{"name": "backbone", "pattern": "^net\\.feature\\.", "lr": 1e-4}]},
            "lr_scheduler": {"name": "constant"},
            "eval": {"datasets": [{"name": "planes", "path": str(SAMPLES / "rendered_planes"), "max_samples": 1}]}}


def test_import_leaves_sys_path_and_modules_clean(tmp_path):
    path, modules = list(sys.path), set(sys.modules)
    repo = tmp_path / "FoundationStereo"
    write_stand_in_clone(repo)                    # imports the class (its core/foundation_stereo.py appends to sys.path)
    assert import_foundation_stereo(repo).__name__ == "FoundationStereo"
    assert sys.path == path
    assert not [name for name in set(sys.modules) - modules if name.split(".")[0] in ("core", "Utils")]
    assert "core" not in sys.modules and "Utils" not in sys.modules


def test_an_existing_core_module_is_neither_used_nor_replaced(tmp_path, monkeypatch):
    import types
    other = types.ModuleType("core")                 # some other package called `core`, already imported
    monkeypatch.setitem(sys.modules, "core", other)
    write_stand_in_clone(tmp_path / "FoundationStereo")
    assert sys.modules["core"] is other


def test_builds_from_the_config_and_keeps_the_contract(block):
    model = build_model({"model": block})
    assert isinstance(model, FoundationStereoRepo) and model.config["source"] == "foundation_stereo_repo"
    left, right = torch.rand(2, 2, 3, 50, 70).mul(255).unbind(0)
    predictions = model.train()(left, right)
    assert len(predictions) == 1 + block["train_iters"] and all(p.shape == (2, 1, 50, 70) for p in predictions)
    with torch.no_grad(): assert model.eval()(left, right).shape == (2, 1, 50, 70)


def test_a_checkpoint_holding_a_pickled_object_needs_the_flag(block):
    with pytest.raises(OfficialModelError) as refused: build_model(block | {"trust_checkpoint": False})
    message = str(refused.value)
    assert "\n" not in message and message.startswith(block["checkpoint"]) and "trust_checkpoint: true" in message
    trusted = build_model(block)
    released = torch.load(block["checkpoint"], weights_only=False)["model"]
    assert all(torch.equal(trusted.net.state_dict()[name], value) for name, value in released.items())


def test_a_plain_state_dict_checkpoint_needs_no_trust(block, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(block["checkpoint"], weights_only=False)["model"], plain)
    assert isinstance(build_model(block | {"checkpoint": str(plain), "cfg": str(Path(block["checkpoint"]).parent / "cfg.yaml"),
                                           "trust_checkpoint": False}), FoundationStereoRepo)


def test_a_repo_without_the_model_file_is_one_config_line(block, tmp_path):
    (tmp_path / "empty").mkdir()
    config = finetune_config(block | {"repo": str(tmp_path / "empty")})
    problems = validate_config(config)
    assert problems == [f"model.repo: expected a clone of NVlabs/FoundationStereo: no core/foundation_stereo.py in it, "
                        f"got {str(tmp_path / 'empty')!r}"]
    missing = validate_config(finetune_config(block | {"checkpoint": str(tmp_path / "none.pth")}))
    assert [p.split(":")[0] for p in missing] == ["model.checkpoint"]


def test_finetune_with_the_trainer_resume_then_eval_and_predict(block, tmp_path):
    from stereo_kit.cli import main
    from stereo_kit.train.trainer import Trainer
    config = finetune_config(block)
    run = Trainer(config, tmp_path / "run", num_iterations=20, save_every=10, **FAST)
    run.fit()
    losses = [row["loss/total"] for row in run.history if "loss/total" in row]
    assert len(losses) == 20 and all(map(lambda v: v == v, losses))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses            # it learns
    assert {group["name"] for group in run.optimizer.param_groups} == {"base", "backbone"}

    resumed = Trainer(config, tmp_path / "run", num_iterations=22, save_every=11, checkpoint="latest", **FAST)
    resumed.fit()
    assert [row["step"] for row in resumed.history if "loss/total" in row] == [21, 22]

    weights = run.workspace.weights(22)
    model = load_weights(weights)                                     # rebuilt through the clone, weights from the file
    assert isinstance(model, FoundationStereoRepo)
    assert torch.equal(model.state_dict()["net.feature.layers.0.weight"],
                       resumed.unwrapped.state_dict()["net.feature.layers.0.weight"])

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    scores = CliRunner().invoke(main, ["eval", "--checkpoint", str(weights), "--config", str(config_path), "--json",
                                       "--no-sgbm"])
    assert scores.exit_code == 0, scores.output
    assert json.loads(scores.stdout)[weights.name]["planes"]["images"] == 1

    left = SAMPLES / "middlebury_motorcycle/left/rgb/0001.jpg"
    right = SAMPLES / "middlebury_motorcycle/right/rgb/0001.jpg"
    output = tmp_path / "out.pfm"
    # a fresh process imports the clone again; run this checkout's CLI (an installed `stereo-kit` may be another copy)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    predicted = subprocess.run([sys.executable, "-c", "from stereo_kit.cli import main; main()", "predict", "--checkpoint",
                                str(weights), str(left), str(right), "--output", str(output)],
                               capture_output=True, text=True, env=environment, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    assert output.is_file()
