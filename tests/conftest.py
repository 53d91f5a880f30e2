from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_samples() -> Path:
    return ROOT / "data_samples"


@pytest.fixture(scope="session")
def motorcycle():
    "The Middlebury 2014 Motorcycle pair shipped by scikit-image: left, right (uint8 RGB), disparity (inf = invalid)."
    from skimage.data import stereo_motorcycle
    return stereo_motorcycle()
