"""Train FoundationStereo-style stereo depth models: data, augmentation, losses, model and trainer, from notebooks

Modules:

- `stereo_kit.data.datasets`: Readers for the standard (FoundationStereo) layout, SceneFlow, KITTI 2012/2015, Middlebury 2014 / MiddEval3, ETH3D two-view and the public training mixture (CREStereo, Sintel, Falling Things, InStereo2K, Virtual KITTI 2, TartanAir, Spring, DrivingStereo, Middlebury 2005/2006): each turns a dataset folder into a list of sample file paths, names the disparity encoding, reports files without a counterpart or with an ambiguous one, says what an entry matched, and caches the index of big trees. Procedural formats (`synthetic`) have no folder: a generator renders each sample instead.
- `stereo_kit.data.miniature`: Miniature trees of every public dataset the readers know — the training mixture (CREStereo, Sintel, Falling Things, InStereo2K, Virtual KITTI 2, TartanAir, Spring, DrivingStereo, Middlebury 2005/2006) and the benchmarks (MiddEval3, ETH3D, KITTI 2012/2015, FlyingThings3D TEST) — laid out exactly as their official downloads unpack, each written in the dataset's own encoding, with the values a reader must return."""

__version__ = "0.0.1"
