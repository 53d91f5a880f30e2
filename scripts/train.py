"""The spec's training script. Every option, default and behaviour is `stereo-kit train`'s (see `nbs/09_cli.ipynb`):

    python scripts/train.py --config configs/train/quickstart.json --workspace workspace/quickstart
    accelerate launch scripts/train.py --config configs/train/stereo_v1.json --enable_mixed_precision true
"""
from stereo_kit.cli import train

if __name__ == "__main__":
    train()
