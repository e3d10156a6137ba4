"""The demo models' data: scikit-learn's digits, turned into camera-like frames.

Runtime code (numpy only): the demo clients, the tests and ``tools/build_models.py`` all
make frames with :func:`frames_from_digits`, so the shipped models see at run time exactly
what they were trained on.

* ``frames_from_digits(images8x8)``: 8x8 digits (values 0..16) -> uint8 frames
  ``[N, 64, 64, 3]`` (NHWC), the demo models' ``frames`` input.
* ``load_test_set()``: the held-out test split shipped as ``demo/digits_test.npz``
  (stratified 80/20 split of the 1797 images, seed 0; the training split is not shipped).
* ``camera_frames(images8x8, seed)``: the same digits as a camera would see them at 160x160:
  random scale and position, background gradient, tint, blur, occlusion and sensor noise, drawn from
  a fixed seed, so a test set ships as the 8x8 digits plus a seed (the camera-sized model's test
  set, and the hard one early exits are judged on).
* ``card_test_set(dataset, base_dir)``: a model card's whole test set as model inputs, made the
  way its ``dataset`` entry says (the split tool and the tests check every split point on it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "FRAME_SIZE",
    "TINT",
    "LABELS",
    "TEST_SET_PATH",
    "frames_from_digits",
    "load_test_set",
    "card_test_set",
    "camera_frames",
    "CAMERA_SIZE",
]

#: Side of a frame in pixels.
FRAME_SIZE = 64
#: Source image side (sklearn digits are 8x8).
SOURCE_SIZE = 8
#: Maximum source value (sklearn digits are 0..16).
SOURCE_MAX = 16.0
#: Fixed per-channel tint (R, G, B) applied to the grey frame: a warm, camera-like cast.
TINT = (1.0, 0.86, 0.72)
#: Class labels, index = class id.
LABELS = tuple(str(i) for i in range(10))
#: The shipped test split.
TEST_SET_PATH = Path(__file__).resolve().parent / "demo" / "digits_test.npz"


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of 1-D bilinear interpolation (half-pixel centres, edges clamped)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _blur_matrix(n: int) -> np.ndarray:
    """[n, n] matrix of a 1-D binomial [1, 4, 6, 4, 1]/16 blur, edges replicated."""
    kernel = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    m = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for k, w in enumerate(kernel):
            j = min(max(i + k - 2, 0), n - 1)
            m[i, j] += w
    return m


# Separable resampling operator: bilinear 8 -> 64, then a fixed 5-tap binomial blur,
# scaled so that a source value of 16 maps to 255. A frame channel is
# tint[c] * (R @ img @ R.T). Built once at import (a 64x8 matrix).
_RESAMPLE = (_blur_matrix(FRAME_SIZE) @ _bilinear_matrix(SOURCE_SIZE, FRAME_SIZE)).astype(np.float32)
_CHANNEL_GAIN = (np.asarray(TINT, dtype=np.float32) * np.float32(255.0 / SOURCE_MAX))


def frames_from_digits(images8x8: np.ndarray) -> np.ndarray:
    """Turn 8x8 digits (0..16, float or integer) into uint8 RGB frames.

    ``images8x8`` has shape ``[N, 8, 8]`` (or ``[8, 8]`` for one image; any leading
    dimensions are kept). Returns uint8 ``[N, 64, 64, 3]`` (NHWC): bilinear upsampling to
    64x64, a fixed binomial blur, values scaled 0..16 -> 0..255, grey replicated to three
    channels with the fixed tint :data:`TINT`. Deterministic; numpy only.
    """
    x = np.asarray(images8x8)
    if x.ndim < 2 or x.shape[-2:] != (SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(
            f"images8x8: expected shape [N, 8, 8] or [8, 8], got {list(x.shape)}"
        )
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
            or x.dtype == np.bool_):
        raise ValueError(f"images8x8: expected a numeric dtype, got {x.dtype}")
    lead = x.shape[:-2]
    flat = x.reshape(-1, SOURCE_SIZE, SOURCE_SIZE).astype(np.float32, copy=False)
    grey = np.matmul(np.matmul(_RESAMPLE, flat), _RESAMPLE.T)  # [M, 64, 64]
    rgb = grey[..., None] * _CHANNEL_GAIN  # [M, 64, 64, 3]
    out = np.clip(np.rint(rgb), 0.0, 255.0).astype(np.uint8)
    return out.reshape(*lead, FRAME_SIZE, FRAME_SIZE, 3)


def load_test_set(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The shipped test split: ``(images8x8 uint8 [M, 8, 8], labels int64 [M])``."""
    p = Path(path) if path is not None else TEST_SET_PATH
    with np.load(p, allow_pickle=False) as z:
        images = np.asarray(z["images"], dtype=np.uint8)
        labels = np.asarray(z["labels"], dtype=np.int64)
    if images.ndim != 3 or images.shape[1:] != (SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(f"{p}: images: expected shape [M, 8, 8], got {list(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"{p}: labels: expected shape [{images.shape[0]}], got {list(labels.shape)}"
        )
    return images, labels


#: Side of a camera frame (:func:`camera_frames`) in pixels.
CAMERA_SIZE = 160


def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] matrix of a 1-D Gaussian blur (edges renormalised); identity for sigma ~ 0."""
    if sigma < 0.05:
        return np.eye(n, dtype=np.float32)
    idx = np.arange(n, dtype=np.float32)
    m = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    m[np.abs(idx[:, None] - idx[None, :]) > 3 * sigma + 1] = 0.0
    return (m / m.sum(1, keepdims=True)).astype(np.float32)


def camera_frames(images8x8: np.ndarray, seed: int, size: int = CAMERA_SIZE, *, hard: float = 1.0) -> np.ndarray:
    """8x8 digits (0..16) -> uint8 RGB camera frames ``[N, size, size, 3]`` (NHWC), deterministic in
    ``seed`` (numpy's PCG64; item i's draws depend only on the seed and i, so a prefix of a batch is
    the same frames). Per frame: the digit (bright ink) bilinearly scaled to 45-90% of the frame at
    a random position, on a darker background of random level with a linear gradient; a random tint
    and contrast; a Gaussian blur of sigma up
    to 2.5 px (focus); with probability 0.4 an occluding rectangle of 15-40% of the digit's side;
    Gaussian sensor noise of sigma up to 18 (of 255). ``hard`` (0..1) scales blur, occlusion
    probability and noise (1: the test set's setting)."""
    x = np.asarray(images8x8)
    if x.ndim != 3 or x.shape[1:] != (SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(f"images8x8: expected shape [N, 8, 8], got {list(x.shape)}")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size = {size!r}: expected an int >= 32")
    n = x.shape[0]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    coords = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    for i in range(n):
        rng = np.random.default_rng([int(seed), i])
        side = int(round(size * rng.uniform(0.45, 0.90)))
        top = int(rng.integers(0, size - side + 1))
        left = int(rng.integers(0, size - side + 1))
        resample = _bilinear_matrix(SOURCE_SIZE, side).astype(np.float32)
        digit = resample @ (x[i].astype(np.float32) / SOURCE_MAX) @ resample.T        # [side, side] 0..1
        mask = np.zeros((size, size), dtype=np.float32)
        mask[top:top + side, left:left + side] = digit
        gx, gy = rng.uniform(-30, 30, size=2)
        base = rng.uniform(20, 130)
        background = base + gx * coords[None, :] + gy * coords[:, None]             # [size, size]
        contrast = rng.uniform(0.45, 1.0) * (255.0 - base)
        grey = background + contrast * mask
        if rng.random() < 0.4 * hard:
            h = int(side * rng.uniform(0.15, 0.40))
            w = int(side * rng.uniform(0.15, 0.40))
            oy = top + int(rng.integers(0, max(side - h, 1)))
            ox = left + int(rng.integers(0, max(side - w, 1)))
            grey[oy:oy + h, ox:ox + w] = rng.uniform(0, 255)
        blur = _gauss_matrix(size, float(rng.uniform(0.0, 2.5) * hard))
        grey = blur @ grey @ blur.T
        tint = rng.uniform(0.75, 1.0, size=3).astype(np.float32)
        rgb = grey[..., None] * tint + rng.normal(0.0, rng.uniform(0, 18) * hard, size=(size, size, 3))
        out[i] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out


#: The card's ``dataset.preprocess`` values :func:`card_test_set` knows.
PREPROCESS = {"agent.models.digits.frames_from_digits": "frames_from_digits",
              "agent.models.digits.camera_frames": "camera_frames"}


def card_test_set(dataset: dict, base_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A card's test set as ``(frames, labels)``: its ``dataset.test_file`` (8x8 digits beside the
    card) turned into model inputs by the card's ``dataset.preprocess``."""
    if not isinstance(dataset, dict) or "test_file" not in dataset:
        raise ValueError(f"dataset = {dataset!r}: expected a map with test_file and preprocess")
    preprocess = dataset.get("preprocess")
    if preprocess not in PREPROCESS:
        raise ValueError(f"dataset.preprocess = {preprocess!r}: expected one of {sorted(PREPROCESS)}")
    images, labels = load_test_set(Path(base_dir) / str(dataset["test_file"]))
    if preprocess == "agent.models.digits.camera_frames":
        seed, size = dataset.get("seed"), dataset.get("frame_size", CAMERA_SIZE)
        if not isinstance(seed, int):
            raise ValueError(f"dataset.seed = {seed!r}: expected the integer seed of the camera frames")
        return camera_frames(images, seed, int(size)), labels
    return frames_from_digits(images), labels
