"""The modules fit together as the trainer will use them: a config's data, model and loss blocks, on data_samples.

One short CPU run through the real pieces — batches from `build_dataloader`, the tiny model, the spec's loss block,
the metrics — checks the contracts between them (shapes, dtypes, keys, label types) and that learning happens.
"""
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from stereo_kit.metrics import MetricAccumulator, compute_metrics
from stereo_kit.config import validate_config
from stereo_kit.models import build_model
from stereo_kit.data.loader import build_dataloader
from stereo_kit.losses import build_loss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quickstart():
    return json.loads((ROOT / "configs/train/quickstart.json").read_text())


@pytest.mark.parametrize("name", ["quickstart.json", "stereo_v1.json"])
def test_shipped_configs_validate(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = json.loads((ROOT / "configs/train" / name).read_text())
    assert validate_config(config, check_paths=False) == []
    problems = validate_config(config)
    if name == "stereo_v1.json":      # the spec's config points at the user's ./data and a local DINOv2 ViT-L
        assert [p.split(":")[0] for p in problems] == ["model.pretrained", "data.datasets[0].path"], problems
    else:
        assert problems == []


def test_a_few_steps_through_every_module(quickstart, monkeypatch):
    monkeypatch.chdir(ROOT)                                   # config paths are relative to the working directory
    torch.manual_seed(0)
    data = {**quickstart["data"], "index_cache": None}
    model = build_model(quickstart["model"])
    loss = build_loss(quickstart, max_disparity=data["max_disparity"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batches = iter(build_dataloader(data, batch_size=2, seed=0, num_workers=0))
    width, height = data["image_sizes"][0]

    fixed = next(batches)                                     # overfit one real batch: the loss must fall
    assert fixed["left"].shape == (2, 3, height, width) and fixed["left"].dtype == torch.float32
    assert fixed["valid"].dtype == torch.bool and fixed["disparity"].shape == (2, 1, height, width)
    assert set(fixed["label_type"]) <= set(loss.label_types)
    losses = []
    model.train()
    for _ in range(12):
        predictions = model(fixed["left"], fixed["right"])
        refined = quickstart["model"].get("refine_radius", 0) > 0           # the full-resolution refinement: one more
        assert len(predictions) == 1 + quickstart["model"]["train_iters"] + refined
        assert all(p.shape == fixed["disparity"].shape for p in predictions)
        total, terms = loss(predictions, fixed["disparity"], fixed["valid"], fixed["label_type"])
        assert set(terms) == {"stereo/disparity_l1", "stereo/multi_scale"} and math.isfinite(total.item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert min(losses[-3:]) < 0.8 * losses[0], losses

    model.eval()
    accumulator = MetricAccumulator(max_disparity=data["max_disparity"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")                        # data_samples has no bad file: nothing may be skipped
        for _, batch in zip(range(2), batches):
            prediction = model(batch["left"], batch["right"])
            assert prediction.shape == batch["disparity"].shape
            accumulator.update(prediction, batch["disparity"], batch["valid"])
            single = compute_metrics(prediction[0], batch["disparity"][0], batch["valid"][0])
            assert {"epe", "bad1", "bad3", "d1", "rmse"} <= set(single)
    pooled = accumulator.compute()
    assert pooled["images"] == 4 and 0 < pooled["epe"] < data["max_disparity"]
