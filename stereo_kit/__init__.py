"""Train FoundationStereo-style stereo depth models: data, augmentation, losses, model and trainer, from notebooks"""

__version__ = "0.0.1"
