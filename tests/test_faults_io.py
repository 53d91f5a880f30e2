"""Fault matrix for stereo_kit.io, model weights files and config files.

Every way a file can be bad gives a `StereoIOError` (or its subclass `WeightsError`, or a `ConfigError` for a config)
whose first line names the file and the problem; every refused, failed, concurrent or killed write leaves a whole file
behind: the old one or a new one; a write the system stops (file-size limit, full disk) or a folder we may not write
into names the target and the reason.
"""
import errno
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
import torch

import stereo_kit.io as stereo_io
from stereo_kit.io import (StereoIOError, _write_atomic, atomic_path, atomic_paths, read_disparity, read_image,
                           read_kitti_png, read_pfm, write_disparity, write_image, write_kitti_png, write_pfm)
from click.testing import CliRunner

import stereo_kit.models.weights as weights_module
from stereo_kit.cli import main as cli
from stereo_kit.config import ConfigError, load_config
from stereo_kit.io import DEPTH_UINT8_MAX_CODE
from stereo_kit.models.stereo import build_model
from stereo_kit.models.weights import (MAX_MODEL_PARAMETERS, WEIGHTS_FORMAT, WeightsError, load_weights, save_weights,
                                       weights_config_path)

ROOT = Path(__file__).resolve().parents[1]
PNG = ROOT / "data_samples/middlebury_motorcycle/left/disparity/0000.png"     # 8-bit RGB disparity, 448×320
JPEG = ROOT / "data_samples/middlebury_motorcycle/left/rgb/0000.jpg"          # baseline JPEG, 448×320


def assert_refused(call, path, phrase, error=StereoIOError, one_line=True):
    "`call()` raises `error` whose message starts with `path` and whose first line contains `phrase`."
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert phrase in message.splitlines()[0], message
    if one_line: assert "\n" not in message, message


# ---------------------------------------------------------------- bad files to read

def put(name, data: bytes):
    def build(folder):
        (folder / name).write_bytes(data)
        return folder / name
    return build


def truncated_png(size):
    return put("cut.png", PNG.read_bytes()[:size])


def pfm_with_size(size: bytes):
    return put("bad.pfm", b"Pf\n" + size + b"\n-1.0\n" + bytes(64))


def png_claiming(width, height):
    "The real PNG with its IHDR width and height replaced and the chunk's CRC recomputed, so the header is valid."
    data = PNG.read_bytes()
    chunk = bytearray(data[12:29])                        # "IHDR" + 13 bytes of header
    chunk[4:12] = struct.pack(">II", width, height)
    return put("bomb.png", data[:12] + bytes(chunk) + struct.pack(">I", zlib.crc32(bytes(chunk))) + data[33:])


def jpeg_claiming(width, height):
    data = bytearray(JPEG.read_bytes())
    frame = data.index(b"\xff\xc0")                       # SOF0: marker, length, precision, height, width
    data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return put("bomb.jpg", bytes(data))


def depth_png(name, rgb: np.ndarray):
    "An 8-bit RGB disparity PNG holding exactly `rgb` (H×W×3, RGB order), written with OpenCV as dataset tools do."
    def build(folder):
        cv2.imwrite(str(folder / name), np.ascontiguousarray(rgb[..., ::-1]))
        return folder / name
    return build


def real_depth_with(pixels: dict):
    "The real 8-bit RGB disparity PNG with `{(row, column): (R, G, B)}` painted in."
    stored = cv2.imread(str(PNG))[..., ::-1].copy()
    for (row, column), colour in pixels.items(): stored[row, column] = colour
    return depth_png("painted.png", stored)


def corrupt_jpeg_scan(folder):
    """The real JPEG with 2000 bytes in the middle of its compressed data replaced by garbage; the end marker is kept.

    The garbage holds no 0xFF byte, hence no marker: only the decoder's own bookkeeping can tell the data is wrong."""
    data = bytearray(JPEG.read_bytes())
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    data[middle:middle + 2000] = np.random.default_rng(0).integers(0, 255, 2000, dtype=np.uint8).tobytes()
    assert data.endswith(b"\xff\xd9")
    (folder / "scan.jpg").write_bytes(bytes(data))
    return folder / "scan.jpg"


def a_folder(name):
    def build(folder):
        (folder / name).mkdir()
        return folder / name
    return build


def missing(name):
    return lambda folder: folder / name


def with_limit(reader, max_pixels):
    return lambda path: reader(path, max_pixels=max_pixels)


READ_FAULTS = [
    *[pytest.param(truncated_png(size), reader, "truncated PNG", id=f"PNG cut to {size} bytes, {reader.__name__}")
      for size in (8, 16, 20, 25) for reader in (read_disparity, read_image)],
    *[pytest.param(pfm_with_size(size), reader, expected, id=f"PFM header {size.decode()!r}, {reader.__name__}")
      for size, expected in [(b"-1 4", "width and height must be positive integers, got -1 4"),
                             (b"0 0", "width and height must be positive integers, got 0 0"),
                             (b"-5 -5", "width and height must be positive integers, got -5 -5"),
                             (b"four 4", "malformed PFM header"), (b"4", "malformed PFM header")]
      for reader in (read_pfm, read_disparity)],
    pytest.param(pfm_with_size(b"20000 20000"), read_pfm, "image is 20000×20000 = 400.0 Mpx, above the limit of "
                 "100.0 Mpx (max_pixels)", id="PFM header 20000x20000"),
    *[pytest.param(png_claiming(16000, 16000), reader, "image is 16000×16000 = 256.0 Mpx, above the limit of 100.0 Mpx "
                   "(max_pixels)", id=f"PNG header 16000x16000, {reader.__name__}")
      for reader in (read_image, read_disparity)],
    pytest.param(png_claiming(100000, 100000), read_image, "above the limit of 100.0 Mpx", id="PNG header 100000^2"),
    pytest.param(png_claiming(100000, 100000), with_limit(read_image, 10**12), "unreadable image (OpenCV:",
                 id="PNG header 100000^2, limit raised: OpenCV's own refusal"),
    pytest.param(png_claiming(16000, 16000), with_limit(read_disparity, 10**9), "unreadable image",
                 id="PNG header 16000^2, limit raised: data too short"),
    pytest.param(png_claiming(640, 480), with_limit(read_kitti_png, 640 * 480 - 1), "above the limit of 0.3 Mpx",
                 id="read_kitti_png max_pixels"),
    pytest.param(jpeg_claiming(60000, 60000), read_image, "image is 60000×60000 = 3600.0 Mpx", id="JPEG header 60000^2"),
    pytest.param(corrupt_jpeg_scan, read_image, "corrupt JPEG data (Corrupt JPEG data:", id="JPEG scan overwritten"),
    *[pytest.param(a_folder(name), reader, "is a folder, not a file", id=f"folder {name}, {reader.__name__}")
      for name, reader in [("x.png", read_image), ("x.png", read_disparity), ("x.pfm", read_pfm),
                           ("x.png", read_kitti_png)]],
    *[pytest.param(put(name, b""), reader, "file is empty", id=f"empty {name}, {reader.__name__}")
      for name, reader in [("x.png", read_image), ("x.jpg", read_image), ("x.png", read_disparity),
                           ("x.pfm", read_disparity)]],
    *[pytest.param(missing(name), reader, "file not found", id=f"missing {name}, {reader.__name__}")
      for name, reader in [("x.png", read_image), ("x.png", read_disparity), ("x.pfm", read_pfm)]],
    pytest.param(put("x.png", b"GIF89a" + bytes(100)), read_disparity, "not a PNG file", id="GIF named .png"),
    # codes above the largest the encoding writes (16646.399 px) are refused, not read as up to 16646.654 px
    pytest.param(depth_png("white.png", np.full((3, 4, 3), 255, np.uint8)), read_disparity,
                 "12 pixel(s) hold colour codes above the largest the 8-bit RGB disparity encoding writes (16646399, "
                 "16646.399 px at scale 1000), e.g. (R, G, B) = (255, 255, 255) at row 0, column 0; refused",
                 id="depth_uint8 all white (16646.655 px)"),
    pytest.param(real_depth_with({(7, 9): (255, 254, 255)}), read_disparity,
                 "1 pixel(s) hold colour codes above the largest the 8-bit RGB disparity encoding writes (16646399, "
                 "16646.399 px at scale 1000), e.g. (R, G, B) = (255, 254, 255) at row 7, column 9", id="depth_uint8 one "
                 "pixel one code above the largest"),
    pytest.param(real_depth_with({(0, 0): (255, 255, 0), (319, 447): (255, 255, 255)}), read_disparity,
                 "2 pixel(s) hold colour codes above the largest", id="depth_uint8 two pixels, G = 255"),
]


@pytest.mark.parametrize("build, read, phrase", READ_FAULTS)
def test_bad_file_gives_one_line_error(tmp_path, build, read, phrase):
    path = build(tmp_path)
    assert_refused(lambda: read(path), path, phrase)


def test_corrupt_jpeg_is_accepted_by_opencv_alone(tmp_path):
    # The case above is only worth testing because OpenCV on its own returns a picture (and a warning on stderr).
    path = corrupt_jpeg_scan(tmp_path)
    assert cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED).shape == (320, 448, 3)
    assert read_image(JPEG).shape == (320, 448, 3)


@pytest.mark.parametrize("raised, phrase", [
    (PermissionError(13, "Permission denied"), "cannot read the file (Permission denied)"),
    (OSError(5, "Input/output error"), "cannot read the file (Input/output error)"),
    (MemoryError(), "file too large to read into memory"),
], ids=["permission denied", "I/O error", "out of memory"])
@pytest.mark.parametrize("read", [read_image, read_disparity, read_pfm], ids=lambda read: read.__name__)
def test_unreadable_file_gives_one_line_error(tmp_path, monkeypatch, raised, phrase, read):
    # As root no file is unreadable, so stereo_kit.io's `open` is made to fail the way it fails for other users.
    path = tmp_path / ("x.pfm" if read is read_pfm else "x.png")
    path.write_bytes(PNG.read_bytes())
    def failing_open(*args, **kwargs): raise raised
    monkeypatch.setattr(stereo_io, "open", failing_open, raising=False)
    assert_refused(lambda: read(path), path, phrase)


# ---------------------------------------------------------------- refused and failed writes

DISPARITY = np.array([[1.5, 20.25], [0.0, 100.0]])
RGB = np.zeros((4, 5, 3), np.uint8)


def read_only(path):
    path.chmod(0o444)


def fail_in_atomic_path(path):
    with atomic_path(path) as temporary:
        temporary.write_bytes(b"half of the new")
        raise OSError("disk full")


def file_size_limit(write, limit: int = 20_000):
    """`write(path)` in a forked child whose file-size limit is `limit` bytes (`RLIMIT_FSIZE`: what `ulimit -f` or a
    batch system sets; Python ignores SIGXFSZ, so the write fails with EFBIG), its exception raised again here."""
    def limited(path):
        reading, writing = os.pipe()
        child = os.fork()
        if child == 0:                                  # the child: no pytest code runs here, it only reports
            os.close(reading)
            try:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
                write(path)
                outcome = None
            except StereoIOError as error: outcome = (type(error).__name__, str(error.path), error.problem)
            except BaseException as error: outcome = ("other", type(error).__name__, str(error))
            with os.fdopen(writing, "wb") as pipe: pickle.dump(outcome, pipe)
            os._exit(0)
        os.close(writing)
        with os.fdopen(reading, "rb") as pipe: outcome = pickle.load(pipe)
        os.waitpid(child, 0)
        if outcome is None: return
        kind, *details = outcome
        if kind == "other": raise AssertionError(f"not a StereoIOError: {details}")
        raise {"StereoIOError": StereoIOError, "WeightsError": WeightsError}[kind](*details)
    return limited


class FillingDisk:
    "A file on a device that fills up after `room` bytes: the write that would pass it raises ENOSPC, as the system's."
    def __init__(self, path, mode="wb", room: int = 1000, **kwargs):
        self.file, self.room = open(path, mode, **kwargs), room
    def write(self, data):
        if len(data) > self.room:
            self.file.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)
    def __getattr__(self, name): return getattr(self.file, name)
    def __enter__(self): return self
    def __exit__(self, *exc): self.file.close()


def disk_full(write, module=None):
    "`write(path)` with the disk filling up: `open` in `module` (default: pathlib's `Path.open`) gives a `FillingDisk`."
    def full(path):
        if module is None:
            with mock.patch.object(Path, "open", lambda self, mode="r", *a, **k: FillingDisk(self, mode, **k)): write(path)
        else:
            with mock.patch.object(module, "open", FillingDisk, create=True): write(path)
    return full


def with_pair_copy(path):
    "An old weights pair: the target `path` (written by the test) and its config copy beside it."
    weights_config_path(path).write_bytes(b"old copy")
    return {weights_config_path(path): b"old copy"}


def fail_in_atomic_paths(path):
    "Write both temporaries of a pair, then fail before the block ends."
    with atomic_paths(path, path.parent / "y") as (first, second):
        first.write_bytes(b"new")
        second.write_bytes(b"half of the new")
        raise OSError("disk full")


WRITE_FAULTS = [
    # (target, prepare the old file, write, expected error, phrase)
    *[pytest.param(name, read_only, write, StereoIOError, "file is read-only; refusing to replace it", id=f"read-only, {what}")
      for name, what, write in [
          ("a.png", "write_image", lambda path: write_image(path, RGB)),
          ("a.png", "write_disparity", lambda path: write_disparity(path, DISPARITY, "depth_uint8")),
          ("a.pfm", "write_pfm", lambda path: write_pfm(path, DISPARITY)),
          ("a.bin", "_write_atomic", lambda path: _write_atomic(path, b"new")),
          ("a.pt", "save_weights", lambda path: save_weights(path, build_model({"preset": "tiny"})))]],
    *[pytest.param(name, None, write, StereoIOError, phrase, id=f"suffix {name}, {what}")
      for name, what, write, phrase in [
          ("d.jpg", "depth_uint8", lambda path: write_disparity(path, DISPARITY, "depth_uint8"),
           "format 'depth_uint8' needs a .png file (lossless); got '.jpg'"),
          ("d.pfm", "depth_uint8", lambda path: write_disparity(path, DISPARITY, "depth_uint8"),
           "format 'depth_uint8' needs a .png file (lossless); got '.pfm'"),
          ("d.jpg", "kitti_png", lambda path: write_disparity(path, DISPARITY, "kitti_png"),
           "format 'kitti_png' needs a .png file (lossless); got '.jpg'"),
          ("d.jpg", "write_kitti_png", lambda path: write_kitti_png(path, DISPARITY),
           "format 'kitti_png' needs a .png file (lossless); got '.jpg'"),
          ("d.png", "pfm", lambda path: write_disparity(path, DISPARITY, "pfm"),
           "format 'pfm' needs a .pfm file (lossless); got '.png'")]],
    pytest.param("d.png", None, lambda path: write_disparity(path, np.array([[1e16]]), "depth_uint8"), StereoIOError,
                 "disparity 1e+16 exceeds the largest encodable value 16646.4", id="1e16 px, depth_uint8"),
    pytest.param("d.png", None, lambda path: write_disparity(path, np.array([[3.0, 1e16]]), "kitti_png"), StereoIOError,
                 "KITTI PNG holds disparity in [0, 255.996], got [3, 1e+16]", id="1e16 px, kitti_png"),
    pytest.param("d.pfm", None, lambda path: write_disparity(path, np.array([[1e39]]), "pfm"), StereoIOError,
                 "do not fit the PFM's float32", id="1e39 px (float64), pfm"),
    pytest.param("w.json", None, lambda path: save_weights(path, build_model({"preset": "tiny"})), WeightsError,
                 "a weights file cannot end in .json", id="save_weights onto its own config name"),
    pytest.param("x", None, fail_in_atomic_path, OSError, "disk full", id="exception inside atomic_path"),
    pytest.param("x", None, fail_in_atomic_paths, OSError, "disk full", id="exception inside atomic_paths (pair)"),
    # shapes and types checked at the writer's door, before OpenCV or numpy fail without naming the file
    *[pytest.param(name, None, write, StereoIOError, phrase, id=what) for what, name, write, phrase in [
        ("0x0 disparity, depth_uint8", "d.png", lambda path: write_disparity(path, np.zeros((0, 0)), "depth_uint8"),
         "expected an H×W disparity with H, W > 0, got shape (0, 0)"),
        ("0x0 disparity, kitti_png", "d.png", lambda path: write_kitti_png(path, np.zeros((0, 0))),
         "expected an H×W disparity with H, W > 0, got shape (0, 0)"),
        ("0x5 disparity, pfm", "d.pfm", lambda path: write_disparity(path, np.zeros((0, 5)), "pfm"),
         "expected an H×W disparity with H, W > 0, got shape (0, 5)"),
        ("0x0 PFM", "d.pfm", lambda path: write_pfm(path, np.zeros((0, 0), np.float32)),
         "PFM holds H×W or H×W×3 floats with H, W > 0, got shape (0, 0)"),
        ("0x0 image", "a.png", lambda path: write_image(path, np.zeros((0, 0, 3), np.uint8)),
         "expected an H×W×3 uint8 RGB array with H, W > 0, got uint8 (0, 0, 3)"),
        ("valid mask 3x3 for a 2x2 disparity", "d.png",
         lambda path: write_disparity(path, DISPARITY, "depth_uint8", valid=np.ones((3, 3), bool)),
         "the valid mask has shape (3, 3), the disparity (2, 2)"),
        ("valid mask 1x2 (would broadcast) for a 2x2 disparity", "d.png",
         lambda path: write_disparity(path, DISPARITY, "depth_uint8", valid=np.ones((1, 2), bool)),
         "the valid mask has shape (1, 2), the disparity (2, 2)"),
        ("a string as the valid mask", "d.png", lambda path: write_disparity(path, DISPARITY, "depth_uint8", valid="all"),
         "expected a valid mask as an array of numbers, got a str of <U3"),
        ("a string as disparity", "d.png", lambda path: write_disparity(path, "12.5", "depth_uint8"),
         "expected disparity as an array of numbers, got a str of <U4"),
        ("a string as disparity, kitti_png", "d.png", lambda path: write_kitti_png(path, "12.5"),
         "expected disparity as an array of numbers, got a str of <U4"),
        ("a string as PFM", "d.pfm", lambda path: write_pfm(path, "12.5"), "expected a PFM image as an array of numbers"),
        ("ragged lists as disparity", "d.pfm", lambda path: write_disparity(path, [[1.0, 2.0], [3.0]], "pfm"),
         "expected disparity as an array of numbers, got a list (setting an array element with a sequence)"),
        ("a bool mask as disparity", "d.png", lambda path: write_disparity(path, DISPARITY > 1, "depth_uint8"),
         "expected disparity as an array of numbers, got a ndarray of bool"),
        ("a string as an image", "a.png", lambda path: write_image(path, "photo.png"),
         "expected an RGB image as an array of numbers, got a str of <U9")]],
    # a write the system stops: the target and the reason are named, the old files kept, no temporary left
    *[pytest.param(name, prepare, file_size_limit(write), error, "cannot write the file, EFBIG: the file would exceed the "
                   "file-size limit (ulimit -f) or the file system's largest file; the existing file is unchanged",
                   id=f"file-size limit, {what}") for what, name, prepare, write, error in [
        ("save_weights", "m.pt", with_pair_copy, lambda path: save_weights(path, build_model({"preset": "tiny"})),
         StereoIOError),
        ("_write_atomic", "a.bin", None, lambda path: _write_atomic(path, bytes(50_000)), StereoIOError),
        ("write_pfm", "a.pfm", None, lambda path: write_pfm(path, np.ones((100, 100))), StereoIOError),
        ("write_image", "a.png", None,
         lambda path: write_image(path, np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)),
         StereoIOError)]],
    *[pytest.param(name, prepare, disk_full(write, module), StereoIOError, "cannot write the file, ENOSPC: no space left "
                   "on the device; the existing file is unchanged", id=f"disk full, {what}")
      for what, name, prepare, write, module in [
        ("save_weights", "m.pt", with_pair_copy, lambda path: save_weights(path, build_model({"preset": "tiny"})),
         weights_module),
        ("_write_atomic", "a.bin", None, lambda path: _write_atomic(path, bytes(5000)), None),
        ("write_disparity", "d.png", None, lambda path: write_disparity(path, np.random.default_rng(0).uniform(1, 200, (50, 50)),
                                                                    "kitti_png"), None)]],
]


@pytest.mark.parametrize("name, prepare, write, error, phrase", WRITE_FAULTS)
def test_refused_or_failed_write_leaves_the_old_file(tmp_path, name, prepare, write, error, phrase):
    old = {tmp_path / other: f"old {other}".encode() for other in (name, "y")}
    for path, content in old.items(): path.write_bytes(content)
    if prepare: old.update(prepare(tmp_path / name) or {})          # it may add old files of its own
    with pytest.raises(error) as caught:
        write(tmp_path / name)
    if error is not OSError: assert str(caught.value).startswith(f"{tmp_path / name}: ")
    assert phrase in str(caught.value), str(caught.value)
    assert {path: path.read_bytes() for path in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in old)     # no temporary left


@contextmanager
def without_root():
    "Run the block as user nobody when the tests run as root (root writes into read-only folders), else as we are."
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try: yield
    finally: os.seteuid(0)


@pytest.fixture
def read_only_folder():
    "A folder we may read but not write, holding `a.*` files whose content is their old state (in /tmp: nobody can reach it)."
    folder = Path(tempfile.mkdtemp(prefix="stereo_kit_read_only_"))
    for name in ("a.png", "a.pfm", "a.bin", "a.pt", "a.json"): (folder / name).write_bytes(f"old {name}".encode())
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)
    for path in folder.iterdir(): path.unlink()
    folder.rmdir()


READ_ONLY_FOLDER_FAULTS = [
    pytest.param("a.png", lambda path: write_image(path, RGB), id="write_image"),
    pytest.param("a.png", lambda path: write_disparity(path, DISPARITY, "depth_uint8"), id="write_disparity"),
    pytest.param("a.pfm", lambda path: write_pfm(path, DISPARITY), id="write_pfm"),
    pytest.param("a.bin", lambda path: _write_atomic(path, b"new"), id="_write_atomic"),
    pytest.param("new.png", lambda path: write_image(path, RGB), id="write_image, a new file"),
    pytest.param("sub/new.png", lambda path: write_image(path, RGB), id="write_image, into a new subfolder"),
]


@pytest.mark.parametrize("name, write", READ_ONLY_FOLDER_FAULTS)
def test_read_only_folder_names_the_target_not_the_temporary(read_only_folder, name, write):
    before = {path: path.read_bytes() for path in read_only_folder.iterdir()}
    target = read_only_folder / name
    with without_root(), pytest.raises(StereoIOError) as caught: write(target)
    message = str(caught.value)
    expected = (f"{target}: cannot create its folder (Permission denied: {target.parent})" if "/" in name else
                f"{target}: cannot create a file in its folder {read_only_folder} (Permission denied); "
                + ("the existing file is unchanged" if target in before else "no file was written"))
    assert message == expected and ".tmp" not in message
    assert {path: path.read_bytes() for path in read_only_folder.iterdir()} == before


def test_read_only_folder_save_weights(read_only_folder, tiny):
    target = read_only_folder / "a.pt"
    with without_root(), pytest.raises(StereoIOError) as caught: save_weights(target, tiny)
    assert str(caught.value) == (f"{target}: cannot create a file in its folder {read_only_folder} (Permission denied); "
                                 "the existing file is unchanged")
    assert target.read_bytes() == b"old a.pt" and (read_only_folder / "a.json").read_bytes() == b"old a.json"


def test_an_index_cache_that_cannot_be_written_is_a_warning(read_only_folder, data_samples):
    "Writes whose failure must not stop a run (the index cache) still only warn, now with the named reason."
    from stereo_kit.data.datasets import index_dataset
    # a copy user nobody can read: the checkout may sit in a folder only root may enter (a `mktemp -d` clone)
    scene = Path(tempfile.mkdtemp(prefix="stereo_kit_scene_")) / "rendered_planes"
    shutil.copytree(data_samples / "rendered_planes", scene)
    for path in [scene.parent, *scene.parent.rglob("*")]: path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        with without_root(), pytest.warns(UserWarning) as caught:
            index = index_dataset(scene, "standard", cache_dir=read_only_folder)
    finally: shutil.rmtree(scene.parent)
    assert len(index.samples) == 3
    messages = [str(w.message) for w in caught if "index cache not written" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith(str(read_only_folder)) and (
        f"cannot create a file in its folder {read_only_folder} (Permission denied)" in messages[0]), messages


def test_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_last_one(tmp_path, tiny):
    "save_checkpoint's training state (the largest file) goes through atomic_path too: the disk filling up is named."
    from stereo_kit.train import checkpoint
    from stereo_kit.train.checkpoint import Workspace, latest_step, load_training_state, save_checkpoint
    workspace = Workspace(tmp_path / "run")
    state = {"optimizer": {"state": {0: {"momentum": torch.ones(20_000)}}}, "world_size": 1}
    save_checkpoint(workspace, 1, tiny, state)
    with mock.patch.object(checkpoint, "open", lambda path, mode: FillingDisk(path, mode, room=10_000), create=True), \
            pytest.raises(StereoIOError) as caught:
        save_checkpoint(workspace, 2, tiny, state)
    assert str(caught.value) == (f"{workspace.training_state(2)}: cannot write the file, ENOSPC: no space left on the "
                                 "device; no file was written")
    assert workspace.complete_steps() == [1] and latest_step(workspace) == 1            # step 1 is still the one to resume
    assert load_training_state(workspace, 1)["step"] == 1 and not list(workspace.checkpoints.glob(".*"))


def test_folder_in_the_way_is_refused(tmp_path):
    (tmp_path / "a.png").mkdir()
    assert_refused(lambda: write_image(tmp_path / "a.png", RGB), tmp_path / "a.png", "is a folder; refusing to replace it")
    assert (tmp_path / "a.png").is_dir() and list(tmp_path.iterdir()) == [tmp_path / "a.png"]


@pytest.mark.parametrize("format, suffix", [("depth_uint8", ".png"), ("kitti_png", ".png"), ("pfm", ".pfm")])
def test_non_finite_disparity_is_stored_as_invalid(tmp_path, format, suffix):
    disparity = np.array([[np.inf, np.nan, -np.inf, 0.0, -3.0, 5.5]])
    write_disparity(tmp_path / f"d{suffix}", disparity, format)
    read, valid = read_disparity(tmp_path / f"d{suffix}")
    np.testing.assert_array_equal(valid, [[False, False, False, False, False, True]])
    np.testing.assert_array_equal(read, [[0, 0, 0, 0, 0, 5.5]])


def test_replaced_file_keeps_its_permissions_and_a_new_one_follows_the_umask(tmp_path):
    _write_atomic(tmp_path / "kept", b"old")
    (tmp_path / "kept").chmod(0o640)
    _write_atomic(tmp_path / "kept", b"new")
    assert (tmp_path / "kept").stat().st_mode & 0o777 == 0o640
    umask = os.umask(0o022); os.umask(umask)
    _write_atomic(tmp_path / "new", b"new")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------- concurrent writers and readers

def test_concurrent_writers_and_reader_see_only_whole_files(tmp_path):
    target, first = tmp_path / "shared.bin", b"first" * 40_000
    content = lambda writer, round: bytes([writer, round]) * 100_000         # 200 kB, distinct for every write
    everything = {content(w, r) for w in range(8) for r in range(20)}
    _write_atomic(target, first)
    seen, errors, done = [], [], threading.Event()

    def read():
        while not done.is_set(): seen.append(target.read_bytes())

    def write(writer):
        try:
            for round in range(20): _write_atomic(target, content(writer, round))
        except Exception as error: errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for thread in writers: thread.start()
    for thread in writers: thread.join()
    done.set()
    reader.join()
    assert errors == []
    assert target.read_bytes() in everything
    assert len(seen) > 10 and all(data in everything or data == first for data in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]                  # no temporary left behind


def test_atomic_path_gives_every_writer_its_own_temporary(tmp_path):
    with atomic_path(tmp_path / "a") as first, atomic_path(tmp_path / "a") as second:
        assert first != second and first.parent == second.parent == tmp_path
        assert first.name.startswith(".a.") and first.name.endswith(".tmp")
        first.write_bytes(b"one"); second.write_bytes(b"two")
    assert (tmp_path / "a").read_bytes() == b"one"                                 # the outer block finished last


# ---------------------------------------------------------------- weights files

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model({"preset": "tiny"})


def saved(folder, model):
    save_weights(folder / "m.pt", model)
    return folder / "m.pt"


def v1_pair(config_text):
    "A weights file in the previous format: a plain state dict, and `config_text` in the JSON beside it."
    def build(folder, model):
        torch.save(model.state_dict(), folder / "m.pt")
        (folder / "m.json").write_text(config_text(model) if callable(config_text) else config_text)
        return folder / "m.pt"
    return build


def edited(change):
    "A v2 file whose state dict `change(state_dict)` edited (its config still inside)."
    def build(folder, model):
        state_dict = torch.load(saved(folder, model), weights_only=True)
        change(state_dict)
        torch.save(state_dict, folder / "m.pt")
        return folder / "m.pt"
    return build


def raw(data):
    def build(folder, model):
        (folder / "m.pt").write_bytes(data(saved(folder, model).read_bytes()) if callable(data) else data)
        return folder / "m.pt"
    return build


class Opaque:
    pass


def pickled(folder, model):
    torch.save({"weights": Opaque()}, folder / "m.pt")
    return folder / "m.pt"


def first_key(state_dict): return next(iter(state_dict))


# wide features and a wide GRU: 3.9 billion parameters, 15 GB as float32 (torch would try to allocate it)
ENORMOUS = dict(feature_channels=[480, 960, 1600], hidden_dims=[4096, 4096], motion_channels=4096, concat_channels=512)


WEIGHTS_FAULTS = [
    # (build the bad file(s), file blamed, phrase in the first line)
    pytest.param(raw(b""), "m.pt", "file is empty", id="empty .pt"),
    pytest.param(raw(lambda good: good[: len(good) // 2]), "m.pt", "not a readable torch file: truncated or corrupt",
                 id="truncated .pt (half)"),
    pytest.param(raw(lambda good: good[:100]), "m.pt", "not a readable torch file: truncated or corrupt",
                 id="truncated .pt (100 bytes)"),
    pytest.param(raw(b"hello, not a torch file"), "m.pt", "m.pt: not a", id="text file"),
    pytest.param(pickled, "m.pt", "not a plain tensor file; torch.load(weights_only=True) refused it "
                 "(UnpicklingError: Unsupported global", id="pickled arbitrary object"),
    pytest.param(lambda folder, model: (folder / "m.pt").mkdir() or folder / "m.pt", "m.pt", "is a folder, not a file",
                 id="folder"),
    pytest.param(lambda folder, model: folder / "m.pt", "m.pt", "file not found", id="missing"),
    pytest.param(lambda folder, model: saved(folder, model).with_suffix(".json"), "m.json",
                 "this is a model config; pass the weights file beside it", id="the .json passed"),
    pytest.param(v1_pair("[1, 2]"), "m.json", "expected a config object with a 'model' block, found a list",
                 id="v1 config is a list"),
    pytest.param(v1_pair('{"format": "stereo_kit.models.v1"}'), "m.json", "the config has no 'model' block",
                 id="v1 config lacks model"),
    pytest.param(v1_pair('{"format": "stereo_kit.models.v1", "model": '), "m.json", "not valid JSON",
                 id="v1 config not JSON"),
    pytest.param(v1_pair('{"format": "something else", "model": {}}'), "m.json",
                 "expected a stereo_kit model config (stereo_kit.models.v1), found format 'something else'",
                 id="v1 config of another format"),
    pytest.param(v1_pair(lambda model: json.dumps({"format": "stereo_kit.models.v1",
                                                    "model": {**model.config, "bogus": 1}})),
                 "m.json", "its model config is invalid", id="v1 config with an unknown key"),
    pytest.param(lambda folder, model: torch.save(model.state_dict(), folder / "m.pt") or folder / "m.pt", "m.pt",
                 "no model config inside it or beside it (expected m.json)", id="plain state dict alone"),
    pytest.param(v1_pair(lambda model: json.dumps({"format": WEIGHTS_FORMAT, "save_id": "0" * 32, "model": model.config})),
                 "m.json", "is the config copy of save 00000000000000000000000000000000, but m.pt carries no config",
                 id="plain state dict beside a v2 copy (mismatched pair)"),
    pytest.param(edited(lambda sd: sd.pop(first_key(sd))), "m.pt", "state dict does not match the model config "
                 "(1 problem(s))", id="missing key"),
    pytest.param(edited(lambda sd: sd.update(extra=torch.zeros(1))), "m.pt", "state dict does not match the model config",
                 id="unexpected key"),
    pytest.param(edited(lambda sd: sd.update({first_key(sd): torch.zeros(3, 3)})), "m.pt",
                 "state dict does not match the model config", id="shape mismatch"),
    pytest.param(edited(lambda sd: sd.update(step=7)), "m.pt", "'step' holds a value of type int", id="non-tensor entry"),
    pytest.param(edited(lambda sd: sd._metadata["stereo_kit"].update(format="v9")), "m.pt",
                 "expected a stereo_kit model config (stereo_kit.models.v2), found format 'v9'", id="v2 of another format"),
    pytest.param(edited(lambda sd: sd._metadata["stereo_kit"].update(model=[1])), "m.pt",
                 "the config has no 'model' block", id="v2 model block is a list"),
    pytest.param(edited(lambda sd: sd._metadata["stereo_kit"]["model"].update(max_disp=-1)), "m.pt",
                 "its model config is invalid", id="v2 config invalid"),
    # a config asking for an enormous model: counted on the meta device (nothing allocated) and refused with the count
    pytest.param(edited(lambda sd: sd._metadata["stereo_kit"]["model"].update(**ENORMOUS)), "m.pt",
                 "its model config asks for 3,856,009,081 parameters (15.4 GB as float32), above the limit of "
                 "2,000,000,000 (max_parameters); the weights file holds 343,237", id="v2 config of an enormous model"),
    pytest.param(v1_pair(lambda model: json.dumps({"format": "stereo_kit.models.v1", "model": {**model.config, **ENORMOUS}})),
                 "m.json", "its model config asks for 3,856,009,081 parameters", id="v1 config of an enormous model"),
    pytest.param(edited(lambda sd: sd._metadata["stereo_kit"]["model"].update(hidden_dims=[48, 48])), "m.pt",
                 "state dict does not match the model config (", id="v2 config of another shape (found on meta)"),
]


@pytest.mark.parametrize("build, blamed, phrase", WEIGHTS_FAULTS)
def test_bad_weights_file_gives_an_error_naming_the_file(tmp_path, tiny, build, blamed, phrase):
    path = build(tmp_path, tiny)
    assert_refused(lambda: load_weights(path), tmp_path / blamed, phrase, error=WeightsError, one_line=False)


def test_enormous_config_is_refused_in_milliseconds(tmp_path, tiny):
    path = edited(lambda sd: sd._metadata["stereo_kit"]["model"].update(**ENORMOUS))(tmp_path, tiny)
    started = time.perf_counter()
    with pytest.raises(WeightsError): load_weights(path)
    assert time.perf_counter() - started < 2.0                # building it took 16-20 s and 2.6 GB before failing
    assert MAX_MODEL_PARAMETERS == 2_000_000_000
    small = saved(tmp_path, tiny)                            # the tiny model (343,237 parameters) in its place
    assert load_weights(small, max_parameters=None).config == tiny.config
    with pytest.raises(WeightsError, match="above the limit of 343,236 "): load_weights(small, max_parameters=343_236)


# ---------------------------------------------------------------- a config copy that disagrees with the .pt

def rewrite_copy(change):
    "A v2 pair whose .json copy was then changed by `change(copy dict)` (None: replaced by the bytes it returns)."
    def build(folder, model):
        path = saved(folder, model)
        copy = json.loads(weights_config_path(path).read_text())
        changed = change(copy)
        weights_config_path(path).write_bytes(changed if isinstance(changed, bytes) else json.dumps(copy).encode())
        return path
    return build


COPY_FAULTS = [
    # (the change to the copy, what the warning lists as different)
    pytest.param(rewrite_copy(lambda copy: copy["model"].update(max_disp=128)), "(model.max_disp)", id="a key edited"),
    pytest.param(rewrite_copy(lambda copy: copy["model"].update(hidden_dims=[64, 64], train_iters=9)),
                 "(model.hidden_dims, model.train_iters)", id="two keys edited"),
    pytest.param(rewrite_copy(lambda copy: copy["model"].pop("corr_radius")), "(model.corr_radius)", id="a key removed"),
    pytest.param(rewrite_copy(lambda copy: copy.update(save_id="0" * 32)), "(save_id)", id="the copy of another save"),
    pytest.param(rewrite_copy(lambda copy: b"{not json"), "(unreadable (JSONDecodeError))", id="the copy is not JSON"),
    pytest.param(rewrite_copy(lambda copy: b"\xff\xfe"), "(unreadable (UnicodeDecodeError))", id="the copy is not UTF-8"),
    pytest.param(rewrite_copy(lambda copy: b"[1, 2]"), "(model.", id="the copy is a list"),
]


@pytest.mark.parametrize("build, differences", COPY_FAULTS)
def test_a_config_copy_that_disagrees_with_the_weights_is_named_in_a_warning(tmp_path, tiny, build, differences):
    path = build(tmp_path, tiny)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_weights(path)
    assert model.config == tiny.config                        # the .pt's config is the one used
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith(
        f"{weights_config_path(path)}: differs from the config stored in {path} {differences}"), messages
    assert f"the config in {path.name} is used, the .json is only a readable copy of it" in messages[0]


def test_an_agreeing_copy_or_none_gives_no_warning(tmp_path, tiny):
    path = saved(tmp_path, tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_weights(path)
        weights_config_path(path).unlink()
        load_weights(path)


# ---------------------------------------------------------------- config files

LATIN1 = '{"data": {"datasets": [{"name": "café", "format": "synthetic"}], "image_sizes": [[64, 48]], "max_disparity": 64}}'
CONFIG_FILE_FAULTS = [
    # (the file's bytes, the problem reported)
    pytest.param(LATIN1.encode("latin-1"), "not UTF-8 text: byte 0xe9 at line 1, offset 36 cannot be decoded (invalid "
                 "continuation byte); save the file as UTF-8", id="Latin-1"),
    pytest.param(LATIN1.encode("utf-16"), "not UTF-8 text: byte 0xff at line 1, offset 0 cannot be decoded (invalid start "
                 "byte)", id="UTF-16 with its byte order mark"),
    pytest.param(b'{"data":\n  {"max_disparity": 64,\n   "x": "\x80"}}', "not UTF-8 text: byte 0x80 at line 3, offset 42 "
                 "cannot be decoded (invalid start byte)", id="a stray 0x80 on line 3"),
    pytest.param(b"\xef\xbb\xbf" + LATIN1.replace("é", "e").encode(), "not valid JSON: Unexpected UTF-8 BOM",
                 id="UTF-8 with a byte order mark"),
    pytest.param(b"", "not valid JSON: Expecting value at line 1, column 1", id="empty file"),
]
COMMANDS = [
    pytest.param(None, id="load_config"),
    pytest.param(["config", "show"], id="stereo-kit config show"),
    pytest.param(["check-data", "--no-progress", "--config"], id="stereo-kit check-data --config"),
    pytest.param(["train", "--enable_mlflow", "false", "--config"], id="stereo-kit train --config"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("data, problem", CONFIG_FILE_FAULTS)
def test_unreadable_config_file_is_named_with_its_problem(tmp_path, data, problem, command):
    path = tmp_path / "config.json"
    path.write_bytes(data)
    if command is None:
        with pytest.raises(ConfigError) as caught: load_config(path)
        assert caught.value.source == str(path) and len(caught.value.problems) == 1
        assert caught.value.problems[0].startswith(problem), caught.value.problems
        return
    result = CliRunner().invoke(cli, [*command, str(path)], catch_exceptions=True)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.splitlines()[:1] == [f"{path}: 1 problem(s):"] and problem in result.output, result.output
    assert not (tmp_path / "workspace").exists()


def test_mismatch_lists_every_key_on_later_lines(tmp_path, tiny):
    path = edited(lambda sd: (sd.pop(first_key(sd)), sd.update(extra=torch.zeros(1))))(tmp_path, tiny)
    with pytest.raises(WeightsError) as caught: load_weights(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}: state dict does not match the model config (2 problem(s)):"
    assert lines[1:] == [f"  missing: {first_key(tiny.state_dict())}", "  unexpected: extra"]


def test_weights_pair_shares_a_save_id_and_old_format_still_loads(tmp_path, tiny):
    first = saved(tmp_path, tiny)
    copy = json.loads(weights_config_path(first).read_text())
    assert torch.load(first, weights_only=True)._metadata["stereo_kit"]["save_id"] == copy["save_id"]
    save_weights(first, tiny)
    assert json.loads(weights_config_path(first).read_text())["save_id"] != copy["save_id"]
    v1 = v1_pair(lambda model: json.dumps({"format": "stereo_kit.models.v1", "model": model.config}))(tmp_path, tiny)
    assert load_weights(v1).config == tiny.config


KILL_SCRIPT = r"""
import os, sys, torch
torch.set_num_threads(1)
from stereo_kit.models.stereo import build_model
from stereo_kit.models.weights import save_weights
target = sys.argv[1]
model = build_model({"preset": "tiny"})
save_weights(target, model)
print("ready", flush=True)
while sys.stdin.readline():
    writer = os.fork()
    if writer == 0:                             # the writer: saves changed weights until it is killed
        parameter = next(model.parameters())
        while True:
            with torch.no_grad(): parameter.add_(1.0)
            save_weights(target, model)
    print(writer, flush=True)
    os.waitpid(writer, 0)
    print("reaped", flush=True)
"""


def test_kill_during_save_weights_leaves_the_last_good_file(tmp_path):
    # One process imports torch once and forks a writer per round; each writer is SIGKILLed at a random moment.
    target, rng, save_ids = tmp_path / "tiny.pt", random.Random(0), set()
    zygote = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(target)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert zygote.stdout.readline().strip() == "ready"
        for _ in range(20):
            zygote.stdin.write("go\n"); zygote.stdin.flush()
            writer = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(writer, signal.SIGKILL)
            assert zygote.stdout.readline().strip() == "reaped"
            model = load_weights(target)                                  # whole, never a partial file
            save_ids.add(torch.load(target, weights_only=True)._metadata["stereo_kit"]["save_id"])
            assert json.loads(weights_config_path(target).read_text())["model"] == model.config
    finally:
        zygote.kill()
        zygote.wait()
    assert len(save_ids) > 10                                             # the writers did replace the file
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("tiny.pt", "tiny.json")]
    assert all(name.startswith((".tiny.pt.", ".tiny.json.")) and name.endswith(".tmp") for name in leftovers)
