"""What gradient checkpointing saves: bytes kept for backward and training-step time, checkpointed / plain, same run.

Bytes are measured with `torch.autograd.graph.saved_tensors_hooks`: every tensor autograd stores for the backward pass
is counted once per storage (views of one buffer count once), parameters excluded (they exist anyway). Tensors inside
a checkpointed region are not stored — they are recomputed during backward — but the region's inputs are kept for
that recomputation, so with checkpointing those inputs (images, cost volume, hidden states, the correlation pyramid)
are counted too.
Time is the median over alternating plain / checkpointed forward+backward steps, so both see the same machine load.

    python benchmarks/model_memory.py [--preset tiny] [--height 256 --width 320 --batch 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from stereo_kit.models import build_model


def tensors_in(value):
    "Every tensor in `value`: a tensor, nested lists/tuples/dicts, or an object's attributes (e.g. a CorrelationLookup)."
    if isinstance(value, torch.Tensor): yield value
    elif isinstance(value, (list, tuple)):
        for item in value: yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values(): yield from tensors_in(item)
    elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module):
        yield from tensors_in(vars(value))


def saved_bytes(model, left, right) -> int:
    """Bytes of the distinct non-parameter storages kept for backward during one forward pass of `model`: what autograd
    saves (saved-tensor hooks) plus, when checkpointing, the inputs each checkpointed region holds for recomputation."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters: storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def keep_inputs(_module, args):
        for tensor in tensors_in(args): keep(tensor)

    run = model._run
    def run_and_count(function, *args):
        if model.gradient_checkpointing: keep_inputs(None, args)
        return run(function, *args)

    model._run = run_and_count
    hook = model.features.register_forward_pre_hook(keep_inputs) if model.gradient_checkpointing else None
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            predictions = model(left, right)
    finally:
        del model._run
        if hook is not None: hook.remove()
    sum(p.mean() for p in predictions).backward()
    return sum(storages.values())


def step_time(model, left, right) -> float:
    start = time.perf_counter()
    sum(p.mean() for p in model(left, right)).backward()
    return time.perf_counter() - start


def main(preset="tiny", batch=2, height=256, width=320, repeats=5, iters=None):
    torch.manual_seed(0)
    config = {"preset": preset}
    if iters is not None: config["train_iters"] = iters
    model = build_model(config).train()
    left, right = torch.rand(batch, 3, height, width) * 255, torch.rand(batch, 3, height, width) * 255
    print(f"preset {preset}, input {batch}×3×{height}×{width}, {model.config['train_iters']} GRU iterations, "
          f"{torch.get_num_threads()} threads")
    plain_bytes = saved_bytes(model.enable_gradient_checkpointing(False), left, right)
    checkpointed_bytes = saved_bytes(model.enable_gradient_checkpointing(True), left, right)
    times = {False: [], True: []}
    for _ in range(repeats):
        for enabled in (False, True):
            model.zero_grad(set_to_none=True)
            times[enabled].append(step_time(model.enable_gradient_checkpointing(enabled), left, right))
    plain_time, checkpointed_time = statistics.median(times[False]), statistics.median(times[True])
    print(f"saved for backward: plain {plain_bytes / 2**20:8.1f} MiB   checkpointed {checkpointed_bytes / 2**20:8.1f} MiB"
          f"   ratio {checkpointed_bytes / plain_bytes:.2f}  ({1 - checkpointed_bytes / plain_bytes:.0%} fewer bytes)")
    print(f"step time (median): plain {plain_time:8.3f} s     checkpointed {checkpointed_time:8.3f} s"
          f"     ratio {checkpointed_time / plain_time:.2f}  ({checkpointed_time / plain_time - 1:+.0%} time)")
    return checkpointed_bytes / plain_bytes, checkpointed_time / plain_time


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=None, help="GRU iterations (default: the preset's train_iters)")
    arguments = parser.parse_args()
    main(arguments.preset, arguments.batch, arguments.height, arguments.width, arguments.repeats, arguments.iters)
