"""The released FoundationStereo from a user's clone (`model.source: "foundation_stereo_repo"`), against a STAND-IN
clone written into tmp_path by `write_stand_in_clone`: NVIDIA's layout and the shapes of its code an adapter can trip
on (a lazy import in a constructor, a `Utils.py` importing packages at module level and reloading `logging`, the
vendored `dinov2/` and `depth_anything/` packages, a torch.hub call, autocast-wrapped blocks, a module built and never
used), with a tiny real network; no NVIDIA code, no GPU, no network. Config checks, import hygiene, offline
construction, the checkpoint trust flag, the dtype that runs, gradient checkpointing, the memory estimate, and
fine-tuning through the real Trainer with resume, then the CLI's `eval` and `predict` rebuilding the model."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from stereo_kit.config import validate_config
from stereo_kit.models import build_model, load_weights
from stereo_kit.models import official
from stereo_kit.models.official import (FoundationStereoRepo, OfficialModelError, clone_importable,
                                        construct_foundation_stereo, import_foundation_stereo, official_args,
                                        saved_for_backward, write_stand_in_clone)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_samples"
FAST = dict(batch_size_forward=2, enable_mlflow=False, log_every=1, seed=0)
CLONE_NAMES = ("core", "Utils", "dinov2", "depth_anything")


pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_network")      # see conftest.py; a compute node


class NetworkAttempt(Exception):
    "Raised by the blocked socket layer; deliberately not an OSError, so no caller can mistake it for a missing file."


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    "No connection can be opened, and torch.hub has an empty cache of its own."
    def refuse(*args, **kwargs): raise NetworkAttempt(f"network access attempted: {args[:2]}")
    for name in ("connect", "connect_ex", "sendto"): monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture
def block(tmp_path) -> dict:
    "A model block of the stand-in clone; its checkpoint has the released layout, so it needs no trust."
    return write_stand_in_clone(tmp_path / "FoundationStereo")


def cfg_of(block: dict) -> Path:
    return Path(block["checkpoint"]).parent / "cfg.yaml"


def edited_copy(block: dict, name: str, file: str, old: str, new: str) -> Path:
    "A copy of the stand-in clone (a new path: the clone's modules are kept per path) with `old` replaced in `file`."
    copy = Path(block["repo"]).parent / name
    shutil.copytree(block["repo"], copy)
    text = (copy / file).read_text()
    assert old in text, (file, old)
    (copy / file).write_text(text.replace(old, new))
    return copy


def finetune_config(block: dict) -> dict:
    return {"model": block,
            "data": {"datasets": [{"name": "planes", "path": str(SAMPLES / "rendered_planes")}],
                     "image_sizes": [[96, 64]], "max_disparity": 64, "num_workers": 0, "index_cache": None},
            "loss": {"stereo": {"sequence": {"function": "sequence_loss", "params": {"gamma": 0.9}}}},
            "optimizer": {"lr": 1e-3, "param_groups": [{"name": "backbone", "pattern": "^net\\.feature\\.", "lr": 1e-4}]},
            "lr_scheduler": {"name": "constant"},
            "eval": {"datasets": [{"name": "planes", "path": str(SAMPLES / "rendered_planes"), "max_samples": 1}]}}


# --- importing and constructing -----------------------------------------------------------------------------------

def test_import_leaves_sys_path_modules_and_logging_clean(tmp_path):
    path, modules, root_logger = list(sys.path), set(sys.modules), logging.root
    repo = tmp_path / "FoundationStereo"
    write_stand_in_clone(repo)              # imports and constructs (its files append to sys.path, Utils reloads logging)
    assert import_foundation_stereo(repo).__name__ == "FoundationStereo"
    assert sys.path == path
    assert not [name for name in set(sys.modules) - modules if name.split(".")[0] in CLONE_NAMES]
    assert logging.root is root_logger and logging.getLogger("x").parent is root_logger


def test_an_existing_core_module_is_neither_used_nor_replaced(tmp_path, monkeypatch):
    other = types.ModuleType("core")                 # some other package called `core`, already imported
    monkeypatch.setitem(sys.modules, "core", other)
    write_stand_in_clone(tmp_path / "FoundationStereo")
    assert sys.modules["core"] is other


def test_the_constructor_imports_lazily_so_it_runs_inside_the_import(block):
    "The failure of the first real run: NVIDIA's extractor imports depth_anything.dpt when the network is constructed."
    FoundationStereo = import_foundation_stereo(block["repo"])
    args = official_args(cfg_of(block))
    with pytest.raises(ModuleNotFoundError, match="No module named 'depth_anything'"):
        FoundationStereo(args)                               # constructed after the import context closed
    net = construct_foundation_stereo(block["repo"], args)    # constructed inside it
    assert type(net.feature.dino.depth_anything.pretrained).__name__ == "PatchEncoder"
    assert isinstance(net, FoundationStereo) and "depth_anything" not in sys.modules


def test_construction_is_offline_dinov2_from_the_clone_and_timm_without_weights(block, monkeypatch, capsys):
    "DINOv2 from the clone's dinov2/ (no GitHub), timm's pretrained=True made without weights, one line saying so."
    def create_model(name, pretrained=False, **kwargs):                # timm's download, then a model with a stem
        if pretrained: torch.hub.load_state_dict_from_url(f"https://huggingface.co/timm/{name}/pytorch_model.bin")
        return types.SimpleNamespace(stem=nn.Conv2d(3, 16, 3, 2, 1))
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    repo = edited_copy(block, "with_timm", "core/extractor.py", "        self.stem = nn.Conv2d(3, c, 3, 2, 1)",
                       "        import timm\n        self.stem = timm.create_model('edgenext_small', pretrained=True).stem")
    args = official_args(cfg_of(block))
    with clone_importable(repo), pytest.raises(NetworkAttempt):       # NVIDIA's constructor as it is: downloads
        import_foundation_stereo(repo)(args)
    capsys.readouterr()
    net = construct_foundation_stereo(repo, args)
    note = capsys.readouterr().err.strip()
    assert isinstance(net.feature.stem, nn.Conv2d) and "\n" not in note
    assert note.startswith(f"{repo.resolve()}: FoundationStereo constructed offline, skipped ")
    assert "timm edgenext_small's pretrained weights" in note and "torch.hub facebookresearch/dinov2 from GitHub" in note
    assert torch.hub.load is official.torch.hub.load and sys.modules["timm"].create_model is create_model  # restored


def test_a_construction_that_needs_the_network_fails_in_one_line_naming_the_fetch(block):
    repo = edited_copy(block, "fetching", "core/foundation_stereo.py", "        self.stem_4 =",
                       "        torch.hub.load_state_dict_from_url('https://example.com/weights.pth')\n        self.stem_4 =")
    with pytest.raises(OfficialModelError) as refused: construct_foundation_stereo(repo, official_args(cfg_of(block)))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{repo.resolve() / 'core/foundation_stereo.py'}: line ")
    assert "(`torch.hub.load_state_dict_from_url('https://example.com/weights.pth')`) tried to fetch example.com:443" in message
    other = edited_copy(block, "other_hub", "depth_anything/dpt.py", "'facebookresearch/dinov2'", "'someone/dinov3'")
    with pytest.raises(OfficialModelError, match="tried to fetch the torch.hub repository 'someone/dinov3' from GitHub"):
        construct_foundation_stereo(other, official_args(cfg_of(block)))


@pytest.mark.parametrize("package, pip_name", [("open3d", "open3d"), ("cv2", "opencv-python-headless")])
def test_a_missing_requirement_names_the_package_and_the_clone_file(tmp_path, monkeypatch, package, pip_name):
    monkeypatch.setitem(sys.modules, package, None)                   # `import package` fails as if not installed
    repo = tmp_path / "FoundationStereo"
    with pytest.raises(OfficialModelError) as failed: write_stand_in_clone(repo, utils_imports=("numpy", package))
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"{repo.resolve() / 'Utils.py'}: line ")
    assert f"(`import {package}`) imports {package!r}, which is not installed here (pip install {pip_name})" in message
    assert "while importing core/foundation_stereo.py" in message and "trimesh" in message       # the whole list


# --- the checkpoint ---------------------------------------------------------------------------------------------

def test_the_released_layout_loads_without_trust_and_a_pickled_object_needs_it(block, tmp_path):
    released = torch.load(block["checkpoint"], weights_only=True)                 # tensors and plain numbers
    assert sorted(released) == ["epoch", "global_step", "model"]
    model = build_model(block)
    assert all(torch.equal(model.net.state_dict()[name], value) for name, value in released["model"].items())
    pickled = tmp_path / "with_args.pth"
    torch.save({**released, "args": argparse.Namespace(lr=1e-4)}, pickled)         # as a training script may save
    with pytest.raises(OfficialModelError) as refused: build_model(block | {"checkpoint": str(pickled), "cfg": str(cfg_of(block))})
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(pickled)) and "trust_checkpoint: true" in message
    assert isinstance(build_model(block | {"checkpoint": str(pickled), "cfg": str(cfg_of(block)), "trust_checkpoint": True}),
                      FoundationStereoRepo)


def test_a_plain_state_dict_checkpoint_loads(block, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(block["checkpoint"], weights_only=True)["model"], plain)
    assert isinstance(build_model(block | {"checkpoint": str(plain), "cfg": str(cfg_of(block))}), FoundationStereoRepo)


def test_a_repo_without_the_model_file_is_one_config_line(block, tmp_path):
    (tmp_path / "empty").mkdir()
    config = finetune_config(block | {"repo": str(tmp_path / "empty")})
    problems = validate_config(config)
    assert problems == [f"model.repo: expected a clone of NVlabs/FoundationStereo: no core/foundation_stereo.py in it, "
                        f"got {str(tmp_path / 'empty')!r}"]
    missing = validate_config(finetune_config(block | {"checkpoint": str(tmp_path / "none.pth")}))
    assert [p.split(":")[0] for p in missing] == ["model.checkpoint"]


# --- the wrapper ------------------------------------------------------------------------------------------------

def test_builds_from_the_config_and_keeps_the_contract(block):
    model = build_model({"model": block})
    assert isinstance(model, FoundationStereoRepo) and model.config["source"] == "foundation_stereo_repo"
    left, right = torch.rand(2, 2, 3, 50, 70).mul(255).unbind(0)
    predictions = model.train()(left, right)
    assert len(predictions) == 1 + block["train_iters"] and all(p.shape == (2, 1, 50, 70) for p in predictions)
    with torch.no_grad(): assert model.eval()(left, right).shape == (2, 1, 50, 70)


def update_dtype(net: nn.Module, run) -> torch.dtype:
    "The dtype `net.update_block` computed in while `run()` ran."
    seen = []
    handle = net.update_block.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    try: run()
    finally: handle.remove()
    return seen[-1]


def test_blocks_compute_in_the_dtype_of_the_callers_autocast(block):
    "NVIDIA's autocast(enabled=args.mixed_precision) would run fp16, or switch the trainer's bf16 off; the wrapper's runs bf16."
    # a copy whose blocks wrap themselves the NVIDIA way with an autocast that acts on CPU (torch.cuda.amp's does not)
    repo = edited_copy(block, "cpu_autocast", "core/foundation_stereo.py", "autocast = torch.cuda.amp.autocast",
                       "import functools\nautocast = functools.partial(torch.autocast, 'cpu', dtype=torch.float16)")
    left = torch.rand(1, 3, 64, 96) * 255
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    for mixed_precision, dtype in ((True, torch.float16), (False, torch.float32)):      # NVIDIA's own behaviour
        net = construct_foundation_stereo(repo, official_args(cfg_of(block), {"mixed_precision": mixed_precision}))
        def run():
            with bf16(): net(left, left, iters=1)
        assert update_dtype(net, run) == dtype
    with pytest.warns(UserWarning, match="model.overrides.mixed_precision has no effect"):
        model = build_model(block | {"repo": str(repo), "cfg": str(cfg_of(block)), "overrides": {"mixed_precision": True}})
    assert model.autocast_follows_caller
    for autocast, dtype in ((bf16, torch.bfloat16), (lambda: torch.autocast("cpu", enabled=False), torch.float32)):
        def run():
            with autocast():
                assert model.compute_dtype("cpu") == dtype
                model.train()(left, left)
        assert update_dtype(model.net, run) == dtype
    assert build_model(block).compute_dtype("cuda") == torch.float32      # NVIDIA's cfg says fp16: no longer


def test_gradient_checkpointing_recomputes_each_update_and_keeps_gradients(block):
    model = build_model(block).train()
    torch.manual_seed(0)
    left = torch.rand(1, 3, 64, 96) * 255
    def gradients():
        model.zero_grad()
        sum(prediction.sum() for prediction in model(left, left.roll(-4, -1))).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    kept = lambda: saved_for_backward(model, left, left.roll(-4, -1), modules=dict(model.net.named_children()))
    plain, plain_kept = gradients(), kept()
    model.enable_gradient_checkpointing(True)
    assert type(model.net.update_block).__name__ == "CheckpointedSequential"
    checkpointed, checkpointed_kept = gradients(), kept()
    assert plain.keys() == checkpointed.keys()
    for name in plain: torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)
    update_inputs = 2 * 18 * 16 * 24 * 4           # what checkpointing keeps: each iteration's input (1, 18, 16, 24)
    assert plain_kept["update_block"] > 2 * update_inputs and checkpointed_kept["update_block"] == update_inputs
    assert sum(checkpointed_kept.values()) < sum(plain_kept.values())
    assert type(model.enable_gradient_checkpointing(False).net.update_block) is nn.Sequential


def test_the_memory_estimate_extrapolates_what_backward_keeps_and_warns(block, monkeypatch):
    model = build_model(block)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    estimate = model.training_memory(batch_size=2, height=192, width=256, ema=True)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())    # probes left no trace
    pair = torch.rand(2, 3, 192, 256) * 255
    measured = sum(saved_for_backward(model.train(), pair, pair.roll(-4, -1), modules=dict(model.net.named_children())).values())
    assert abs(estimate["activations"] - measured) < 0.05 * measured, (estimate, measured)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad) + sum(b.numel() * 4 for b in model.buffers())
    assert estimate["state"] == 5 * trainable + 2 * frozen
    monkeypatch.setattr(official, "free_memory", lambda device: 1024)
    with pytest.warns(UserWarning, match=r"the estimated training memory, .* at batch 2 of 256x192, train_iters 2, "
                                         r"gradient checkpointing off; .* exceeds the 0.00 GiB free on cpu"):
        model.warn_if_short_of_memory(2, [[96, 64], [256, 192]], "cpu")
    monkeypatch.setattr(official, "free_memory", lambda device: 2**40)
    assert model.warn_if_short_of_memory(2, [[256, 192]], "cpu")["total"] == estimate["total"]


# --- through the trainer and the CLI -----------------------------------------------------------------------------

def test_finetune_with_the_trainer_resume_then_eval_and_predict(block, tmp_path):
    from stereo_kit.cli import main
    from stereo_kit.train.trainer import Trainer
    config = finetune_config(block)
    run = Trainer(config, tmp_path / "run", num_iterations=20, save_every=10, **FAST)
    with pytest.warns(UserWarning, match=r"in modules the model builds but its forward never uses \(net\.stem_4\)"):
        run.fit()
    losses = [row["loss/total"] for row in run.history if "loss/total" in row]
    assert len(losses) == 20 and all(map(lambda v: v == v, losses))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses            # it learns
    assert {group["name"] for group in run.optimizer.param_groups} == {"base", "backbone"}
    backbone = next(group for group in run.optimizer.param_groups if group["name"] == "backbone")
    assert len(backbone["params"]) == len([p for p in run.unwrapped.net.feature.parameters() if p.requires_grad])

    resumed = Trainer(config, tmp_path / "run", num_iterations=22, save_every=11, checkpoint="latest", **FAST)
    resumed.fit()
    assert [row["step"] for row in resumed.history if "loss/total" in row] == [21, 22]

    weights = run.workspace.weights(22)
    model = load_weights(weights)                                     # rebuilt through the clone, weights from the file
    assert isinstance(model, FoundationStereoRepo)
    assert torch.equal(model.state_dict()["net.feature.stem.weight"], resumed.unwrapped.state_dict()["net.feature.stem.weight"])

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


def test_the_trainer_warns_before_a_run_that_would_not_fit(block, tmp_path, monkeypatch):
    from stereo_kit.train.trainer import Trainer
    monkeypatch.setattr(official, "free_memory", lambda device: 2**20)
    with pytest.warns(UserWarning, match=r"exceeds the 0.00 GiB free on cpu"):
        Trainer(finetune_config(block), tmp_path / "run", num_iterations=1, **FAST).build()
