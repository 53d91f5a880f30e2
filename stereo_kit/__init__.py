"""Train FoundationStereo-style stereo depth models: data, augmentation, losses, model and trainer, from notebooks

Modules:

- `stereo_kit.check_data`: Find scenes in the standard layout, read every sample once, and summarise sample count, image sizes, disparity range and invalid fraction — reporting every problem instead of stopping at the first.
- `stereo_kit.synthetic`: Render textured slanted planes and objects at several depths into a rectified stereo pair, with the exact disparity of **both** views."""

__version__ = "0.0.1"
