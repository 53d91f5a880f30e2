"""Train FoundationStereo-style stereo depth models: data, augmentation, losses, model and trainer, from notebooks

Modules:

- `stereo_kit.data.datasets`: Readers for the standard (FoundationStereo) layout, SceneFlow, KITTI 2012/2015, Middlebury 2014 / MiddEval3 and ETH3D two-view: each turns a dataset folder into a list of sample file paths, reports files without a counterpart or with an ambiguous one, and caches the index of big trees. Procedural formats (`synthetic`) have no folder: a generator renders each sample instead."""

__version__ = "0.0.1"
