"""Checks of stereo_kit.losses and stereo_kit.metrics that the notebooks cannot hold: the spec's loss block
as JSON text, sweeps over random batches against independent numpy formulas, and CUDA autocast (GPU only)."""
import json

import numpy as np
import pytest
import torch

from stereo_kit.metrics import MetricAccumulator, compute_metrics
from stereo_kit.losses import LOSS_FUNCTIONS, build_loss
from stereo_kit.testing import example_batch

SPEC_LOSS_BLOCK = """
{
  "loss": {
    "stereo": {
      "disparity_l1": {
        "function": "disparity_l1_loss",
        "weight": 1.0,
        "params": {"max_disparity": 192.0}
      },
      "multi_scale": {
        "function": "multi_scale_loss",
        "weight": 0.3,
        "params": {
          "weights": [0.5, 0.7, 1.0],
          "loss_type": "smooth_l1"
        }
      }
    }
  }
}
"""


def _numpy(batch):
    return {k: v.numpy().astype(np.float64) for k, v in batch.items()}


def _supervised(disparity, valid, max_disparity=np.inf):
    with np.errstate(invalid="ignore"):
        return valid.astype(bool) & np.isfinite(disparity) & (disparity < max_disparity)


def _smooth_l1(error, beta=1.0):
    return np.where(error < beta, 0.5 * error**2 / beta, error - 0.5 * beta)


@pytest.mark.parametrize("seed", range(3))
def test_spec_block_matches_numpy(seed):
    batch = example_batch(seed=seed, height=8, width=12)
    batch["disparity"][0, 0, 1, 1] = 300.0                     # above the spec's max_disparity of 192
    offsets = [3.0, -1.5, 0.25]                                 # three full-resolution predictions
    predictions = [batch["prediction"] + o for o in offsets]
    total, terms = build_loss(json.loads(SPEC_LOSS_BLOCK))(predictions, batch["disparity"], batch["valid"], "stereo")

    array = _numpy(batch)
    gt, final = array["disparity"], array["prediction"] + offsets[-1]
    capped = _supervised(gt, array["valid"], 192.0)
    l1 = np.abs(final - gt)[capped].mean()
    anywhere = _supervised(gt, array["valid"])
    multi = sum(w * _smooth_l1(np.abs(array["prediction"] + o - gt)[anywhere]).mean()
                for w, o in zip([0.5, 0.7, 1.0], offsets))
    assert terms["stereo/disparity_l1"].item() == pytest.approx(l1, rel=1e-5)
    assert terms["stereo/multi_scale"].item() == pytest.approx(multi, rel=1e-5)
    assert total.item() == pytest.approx(l1 + 0.3 * multi, rel=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_sequence_and_gradient_losses_match_numpy(seed):
    batch = example_batch(seed=seed)
    array = _numpy(batch)
    gt, prediction = array["disparity"], array["prediction"]
    mask = _supervised(gt, array["valid"])

    iterations = [batch["prediction"] * s for s in (0.5, 0.9, 1.1, 1.0)]
    gamma = 0.8 ** (15 / 3)
    expected = sum(gamma ** (3 - i) * np.abs(prediction * s - gt)[mask].mean()
                   for i, s in enumerate((0.5, 0.9, 1.1, 1.0)))
    value = LOSS_FUNCTIONS["sequence_loss"].function(iterations, batch["disparity"], batch["valid"], gamma=0.8)
    assert value.item() == pytest.approx(expected, rel=1e-5)

    clean = np.where(mask, gt, 0.0)
    errors, pairs = [], []
    for axis in (-1, -2):
        pair = np.logical_and(np.delete(mask, 0, axis), np.delete(mask, -1, axis))
        errors.append(np.abs(np.diff(prediction, axis=axis) - np.diff(clean, axis=axis))[pair])
        pairs.append(pair.sum())
    expected = sum(e.sum() for e in errors) / sum(pairs)
    value = LOSS_FUNCTIONS["gradient_loss"].function(batch["prediction"], batch["disparity"], batch["valid"])
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_accumulator_equals_per_image_metrics_numpy_and_torch():
    batch = example_batch(seed=5, batch=4)
    accumulator = MetricAccumulator()
    accumulator.update(batch["prediction"], batch["disparity"], batch["valid"])
    per_image = [compute_metrics(batch["prediction"][i, 0].numpy(), batch["disparity"][i, 0].numpy(),
                                 batch["valid"][i, 0].numpy()) for i in range(4)]
    averaged = accumulator.compute("per_image")
    for name in per_image[0]:
        assert averaged[name] == pytest.approx(np.mean([m[name] for m in per_image]), rel=1e-9)

    array = _numpy(batch)
    mask = _supervised(array["disparity"], array["valid"])
    error = np.abs(array["prediction"] - array["disparity"])[mask]
    pooled = accumulator.compute()
    assert pooled["epe"] == pytest.approx(error.mean(), rel=1e-9)
    assert pooled["bad2"] == pytest.approx(100 * (error > 2).mean(), rel=1e-9)
    assert pooled["d1"] == pytest.approx(
        100 * ((error > 3) & (error > 0.05 * array["disparity"][mask])).mean(), rel=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_float16_computes_in_float32():
    batch = {k: v.cuda() for k, v in example_batch(height=16, width=32).items()}
    for name, loss in LOSS_FUNCTIONS.items():
        prediction = batch["prediction"].half().requires_grad_()
        extra = {"left": batch["left"]} if loss.uses_left else {}
        with torch.autocast("cuda", dtype=torch.float16):
            value = loss.function(prediction, batch["disparity"], batch["valid"], **extra)
        value.backward()
        reference = loss.function(prediction.detach().float(), batch["disparity"], batch["valid"], **extra)
        assert value.dtype == torch.float32, name
        assert value.item() == pytest.approx(reference.item(), rel=1e-6), name
        assert torch.isfinite(prediction.grad).all(), name
    metrics = compute_metrics(batch["prediction"][:1], batch["disparity"][:1], batch["valid"][:1])
    cpu = compute_metrics(batch["prediction"][:1].cpu(), batch["disparity"][:1].cpu(), batch["valid"][:1].cpu())
    assert metrics == pytest.approx(cpu)
