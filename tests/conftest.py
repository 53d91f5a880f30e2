from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_samples() -> Path:
    return ROOT / "data_samples"


@pytest.fixture(scope="session")
def motorcycle():
    "The Middlebury 2014 Motorcycle pair shipped by scikit-image: left, right (uint8 RGB), disparity (inf = invalid)."
    from skimage.data import stereo_motorcycle
    return stereo_motorcycle()


@pytest.fixture
def one_torch_thread():
    "Training tests on this 2-core machine run several processes at once: one torch thread each keeps them fast."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
