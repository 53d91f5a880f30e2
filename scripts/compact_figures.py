"""IPython startup file used by scripts/run_notebooks.sh: matplotlib figures in committed notebooks become 256-colour PNGs.

A notebook's figures are committed with it; as palette PNGs (no dithering) they take a third of the bytes or less, at
no visible cost for plots and colour-mapped disparity. Only the committed outputs change: the notebooks themselves
carry no code for it, and `nbdev-test` (whose outputs are thrown away) does not load it.
"""
import io

from IPython import get_ipython


def _palette_png(figure) -> bytes:
    from PIL import Image
    rgba, palette = io.BytesIO(), io.BytesIO()
    figure.savefig(rgba, format="png", bbox_inches="tight")
    Image.open(rgba).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(palette, format="png", optimize=True)
    return palette.getvalue()


def _register():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    plt.close(plt.figure())      # loads the inline backend, which registers its own PNG formatter: ours replaces it
    get_ipython().display_formatter.formatters["image/png"].for_type(Figure, _palette_png)


if get_ipython() is not None: _register()
