"""Overfit the tiny preset on one real crop of the Middlebury motorcycle pair (scikit-image), on CPU.

Prints the end-point error (EPE, mean |prediction - ground truth| over valid pixels, in pixels) of the eval-mode
prediction every `--every` steps. The model is correct enough to learn if the EPE falls below 1 px.

    python benchmarks/model_overfit.py [--steps 300] [--every 25]
"""
from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from stereo_kit.losses import sequence_loss
from stereo_kit.models import build_model


def motorcycle_crop(scale: float = 0.5, top: int = 40, left: int = 60, height: int = 160, width: int = 256):
    "One crop of the skimage Middlebury pair at `scale`: left, right (1, 3, H, W) 0-255, disparity (1, 1, H, W), valid."
    from skimage.data import stereo_motorcycle
    left_image, right_image, disparity = stereo_motorcycle()
    size = (round(left_image.shape[1] * scale), round(left_image.shape[0] * scale))
    resize = lambda image: cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    disparity = cv2.resize(disparity.astype(np.float32), size, interpolation=cv2.INTER_NEAREST) * scale
    crop = (slice(top, top + height), slice(left, left + width))
    to_tensor = lambda image: torch.from_numpy(np.ascontiguousarray(image[crop])).permute(2, 0, 1)[None].float()
    disparity = disparity[crop]
    valid = np.isfinite(disparity)
    return (to_tensor(resize(left_image)), to_tensor(resize(right_image)),
            torch.from_numpy(np.where(valid, disparity, 0))[None, None], torch.from_numpy(valid)[None, None])


def end_point_error(model, left, right, disparity, valid) -> float:
    model.eval()
    with torch.no_grad(): prediction = model(left, right)
    model.train()
    return float((prediction - disparity).abs()[valid].mean())


def overfit(steps: int = 300, every: int = 25, lr: float = 1e-3, seed: int = 0, verbose: bool = True) -> list[tuple[int, float]]:
    "Train the tiny preset on one crop; return [(step, EPE)] measured every `every` steps (and at the end)."
    torch.manual_seed(seed)
    left, right, disparity, valid = motorcycle_crop()
    model = build_model({"preset": "tiny"}).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    curve, start = [(0, end_point_error(model, left, right, disparity, valid))], time.time()
    if verbose: print(f"crop {tuple(left.shape[-2:])}, disparity {float(disparity[valid].min()):.1f}-"
                      f"{float(disparity[valid].max()):.1f} px, valid {float(valid.float().mean()):.1%}")
    if verbose: print(f"step {0:4d}  EPE {curve[-1][1]:7.3f} px")
    for step in range(1, steps + 1):
        loss = sequence_loss(model(left, right), disparity, valid)      # the library's: RAFT-Stereo weights
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == steps:
            curve.append((step, end_point_error(model, left, right, disparity, valid)))
            if verbose: print(f"step {step:4d}  EPE {curve[-1][1]:7.3f} px  loss {loss.item():7.3f}  ({time.time() - start:.0f} s)")
    return curve


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-3)
    arguments = parser.parse_args()
    curve = overfit(arguments.steps, arguments.every, arguments.lr)
    print(f"final EPE {curve[-1][1]:.3f} px after {curve[-1][0]} steps: {'below' if curve[-1][1] < 1 else 'NOT below'} 1 px")
