"""The one config layer: every bad config a user can write gets its one-line, key-named message, from
`validate_config` and from `stereo-kit check-data --config`; nothing bad reaches numpy or torch."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from stereo_kit.cli import main
from stereo_kit.config import (AugmentationConfig, ConfigError, DATASET_FORMATS, LOSS_PARAMS, config_schema,
                               resolve_config, validate_config)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = str(ROOT / "data_samples")


def good_config() -> dict:
    return {"model": {"preset": "tiny", "max_disp": 96},
            "data": {"datasets": [{"name": "samples", "path": SAMPLES, "image_augmentation": ["jittering"]},
                                  {"name": "motorcycle", "path": SAMPLES + "/middlebury_motorcycle", "weight": 2}],
                     "image_sizes": [[320, 256]], "max_disparity": 96, "index_cache": None},
            "loss": {"stereo": {"l1": {"function": "disparity_l1_loss", "params": {"max_disparity": 96}},
                                "sequence": {"function": "sequence_loss", "weight": 0.5}}}}


def with_change(path: str, value):
    "The good config with the value at a dotted path (`data.datasets.1.weight`) replaced or, for DELETE, removed."
    config = good_config()
    *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
    target = config
    for part in parents: target = target[part]
    if value is DELETE: del target[last]
    else: target[last] = value
    return config


DELETE = object()

# (what is changed, new value, the exact start of the one expected problem)
BAD_CONFIGS = [
    ("data.max_disparity", math.nan, "data.max_disparity: expected a positive number, got nan"),
    ("data.max_disparity", math.inf, "data.max_disparity: expected a positive number, got inf"),
    ("data.max_disparity", -5, "data.max_disparity: expected a positive number, got -5"),
    ("data.max_disparity", "192", "data.max_disparity: expected a positive number, got '192'"),
    ("data.max_disparity", DELETE, "data.max_disparity: required key missing"),
    ("data.datasets.1.weight", -1, "data.datasets[1].weight: expected a positive number, got -1"),
    ("data.datasets.1.weight", math.nan, "data.datasets[1].weight: expected a positive number, got nan"),
    ("data.datasets.1.weight", True, "data.datasets[1].weight: expected a positive number, got True"),
    ("data.datasets.0.name", ["samples"], "data.datasets[0].name: expected a string, got ['samples']"),
    ("data.datasets.0.format", ["standard"], "data.datasets[0].format: expected one of 'standard'"),
    ("data.datasets.0.path", "/no/such/folder", "data.datasets[0].path: folder not found"),
    ("data.datasets.0.path", DELETE, "data.datasets[0].path: required for format 'standard'"),
    ("data.datasets.1", {"name": "rendered", "format": "synthetic", "path": SAMPLES},
     "data.datasets[1].path: format 'synthetic' renders its samples; remove path"),
    ("data.datasets.0.label_type", "mono", "data.datasets[0].label_type: expected one of 'stereo', got 'mono'"),
    ("data.datasets.0.image_augmentation", ["jittering", "flip"],
     "data.datasets[0].image_augmentation[1]: expected one of ['jittering', 'eraser', 'noise', 'blur'], got 'flip'"),
    ("data.datasets.0.wieght", 1.0, "data.datasets[0].wieght: unknown key; expected one of"),
    ("data.datasets.0.options", {"split": "TRAIN"}, "data.datasets[0].options.split: unknown key; expected one of ['disparity_format']"),
    ("data.datasets.1.name", "samples", "data.datasets: expected unique dataset names; ['samples'] used more than once"),
    ("data.datasets", [], "data.datasets: expected a non-empty list, got []"),
    ("data.datasets", "samples", "data.datasets: expected a list, got 'samples'"),
    ("data.image_sizes", [[320]], "data.image_sizes[0]: expected [width, height], two positive integers, got [320]"),
    ("data.image_sizes", [[320, 0]], "data.image_sizes[0]: expected [width, height], two positive integers, got [320, 0]"),
    ("data.num_workers", -1, "data.num_workers: expected an integer >= 0, got -1"),
    ("data.num_workers", 1.5, "data.num_workers: expected an integer >= 0, got 1.5"),
    ("data.max_bad_fraction", 2, "data.max_bad_fraction: expected a number in [0, 1], got 2"),
    ("data.worker_type", "fork", "data.worker_type: expected one of 'process' or 'thread', got 'fork'"),
    ("data.stereo_augmentation", "yes", "data.stereo_augmentation: expected true or false, got 'yes'"),
    ("data.augmentation", {"scale": {"probability": 1.5}},
     "data.augmentation.scale.probability: expected a probability in [0, 1], got 1.5"),
    ("data.augmentation", {"scale": {"scale": [1.2, 0.8]}},
     "data.augmentation.scale.scale: expected [low, high] with 0 < low <= high, got [1.2, 0.8]"),
    ("data.augmentation", {"rotate": {}}, "data.augmentation.rotate: unknown key; expected one of"),
    ("data.augmentation", {"eraser": {"count": [1.5, 3]}},
     "data.augmentation.eraser.count: expected [low, high], two integers with 1 <= low <= high, got [1.5, 3]"),
    ("data", None, "data: expected an object, got None"),
    ("model", "tiny", 'model: expected an object; for a preset write {"preset": "tiny"}, got \'tiny\''),
    ("model", ["tiny"], "model: expected an object, got ['tiny']"),
    ("model", None, "model: expected an object, got None"),
    ("model.model", "tiny", "model.model: unknown key; expected one of"),
    ("model.preset", "huge", "model.preset: expected one of 'tiny', 'small', 'base' or 'large', got 'huge'"),
    ("model.max_disp", 100, "model.max_disp: expected a positive multiple of 16, got 100"),
    ("model.hidden_dims", [32], "model.hidden_dims: expected at least n_gru_layers=2 entries, got [32]"),
    ("model.feature_type", "dinov2", "model.pretrained: a frozen DINOv2 (tiny) with random weights"),
    ("model.train_iters", 0, "model.train_iters: expected a positive integer, got 0"),
    ("loss.stereo.l1.weight", math.nan, "loss.stereo.l1.weight: expected a number >= 0, got nan"),
    ("loss.stereo.l1.function", "l2_loss", "loss.stereo.l1.function: expected one of"),
    ("loss.stereo.l1.function", ["disparity_l1_loss"], "loss.stereo.l1.function: expected a string"),
    ("loss.stereo.sequence.params", {"gamma": 1.5}, "loss.stereo.sequence.params.gamma: expected a number in (0, 1], got 1.5"),
    ("loss.stereo.sequence.params", {"gama": 0.8}, "loss.stereo.sequence.params.gama: unknown key; expected one of ['gamma', 'max_disparity']"),
    ("loss.stereo", {}, "loss.stereo: expected a non-empty"),
    ("loss", {"mono": {"l1": {"function": "disparity_l1_loss"}}}, "loss.mono: expected one of 'stereo'"),
    # rules between blocks
    ("model.max_disp", 64, "data.max_disparity: 96 exceeds model.max_disp=64, the range of the model's cost volume"),
    ("loss.stereo.l1.params.max_disparity", 300, "loss.stereo.l1.params.max_disparity: 300 exceeds data.max_disparity=96"),
    ("trainer", {}, "trainer: unknown block; expected one of"),
    # the trainer's blocks
    ("lr_scheduler", {"name": "cosine"}, "lr_scheduler.name: expected one of ['warmup_cosine', 'one_cycle', 'step', 'constant']"),
    ("lr_scheduler", {"name": "step"}, "lr_scheduler.step_size: required key missing"),
    ("optimizer", {"name": "LAMB"}, "optimizer.name: expected one of 'AdamW', 'Adam' or 'SGD', got 'LAMB'"),
    ("optimizer", {"param_groups": [{"name": "vit", "pattern": "(features"}]},
     "optimizer.param_groups[0].pattern: expected a regular expression"),
    ("optimizer", {"lr": math.inf}, "optimizer.lr: expected a positive number, got inf"),
    ("clip_grad_norm", 0, "clip_grad_norm: expected a positive number, got 0"),
    ("ema_decay", 1.0, "ema_decay: expected a number in (0, 1), got 1.0"),
    ("eval", {"datasets": [{"name": "a", "path": SAMPLES}, {"name": "a", "path": SAMPLES}]},
     "eval.datasets: expected unique dataset names; ['a'] used more than once"),
    ("train", {"max_nonfinite_steps": 0}, "train.max_nonfinite_steps: expected a positive integer, got 0"),
]


def test_the_good_config_is_valid():
    assert validate_config(good_config()) == []


@pytest.mark.parametrize("path, value, expected", BAD_CONFIGS, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD_CONFIGS])
def test_each_bad_config_gets_its_one_key_named_message(path, value, expected):
    problems = validate_config(with_change(path, value))
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems[0]
    assert "\n" not in problems[0]


def test_every_problem_is_reported_at_once():
    config = good_config()
    config["data"]["max_disparity"] = math.nan
    config["data"]["datasets"][1]["weight"] = -1
    config["model"] = "tiny"
    config["loss"]["stereo"]["l1"]["wieght"] = 2
    problems = validate_config(config)
    assert [p.split(":")[0] for p in problems] == [
        "model", "data.datasets[1].weight", "data.max_disparity", "loss.stereo.l1.wieght"]


@pytest.mark.parametrize("config", [None, [], "config.json", 3, {"data": "x", "model": 1, "loss": []}])
def test_malformed_input_is_reported_never_raised(config):
    problems = validate_config(config)
    assert problems and all(isinstance(p, str) for p in problems)


def test_label_types_must_match_between_data_and_loss():
    from stereo_kit.config import cross_block_problems, resolve_block
    data = resolve_block("data", good_config()["data"])
    loss = {"stereo": resolve_block("loss", good_config()["loss"])["stereo"]}
    # a loss block for another label type (as a user-registered label type would give) with no dataset using it
    problems = cross_block_problems({"data": data, "loss": {**loss, "sparse": loss["stereo"]}})
    assert problems == ["loss.sparse: no dataset has label_type 'sparse'"]
    problems = cross_block_problems({"data": data, "loss": {"sparse": loss["stereo"]}})
    assert problems[0].startswith("data.datasets[0].label_type: 'stereo' has no terms in the loss block")


def test_resolved_config_fills_every_default_once():
    resolved = resolve_config(good_config())
    assert resolved.data.augmentation.horizontal_flip.probability == 0.5
    assert resolved.data.datasets[0].options == {"disparity_format": None} and resolved.data.datasets[0].format == "standard"
    assert resolved.loss["stereo"]["sequence"].params == {"gamma": 0.9, "max_disparity": None}
    assert resolved.model.n_gru_layers == 2 and resolved.model.max_disp == 96
    # the tables are the only source: a config that sets nothing gets exactly the table's values
    assert resolved.data.augmentation == AugmentationConfig()
    with pytest.raises(ConfigError) as error:
        resolve_config(with_change("data.max_disparity", math.nan))
    assert error.value.problems == ["data.max_disparity: expected a positive number, got nan"]


def test_the_registries_and_the_tables_name_the_same_things():
    from stereo_kit.data.augment import AUGMENTATIONS
    from stereo_kit.data.datasets import GENERATORS, READERS
    from stereo_kit.losses import LOSS_FUNCTIONS
    assert list(AUGMENTATIONS) == list(AugmentationConfig.model_fields)
    assert set(READERS) | set(GENERATORS) == set(DATASET_FORMATS)
    assert set(LOSS_FUNCTIONS) == set(LOSS_PARAMS)


def test_schema_covers_every_block():
    schema = config_schema()
    assert set(schema["properties"]) == {"model", "data", "loss", "optimizer", "lr_scheduler", "clip_grad_norm",
                                         "ema_decay", "eval", "train"}
    assert "DataConfig" in schema["$defs"] and schema["$defs"]["DataConfig"]["additionalProperties"] is False


# ---- the command line, as a user runs it ------------------------------------------------------------------------

def write(tmp_path, config, name="config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


SECTION_ONE = [   # the cases the config issue found by hand, each with its expected line
    (("data.max_disparity", math.nan), "data.max_disparity: expected a positive number, got nan"),
    (("model", "tiny"), 'model: expected an object; for a preset write {"preset": "tiny"}'),
    (("model", ["tiny"]), "model: expected an object, got ['tiny']"),
    (("model", None), "model: expected an object, got None"),
    (("model.max_disp", 64), "data.max_disparity: 96 exceeds model.max_disp=64"),
    (("loss.stereo.l1.params.max_disparity", 300), "loss.stereo.l1.params.max_disparity: 300 exceeds data.max_disparity=96"),
]


@pytest.mark.parametrize("change, expected", SECTION_ONE)
def test_check_data_config_prints_the_same_one_line_message(tmp_path, change, expected):
    result = CliRunner().invoke(main, ["check-data", "--config", write(tmp_path, with_change(*change)), "--no-progress"])
    assert result.exit_code == 1
    lines = [line.strip() for line in result.output.splitlines()]
    assert lines[0].endswith("1 problem(s):")
    assert lines[1].startswith(expected), lines


def test_a_file_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [')
    result = CliRunner().invoke(main, ["config", "show", str(path)])
    assert result.exit_code == 1 and f"{path}: 1 problem(s)" in result.output and "not valid JSON" in result.output


def test_config_show_prints_the_resolved_config(tmp_path):
    result = CliRunner().invoke(main, ["config", "show", write(tmp_path, good_config())])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["data"]["augmentation"]["jittering"]["brightness"] == 0.3
    assert shown["model"]["hidden_dims"] == [32, 32]
    assert resolve_config(shown).model_dump() == resolve_config(good_config()).model_dump()    # a fixed point


def test_config_schema_is_json_schema():
    result = CliRunner().invoke(main, ["config", "schema"])
    assert result.exit_code == 0 and json.loads(result.output)["title"] == "StereoConfig"


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, stereo_kit.cli; print(sorted(m for m in ('torch', 'numpy', 'cv2', 'pydantic') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
    subprocess.run(["stereo-kit", "--help"], capture_output=True, check=True)       # warm the file cache
    start = time.perf_counter()
    subprocess.run(["stereo-kit", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - start < 1.0           # about 0.15 s here; generous for a loaded CI machine


def test_multi_scale_weights_beyond_the_models_predictions_are_refused_up_front(tmp_path):
    # model.train_iters 1 gives 2 predictions (initial + one iteration); the default loss scores the last 3 of them
    config = good_config()
    del config["loss"]
    config["model"]["train_iters"] = 1
    expected = ("loss.stereo.multi_scale.params.weights: 3 weights, but model.train_iters=1 gives 2 prediction(s) to "
                "score (the initial disparity and one per iteration); raise model.train_iters or give at most 2 weight(s)")
    assert validate_config(config) == [expected]
    with pytest.raises(ConfigError) as error:
        resolve_config(config)
    assert error.value.problems == [expected]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["check-data", "--config", str(path), "--no-progress"])
    assert result.exit_code == 1 and expected in result.output
    config["model"]["train_iters"] = 2
    assert validate_config(config) == []
