"""stereo_kit.io on real data, checked against values computed without stereo_kit's encoders."""
import struct

import cv2
import numpy as np
import pytest

from stereo_kit.io import StereoIOError, read_disparity, read_image, read_pfm, write_disparity


@pytest.fixture(scope="module")
def middlebury_disparity(motorcycle):
    _, _, disparity = motorcycle
    return np.where(np.isfinite(disparity), disparity, 0).astype(np.float32)


def test_foundationstereo_png_written_by_opencv(tmp_path, middlebury_disparity):
    # What a dataset script does: encode with integer arithmetic in RGB order, flip to BGR, cv2.imwrite.
    code = np.rint(middlebury_disparity.astype(np.float64) * 1000).astype(np.int64)
    rgb = np.stack([code // (255 * 255), (code // 255) % 255, code % 255], axis=-1).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "disparity.png"), rgb[..., ::-1])
    disparity, valid = read_disparity(tmp_path / "disparity.png")
    np.testing.assert_array_equal(valid, middlebury_disparity > 0)
    assert np.abs(disparity - middlebury_disparity).max() <= 0.0005 + 1e-5


def test_channel_order_matters(tmp_path, middlebury_disparity):
    # Saving the RGB array without the BGR flip gives a very different disparity: the reader must not paper over it.
    code = np.rint(middlebury_disparity.astype(np.float64) * 1000).astype(np.int64)
    rgb = np.stack([code // (255 * 255), (code // 255) % 255, code % 255], axis=-1).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "swapped.png"), rgb)
    disparity, _ = read_disparity(tmp_path / "swapped.png")
    assert np.abs(disparity - middlebury_disparity).max() > 1000


@pytest.mark.parametrize("format, tolerance", [("depth_uint8", 0.0005), ("pfm", 0.0), ("kitti_png", 0.5 / 256)])
def test_every_format_round_trips_middlebury(tmp_path, middlebury_disparity, format, tolerance):
    path = tmp_path / f"disparity.{'pfm' if format == 'pfm' else 'png'}"
    write_disparity(path, middlebury_disparity, format)
    disparity, valid = read_disparity(path)
    np.testing.assert_array_equal(valid, middlebury_disparity > 0)
    assert np.abs(disparity - middlebury_disparity).max() <= tolerance + 1e-5


def test_pfm_little_endian_three_channel_by_hand(tmp_path):
    values = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)     # rows top-down, as the image reads
    body = b"".join(struct.pack("<9f", *values[row].ravel()) for row in (1, 0))
    (tmp_path / "flow.pfm").write_bytes(b"PF\n3 2\n-1.0\n" + body)
    np.testing.assert_array_equal(read_pfm(tmp_path / "flow.pfm"), values)
    disparity, valid = read_disparity(tmp_path / "flow.pfm")              # disparity = first channel
    np.testing.assert_array_equal(disparity, np.where(values[..., 0] >= 0, values[..., 0], 0))


def test_kitti_png_written_by_opencv(tmp_path):
    raw = np.array([[0, 256, 513], [65535, 1, 12800]], np.uint16)
    cv2.imwrite(str(tmp_path / "000000_10.png"), raw)
    disparity, valid = read_disparity(tmp_path / "000000_10.png")
    np.testing.assert_array_equal(valid, raw > 0)
    np.testing.assert_allclose(disparity, raw / 256.0)


def test_images_match_skimage(tmp_path, motorcycle):
    left = motorcycle[0]
    cv2.imwrite(str(tmp_path / "left.png"), left[..., ::-1])
    np.testing.assert_array_equal(read_image(tmp_path / "left.png"), left)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "truncated JPEG"),
    (lambda data: data[:2] + b"\x00" * 200 + data[-2:], "unreadable image"),
    (lambda data: b"", "file is empty"),
])
def test_broken_jpeg_from_data_samples(tmp_path, data_samples, damage, message):
    good = (data_samples / "middlebury_motorcycle/left/rgb/0000.jpg").read_bytes()
    path = tmp_path / "0000.jpg"
    path.write_bytes(damage(good))
    with pytest.raises(StereoIOError) as error:
        read_image(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value) and "\n" not in str(error.value)


def test_truncated_pfm(tmp_path):
    (tmp_path / "disp0GT.pfm").write_bytes(b"Pf\n4 4\n-1.0\n" + b"\x00" * 20)
    with pytest.raises(StereoIOError, match=r"disp0GT.pfm: truncated PFM: 4×4×1 floats need 64 bytes, found 20"):
        read_disparity(tmp_path / "disp0GT.pfm")


def test_wrong_dtype_and_channels(tmp_path):
    cv2.imwrite(str(tmp_path / "rgb16.png"), np.ones((3, 3, 3), np.uint16))
    with pytest.raises(StereoIOError, match="unrecognised disparity PNG: 16-bit with 3 channel"):
        read_disparity(tmp_path / "rgb16.png")
    cv2.imwrite(str(tmp_path / "grey8.png"), np.ones((3, 3), np.uint8))
    with pytest.raises(StereoIOError, match="KITTI disparity must be 16-bit, found uint8"):
        read_disparity(tmp_path / "grey8.png", format="kitti_png")
    with pytest.raises(StereoIOError, match="8-bit RGB disparity must have 3 channels, found 1"):
        read_disparity(tmp_path / "grey8.png", format="depth_uint8")
