"""stereo_kit.models: every preset on CPU, reg/alt agreement, padder round trip, checkpointing, AMP, weights files.

The overfit on the real Middlebury crop (300 steps) is marked slow: about 100 s on 2 cores."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch

from stereo_kit.models.padder import InputPadder
from stereo_kit.models.features import build_vit
from stereo_kit.models.update import CorrelationLookup
from stereo_kit.config import ConfigError, ModelConfig, validate_config
from stereo_kit.models import MODEL_PRESETS, build_model, count_parameters, load_weights, save_weights

# A random DINOv2 must be trainable (a frozen random one is refused); its warning is expected throughout.
TINY_VIT = {"preset": "tiny", "feature_type": "dinov2", "vit_size": "tiny", "vit_trainable": True}
pytestmark = pytest.mark.filterwarnings("ignore:model. building a DINOv2")


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> str:
    "A local pretrained-DINOv2 folder (random weights), as a user would download once."
    folder = tmp_path_factory.mktemp("dinov2") / "dinov2-tiny"
    build_vit("tiny").save_pretrained(folder)
    return str(folder)


def stereo_pair(height=60, width=90, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, height, width, generator=generator) * 255,
            torch.rand(batch, 3, height, width, generator=generator) * 255)


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_preset_shapes_train_and_eval(preset):
    torch.manual_seed(0)
    model = build_model({"preset": preset, "vit_trainable": True})
    left, right = stereo_pair(50, 70, batch=1)
    predictions = model.train()(left, right, iters=2)
    assert [tuple(p.shape) for p in predictions] == [(1, 1, 50, 70)] * 3
    assert all(torch.isfinite(p).all() for p in predictions)
    with torch.no_grad():
        final, low = model.eval()(left, right, iters=2, return_low_resolution=True)
    assert final.shape == (1, 1, 50, 70) and low.shape == (1, 1, 13, 18)
    torch.testing.assert_close(final, predictions[-1].detach(), atol=1e-4, rtol=1e-4)


def test_default_iterations_come_from_config():
    model = build_model({"preset": "tiny", "train_iters": 3, "valid_iters": 5})
    left, right = stereo_pair(32, 32, batch=1)
    assert len(model.train()(left, right)) == 1 + 3
    model.eval()
    with torch.no_grad(): assert model(left, right).shape == (1, 1, 32, 32)


def test_large_preset_is_the_paper_size_and_is_built_not_run():
    with torch.device("meta"):                          # shapes only: no memory, no initialisation time
        model = build_model({"preset": "large", "vit_trainable": True})
    counts = count_parameters(model)
    assert model.config["max_disp"] == 416 and model.config["hidden_dims"] == [128, 128, 128]
    assert model.features.vit.config.hidden_size == 1024 and model.features.vit.config.num_hidden_layers == 24
    assert 300e6 < counts["vit"] < 310e6                # DINOv2 ViT-L/14 (the Depth-Anything-V2 encoder)
    assert counts["total"] == counts["vit"] + counts["rest"]
    assert ModelConfig.model_fields["vit_trainable"].default is False     # frozen by default


def test_disparity_sign_convention_in_lookup():
    "A right view shifted by 3 (1/4-res) pixels gives cosine 1 at disparity 3, offset 0: positive = left x - right x."
    features = torch.randn(1, 8, 4, 20, generator=torch.Generator().manual_seed(1))
    right = torch.roll(features, shifts=-3, dims=-1)   # right(x) = left(x + 3), so left x matches right x - 3
    geometry = torch.zeros(1, 2, 8, 4, 20)
    for implementation in ("reg", "alt"):
        lookup = CorrelationLookup(features, right, geometry, levels=1, radius=1, implementation=implementation)
        values = lookup(torch.full((1, 1, 4, 20), 3.0))[0, :3, :, 3:17]
        torch.testing.assert_close(values[1], torch.ones(4, 14))
        assert (values[0] < 1 - 1e-3).all() and (values[2] < 1 - 1e-3).all()


@pytest.mark.parametrize("config", [{"preset": "tiny"}, TINY_VIT, {**TINY_VIT, "n_gru_layers": 3, "hidden_dims": [16, 16, 16],
                                                                  "feature_channels": [16, 24, 32]}])
def test_reg_and_alt_give_the_same_result(config):
    "Whole model: within 1e-5 px in float64 (same mathematics); in float32 within float32 rounding of ~30 px values."
    torch.manual_seed(0)
    reg = build_model({**config, "correlation_implementation": "reg"}).eval()
    alt = build_model({**config, "correlation_implementation": "alt"}).eval()
    alt.load_state_dict(reg.state_dict())
    left, right = stereo_pair(64, 96)
    with torch.no_grad():
        a, b = reg(left, right, iters=4), alt(left, right, iters=4)
        assert float((a - b).abs().max()) < 1e-6 * float(b.abs().max()) + 1e-6
        a64, b64 = reg.double()(left.double(), right.double(), iters=4), alt.double()(left.double(), right.double(), iters=4)
    assert a64.dtype == torch.float64
    assert float((a64 - b64).abs().max()) < 1e-5
    torch.testing.assert_close(a64.float(), a, atol=1e-3, rtol=1e-4)


def test_reg_and_alt_lookups_agree_on_real_features():
    torch.manual_seed(0)
    model = build_model({"preset": "tiny"}).eval()
    left, right = stereo_pair(64, 96)
    with torch.no_grad():
        levels = model.features(torch.cat([left, right]) / 127.5 - 1)
        left4, right4 = levels[0][:2], levels[0][2:]
        geometry = torch.randn(2, 8, 16, 16, 24)
        disparity = torch.rand(2, 1, 16, 24) * 15
        a = CorrelationLookup(left4, right4, geometry, 2, 2, "reg")(disparity)
        b = CorrelationLookup(left4, right4, geometry, 2, 2, "alt")(disparity)
    assert float((a - b).abs().max()) < 1e-5


@pytest.mark.parametrize("mode", ["sintel", "kitti"])
@pytest.mark.parametrize("size", [(1, 1), (31, 33), (37, 51), (255, 333), (64, 96)])
def test_padder_round_trip_is_exact(mode, size):
    image = torch.randn(2, 3, *size, dtype=torch.float64)
    padder = InputPadder(image.shape, mode=mode)
    padded, = padder.pad_tensors(image)
    assert padded.shape[-2] % 32 == 0 and padded.shape[-1] % 32 == 0
    assert padded.shape[-2] - size[0] < 32 and padded.shape[-1] - size[1] < 32
    assert torch.equal(padder.unpad(padded), image)
    if mode == "kitti": assert torch.equal(padded[..., : size[0], : size[1]], image)


def model_problems(block) -> list[str]:
    return [p for p in validate_config({"model": block}) if p.startswith("model")]


def test_config_problems_are_all_reported_with_their_keys():
    config = {"preset": "tiny", "correlation_implementation": "x", "n_gru_layers": 4, "max_disp": 100,
              "feature_type": "resnet", "unknown": 1}
    problems = model_problems(config)
    assert "model.correlation_implementation: expected one of 'reg' or 'alt', got 'x'" in problems
    for key in ("model.n_gru_layers", "model.max_disp", "model.feature_type", "model.unknown"):
        assert any(problem.startswith(key + ":") for problem in problems), key
    with pytest.raises(ConfigError) as error:
        build_model(config)
    assert all(problem in str(error.value) for problem in problems)
    assert model_problems({"preset": "tiny", "hidden_dims": [32], "n_gru_layers": 2}) == [
        "model.hidden_dims: expected at least n_gru_layers=2 entries, got [32]"]
    assert model_problems({"preset": "giant"})[0].startswith("model.preset: expected one of")


def test_config_keys_override_the_preset():
    model = build_model({"preset": "small", "feature_type": "cnn", "max_disp": 128, "hidden_dims": [48, 40, 32]})
    assert model.features.vit is None and model.num_disparities == 32
    assert [gru.convz.out_channels for gru in model.update.grus] == [48, 40, 32]
    assert MODEL_PRESETS["small"]["max_disp"] == 192        # the registry is not modified


@pytest.mark.parametrize("config", [{"preset": "tiny"}, TINY_VIT])
def test_gradient_checkpointing_changes_nothing_but_memory(config):
    torch.manual_seed(0)
    model = build_model(config).train()
    left, right = stereo_pair(64, 96)

    def gradients():
        model.zero_grad(set_to_none=True)
        predictions = model(left, right, iters=3)
        sum((p - 10).abs().mean() for p in predictions).backward()
        return [p.detach() for p in predictions], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_predictions, plain = gradients()
    model.enable_gradient_checkpointing()
    checkpointed_predictions, checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    if config.get("vit_trainable"): assert any(name.startswith("features.vit.") for name in plain)
    for a, b in zip(plain_predictions, checkpointed_predictions): torch.testing.assert_close(a, b)
    for name in plain: torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_reduces_saved_bytes():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from model_memory import saved_bytes
    model = build_model({"preset": "tiny"}).train()
    left, right = stereo_pair(64, 96)
    plain = saved_bytes(model, left, right)
    checkpointed = saved_bytes(model.enable_gradient_checkpointing(), left, right)
    assert checkpointed < 0.6 * plain


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_with_float32_outputs(dtype):
    torch.manual_seed(0)
    model = build_model(TINY_VIT).train()
    left, right = stereo_pair(64, 96)
    with torch.no_grad(): reference = model(left, right, iters=3)
    with torch.autocast("cpu", dtype=dtype):
        predictions = model(left, right, iters=3)
        sum(p.mean() for p in predictions).backward()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in predictions)
    assert float((predictions[-1].detach() - reference[-1]).abs().mean()) < 0.5
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_weights_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model({**TINY_VIT, "correlation_implementation": "alt"}).eval()
    save_weights(tmp_path / "weights" / "model.pt", model)
    state_dict = torch.load(tmp_path / "weights" / "model.pt", weights_only=True)
    assert state_dict.keys() == model.state_dict().keys()
    assert json.loads((tmp_path / "weights" / "model.json").read_text())["model"] == model.config
    restored = load_weights(tmp_path / "weights" / "model.pt").eval()
    left, right = stereo_pair(32, 64, batch=1)
    with torch.no_grad(): torch.testing.assert_close(restored(left, right, iters=2), model(left, right, iters=2))
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["model.json", "model.pt"]


class NetworkAttempt(Exception):
    "Raised by the blocked socket layer; deliberately not an OSError, so no caller can mistake it for a missing file."


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs): raise NetworkAttempt(f"network access attempted: {args[:2]}")
    for name in ("connect", "connect_ex", "sendto"): monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_pretrained_vit_loads_from_a_local_directory_without_network(tmp_path, tiny_dinov2, no_network):
    vit = build_vit("tiny", pretrained=tiny_dinov2)
    model = build_model({**TINY_VIT, "vit_trainable": False, "pretrained": tiny_dinov2})
    for name, value in vit.state_dict().items():
        torch.testing.assert_close(model.features.vit.state_dict()[name], value)
    with pytest.raises(ConfigError, match="model.pretrained: folder not found"):    # the config layer checks first
        build_model({**TINY_VIT, "pretrained": str(tmp_path / "missing")})
    with pytest.raises(OSError):                         # and the loader itself refuses locally, never fetches
        build_vit("tiny", pretrained=str(tmp_path / "missing"))


def test_parameter_groups_split_vit_and_rest(tiny_dinov2):
    frozen = build_model({**TINY_VIT, "vit_trainable": False, "pretrained": tiny_dinov2})
    trainable = build_model(TINY_VIT)
    assert frozen.parameter_groups()["vit"] == [] and not any(p.requires_grad for p in frozen.features.vit.parameters())
    groups = trainable.parameter_groups()
    assert len(groups["vit"]) == len(list(trainable.features.vit.parameters())) - 1      # the mask token is frozen
    assert len(groups["vit"]) + len(groups["rest"]) == sum(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("config", [{"preset": "tiny"}, TINY_VIT, {"preset": "tiny", "n_gru_layers": 1}])
def test_every_trainable_parameter_gets_a_gradient(config):
    "DistributedDataParallel (accelerate) fails on parameters that take no part in the loss."
    model = build_model(config).train()
    left, right = stereo_pair(64, 96, batch=1)
    sum(p.mean() for p in model(left, right, iters=2)).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.slow
def test_tiny_preset_overfits_one_real_middlebury_crop():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from model_overfit import overfit
    curve = overfit(steps=300, every=50, verbose=True)
    print("EPE curve:", curve)
    assert curve[0][1] > 5 and curve[-1][1] < 1.0


def test_a_frozen_random_vit_is_refused_with_the_way_out():
    with pytest.raises(ConfigError) as error:
        build_model({"preset": "small"})
    assert "model.pretrained: a frozen DINOv2 (small) with random weights" in str(error.value)
    with pytest.warns(UserWarning, match="random weights"):
        build_model(TINY_VIT)
