"""Blur degradations for DeblurringMAE: the blurred image is the model input, the sharp one the target.

One implementation serves three callers that must agree pixel for pixel: the offline tool
(`blurred_images.py`), the training pipeline that blurs on the fly, and finetune/eval code that has to
show a deblurring model the blur it was trained on. A `BlurSpec` is therefore stored in checkpoints as
a plain dict (`to_dict` / `from_dict`).

Behaviour follows the reference tool, which used OpenCV; we reproduce it with numpy/Pillow only:

* ``gaussian``: ``cv2.GaussianBlur(img, (0, 0), sigma)``. OpenCV derives the kernel size from sigma as
  ``round(sigma * 6 + 1) | 1`` for 8-bit images (3 sigma each side) and ``round(sigma * 8 + 1) | 1``
  for every other depth (4 sigma); ``gaussian_ksize`` does the same, so sigma 1.1 gives 9 taps on
  uint8 and 11 on uint16/float. ``spec.ksize`` is not used by this method.
* ``mean``: ``ksize`` x ``ksize`` box filter (``cv2.blur``).
* ``median``: ``ksize`` x ``ksize`` median (``cv2.medianBlur``; the reference crashed on it).
* ``motion``: an anti-aliased line of length ``ksize`` through the centre at a random angle.
* ``defocus``: an anti-aliased disc of *radius* ``ksize``.

Borders are reflected without repeating the edge pixel (OpenCV's BORDER_REFLECT_101, numpy's
``mode='reflect'``, scipy's ``mode='mirror'``) for every method, the median included, so results
equal ``scipy.ndimage`` exactly where scipy has the same filter.

Randomness (only the motion angle today) comes from ``derive_seed(spec.seed, key)``, a hash of the
seed and a caller-chosen key; the offline tool uses the image's POSIX path relative to the source root
(e.g. ``"train/benign/img001.png"``), so results do not depend on traversal order or worker count and
the on-the-fly pipeline can reproduce them by passing the same key.

The torch twin (`blur_tensor`, batched on any device) and the `RandomBlur` transform live in
`util.blur_transform`, so the offline tool never imports torch.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

# blurred_images.py keeps this file in its output folder while it writes the tree and removes it when every
# image is written: pretraining refuses a tree that still has it (a partial tree is not the whole dataset).
BLUR_IN_PROGRESS = ".blur_in_progress"

__all__ = [
    "METHODS",
    "BlurSpec",
    "array_to_pil",
    "blur_array",
    "blur_pil",
    "derive_seed",
    "gaussian_kernel1d",
    "gaussian_ksize",
    "make_kernel",
    "motion_angle",
    "pil_to_array",
    "to_grayscale",
]

METHODS: tuple[str, ...] = ("gaussian", "mean", "median", "motion", "defocus")
# Methods whose ksize is a window width, which must be odd to have a centre pixel. For defocus
# ksize is a radius, so any positive value works.
_ODD_KSIZE_METHODS = ("mean", "median", "motion")
# ITU-R BT.601 luma, the weights both cv2.imread(..., IMREAD_GRAYSCALE) and PIL's convert('L') use.
_LUMA = (0.299, 0.587, 0.114)
# Bound the median's (rows, W, C, k*k) window copy so huge scans do not need gigabytes at once.
_MEDIAN_CHUNK_ELEMS = 1 << 24


@dataclass
class BlurSpec:
    """What blur to apply. Plain str/int/float/bool fields so it survives ``torch.load(weights_only=True)``.

    ``ksize`` is the window width for mean/median, the line length for motion and the disc radius for
    defocus; gaussian ignores it and derives its size from ``sigma``. ``grayscale`` converts colour
    input to one channel first, as the reference did. ``seed`` only matters for random kernels (motion).
    """

    method: str = "gaussian"
    sigma: float = 1.1
    ksize: int = 5
    grayscale: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        # Validate at construction so a bad spec fails where it is written (CLI, config), not deep
        # inside a DataLoader worker.
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"unknown blur method {self.method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float, np.integer, np.floating)):
            raise ValueError(f"blur sigma must be a number, got {self.sigma!r}")
        self.sigma = float(self.sigma)
        if not math.isfinite(self.sigma) or self.sigma <= 0:
            raise ValueError(f"blur sigma must be a finite number > 0, got {self.sigma}")
        self.ksize = _as_int("ksize", self.ksize)
        if self.ksize < 1:
            raise ValueError(f"blur ksize must be >= 1, got {self.ksize}")
        if self.method in _ODD_KSIZE_METHODS and self.ksize % 2 == 0:
            raise ValueError(f"blur ksize must be odd for method {self.method!r} (a window needs a centre), "
                             f"got {self.ksize}")
        if not isinstance(self.grayscale, (bool, np.bool_)):
            raise ValueError(f"blur grayscale must be a bool, got {self.grayscale!r}")
        self.grayscale = bool(self.grayscale)
        self.seed = _as_int("seed", self.seed)

    def to_dict(self) -> dict[str, str | int | float | bool]:
        """A JSON-serialisable dict of builtin scalars, safe inside ``weights_only`` checkpoints."""
        return dict(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BlurSpec:
        """Inverse of `to_dict`; unknown keys are an error so a typo in a config is not silently ignored."""
        if not isinstance(d, Mapping):
            raise ValueError(f"BlurSpec.from_dict expects a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown BlurSpec field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))

    def describe(self) -> str:
        """Short human-readable form for logs, e.g. ``gaussian(sigma=1.1)``."""
        if self.method == "gaussian":
            return f"gaussian(sigma={self.sigma:g})"
        if self.method == "defocus":
            return f"defocus(radius={self.ksize})"
        if self.method == "motion":
            return f"motion(length={self.ksize}, seed={self.seed})"
        return f"{self.method}(ksize={self.ksize})"


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise ValueError(f"blur {name} must be an int, got {v!r}")
    if isinstance(v, (float, np.floating)):
        if not float(v).is_integer():
            raise ValueError(f"blur {name} must be an int, got {v!r}")
        return int(v)  # JSON round trips may turn 5 into 5.0
    try:
        return int(v.__index__())
    except (AttributeError, TypeError):
        raise ValueError(f"blur {name} must be an int, got {v!r}") from None


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

def gaussian_ksize(sigma: float, dtype: np.dtype | type = np.uint8) -> int:
    """OpenCV's automatic kernel size for ``GaussianBlur(ksize=(0, 0))``: 3 sigma per side on 8-bit data,
    4 sigma otherwise, always odd. cvRound rounds half to even, as ``np.rint`` does."""
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    per_side = 3 if np.dtype(dtype) == np.uint8 else 4
    return int(np.rint(sigma * per_side * 2 + 1)) | 1


def gaussian_kernel1d(sigma: float, ksize: int | None = None, dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """Normalised 1-D Gaussian taps (float64), like ``cv2.getGaussianKernel(ksize, sigma)``.

    ``ksize=None`` derives the size from sigma and the image dtype (see `gaussian_ksize`).
    """
    if ksize is None:
        ksize = gaussian_ksize(sigma, dtype)
    if ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"gaussian ksize must be odd and >= 1, got {ksize}")
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    k = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return k / k.sum()


def derive_seed(seed: int, key: str | int) -> int:
    """A 64-bit seed from (seed, key) that is stable across processes and Python versions.

    Python's ``hash`` is salted per process, so it would make workers disagree; blake2b does not.
    """
    digest = hashlib.blake2b(f"{int(seed)}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def motion_angle(spec: BlurSpec, key: str | int = 0) -> float:
    """The motion-blur angle in degrees, [0, 180), measured from the +x (column) axis towards +y (down)."""
    rng = np.random.default_rng(derive_seed(spec.seed, key))
    return float(rng.uniform(0.0, 180.0))


def _motion_kernel(length: int, angle_deg: float) -> np.ndarray:
    # Bilinear rendering of the ideal segment: sampling a horizontal line of `length` ones, rotated by
    # the angle, with bilinear interpolation has the closed form below (a tent across the line times a
    # clipped ramp along it), so no rasterisation artefacts and an exact box at 0 and 90 degrees.
    # One pixel of margin holds the anti-aliased ends at oblique angles.
    half = (length - 1) / 2
    r = length // 2 + 1
    y, x = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    t = math.radians(angle_deg)
    u = x * math.cos(t) + y * math.sin(t)
    v = -x * math.sin(t) + y * math.cos(t)
    k = np.clip(1.0 - np.abs(v), 0.0, None) * np.clip(half + 1.0 - np.abs(u), 0.0, 1.0)
    k = _trim_zero_border(k)
    return k / k.sum()


def _defocus_kernel(radius: int) -> np.ndarray:
    # Pixel weight = how far the pixel centre lies inside the circle, clipped to [0, 1]: a one-pixel
    # linear ramp that approximates the covered area, so small radii stay round and energy-preserving.
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1].astype(np.float64)
    k = np.clip(radius + 0.5 - np.hypot(x, y), 0.0, 1.0)
    return k / k.sum()


def _trim_zero_border(k: np.ndarray) -> np.ndarray:
    # Trim symmetrically so the kernel stays centred.
    while k.shape[0] > 1 and not (k[0].any() or k[-1].any() or k[:, 0].any() or k[:, -1].any()):
        k = k[1:-1, 1:-1]
    return k


def make_kernel(spec: BlurSpec, key: str | int = 0, dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """The 2-D float64 kernel (sums to 1) that `blur_array` applies for ``spec`` and ``key``.

    ``dtype`` only matters for gaussian, whose size depends on bit depth as in OpenCV. The median is
    not a linear filter and has no kernel.
    """
    m = spec.method
    if m == "gaussian":
        g = gaussian_kernel1d(spec.sigma, None, dtype)
        return np.outer(g, g)
    if m == "mean":
        return np.full((spec.ksize, spec.ksize), 1.0 / spec.ksize ** 2)
    if m == "motion":
        return _motion_kernel(spec.ksize, motion_angle(spec, key))
    if m == "defocus":
        return _defocus_kernel(spec.ksize)
    raise ValueError(f"blur method {m!r} is not a linear filter and has no kernel")


# --------------------------------------------------------------------------------------------------
# Colour / PIL conversion
# --------------------------------------------------------------------------------------------------

def _round_to(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype, copy=False)


def to_grayscale(img: np.ndarray) -> np.ndarray:
    """H×W×C → H×W with BT.601 luma, same dtype; alpha (4th / 2nd channel) is dropped, 2-D passes through.

    Exposed so a training pipeline can convert the sharp target the same way as the blurred input.
    """
    if img.ndim == 2:
        return img
    if img.ndim != 3:
        raise ValueError(f"expected an H×W or H×W×C image, got shape {img.shape}")
    c = img.shape[2]
    if c in (1, 2):  # gray or gray+alpha
        return np.ascontiguousarray(img[..., 0])
    if c not in (3, 4):
        raise ValueError(f"cannot convert a {c}-channel image to grayscale")
    work = np.float64 if img.dtype == np.float64 else np.float32
    rgb = img[..., :3].astype(work, copy=False)
    y = rgb[..., 0] * _LUMA[0] + rgb[..., 1] * _LUMA[1] + rgb[..., 2] * _LUMA[2]
    return _round_to(y, img.dtype)


def pil_to_array(img: Image.Image, grayscale: bool = True) -> np.ndarray:
    """A PIL image as uint8 / uint16 / float32 array (H×W or H×W×3), alpha dropped, bit depth kept.

    16-bit grayscale ('I;16*', or 'I' within 0..65535) becomes uint16 so 16-bit scans keep their
    precision. Pillow has no 16-bit RGB mode (it opens 48-bit PNGs as 8-bit RGB), so colour is 8-bit.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16)  # also normalises big-endian 'I;16B' to native order
    elif mode == "I":
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError("32-bit integer image with values outside 0..65535 is not supported")
        arr = arr.astype(np.uint16)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
    elif mode == "L":
        arr = np.asarray(img)
    elif mode in ("1", "LA", "La"):
        arr = np.asarray(img.convert("L"))
    elif mode == "RGB":
        arr = np.asarray(img)
    elif mode in ("P", "PA"):
        # Palette images may carry transparency; go through RGBA so Pillow does not warn, then drop it.
        has_alpha = mode == "PA" or "transparency" in img.info
        arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))[..., :3]
    else:  # RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV, ...
        arr = np.asarray(img.convert("RGB"))
    if grayscale and arr.ndim == 3:
        arr = to_grayscale(arr)
    return np.array(arr, copy=True)  # np.asarray(PIL) can be read-only; callers may write in place


def array_to_pil(arr: np.ndarray) -> Image.Image:
    """Inverse of `pil_to_array`: uint8 → 'L'/'RGB'/'RGBA', uint16 → 'I;16', float → 'F' (2-D only)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        if arr.ndim == 2 or arr.shape[2] in (3, 4):
            return Image.fromarray(np.ascontiguousarray(arr))
    elif arr.dtype == np.uint16:
        if arr.ndim == 2:
            return Image.fromarray(np.ascontiguousarray(arr))  # mode 'I;16'
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.ndim == 2:
            return Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
    raise ValueError(f"cannot make a PIL image from a {arr.dtype} array of shape {arr.shape} "
                     "(Pillow supports 8-bit gray/RGB/RGBA, 16-bit gray and float gray)")


# --------------------------------------------------------------------------------------------------
# Filtering (numpy)
# --------------------------------------------------------------------------------------------------

def _pad_reflect(x: np.ndarray, ry: int, rx: int) -> np.ndarray:
    pad = [(ry, ry), (rx, rx)] + [(0, 0)] * (x.ndim - 2)
    return np.pad(x, pad, mode="reflect")


def _correlate_separable(x: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
    # Two 1-D passes as sums of shifted views: O(k) full-array FMAs per pass, no Python per-pixel loop.
    h, w = x.shape[:2]
    ry, rx = len(ky) // 2, len(kx) // 2
    xp = _pad_reflect(x, ry, 0)
    tmp = np.zeros((h, xp.shape[1]) + x.shape[2:], dtype=x.dtype)
    for i, c in enumerate(ky.astype(x.dtype)):
        tmp += c * xp[i:i + h]
    tp = _pad_reflect(tmp, 0, rx)
    out = np.zeros_like(x)
    for j, c in enumerate(kx.astype(x.dtype)):
        out += c * tp[:, j:j + w]
    return out


def _correlate2d(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    # Non-separable kernels (motion line, defocus disc) are small and sparse-ish: one shifted FMA per
    # non-zero tap beats an FFT at these sizes and keeps the border rule identical to the other methods.
    h, w = x.shape[:2]
    ry, rx = k.shape[0] // 2, k.shape[1] // 2
    xp = _pad_reflect(x, ry, rx)
    out = np.zeros_like(x)
    buf = np.empty_like(x)
    for i, j in zip(*np.nonzero(k)):
        np.multiply(xp[i:i + h, j:j + w], x.dtype.type(k[i, j]), out=buf)
        out += buf
    return out


def _median(x: np.ndarray, ksize: int) -> np.ndarray:
    # Works on the input values without arithmetic, so the result is an input sample and matches
    # scipy exactly. 8-bit data is widened because numpy's SIMD partition skips 1-byte types
    # (about 4x slower on 512x512 otherwise); the cast back is lossless.
    if x.dtype.itemsize == 1:
        return _median(x.astype(np.int16), ksize).astype(x.dtype)
    r = ksize // 2
    h, w = x.shape[:2]
    xp = _pad_reflect(x, r, r)
    win = sliding_window_view(xp, (ksize, ksize), axis=(0, 1))  # (H, W, [C,] k, k), no copy yet
    kk = ksize * ksize
    out = np.empty_like(x)
    per_row = max(1, w * int(np.prod(x.shape[2:], dtype=np.int64)) * kk)
    step = max(1, _MEDIAN_CHUNK_ELEMS // per_row)
    for r0 in range(0, h, step):
        block = win[r0:r0 + step].reshape(win[r0:r0 + step].shape[:-2] + (kk,))  # copies this chunk
        out[r0:r0 + step] = np.partition(block, kk // 2, axis=-1)[..., kk // 2]
    return out


def blur_array(img: np.ndarray, spec: BlurSpec, key: str | int = 0) -> np.ndarray:
    """Blur an H×W or H×W×C array (uint8, uint16, other ints or floats); the dtype is kept.

    With ``spec.grayscale`` colour input is converted to one channel first and the result is H×W;
    otherwise every channel is blurred independently. Integer results are rounded half-to-even and
    saturated, as OpenCV does. ``key`` selects the random kernel (motion angle) together with
    ``spec.seed``; use the image's relative path to reproduce the offline tool.
    """
    if not isinstance(spec, BlurSpec):
        raise TypeError(f"spec must be a BlurSpec, got {type(spec).__name__}")
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an H×W or H×W×C image, got shape {img.shape}")
    if img.dtype == np.bool_ or not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise ValueError(f"unsupported image dtype {img.dtype}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"empty image of shape {img.shape}")
    if spec.grayscale and img.ndim == 3:
        img = to_grayscale(img)
    dtype = img.dtype

    if spec.method == "median":
        return _median(img, spec.ksize)

    work = np.float64 if dtype in (np.float64, np.int32, np.uint32, np.int64, np.uint64) else np.float32
    x = img.astype(work)
    if spec.method == "gaussian":
        g = gaussian_kernel1d(spec.sigma, None, dtype)
        y = _correlate_separable(x, g, g)
    elif spec.method == "mean":
        box = np.full(spec.ksize, 1.0 / spec.ksize)
        y = _correlate_separable(x, box, box)
    else:
        y = _correlate2d(x, make_kernel(spec, key, dtype))
    return _round_to(y, dtype)


def blur_pil(img: Image.Image, spec: BlurSpec, key: str | int = 0) -> Image.Image:
    """Blur a PIL image. Alpha is dropped; with ``spec.grayscale`` the result is 'L' (or 'I;16' for
    16-bit input), otherwise the colour mode is kept ('RGB' for colour input)."""
    return array_to_pil(blur_array(pil_to_array(img, grayscale=spec.grayscale), spec, key))
