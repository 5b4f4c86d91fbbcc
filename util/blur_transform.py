"""Torch side of the DeblurringMAE blur: `blur_tensor`, the batched twin of `util.blur.blur_array` for any
device, and `RandomBlur`, a deterministic torchvision-style transform over PIL images, arrays and tensors.

Both take the same `BlurSpec` and keys as `util.blur`, so on-the-fly blurring reproduces the offline tool.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from util.blur import _LUMA, BlurSpec, blur_array, blur_pil, make_kernel

__all__ = ["RandomBlur", "blur_tensor"]


# --------------------------------------------------------------------------------------------------
# Filtering (torch, batched; for GPU pipelines)
# --------------------------------------------------------------------------------------------------

def _reflect_index(n: int, pad: int) -> np.ndarray:
    # Index map for reflect-101 padding of any width, like np.pad(mode='reflect'); torch's own reflect
    # padding refuses pads >= the image size, which tiny crops and large defocus radii can hit.
    i = np.arange(-pad, n + pad)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i >= n, period - i, i)


def blur_tensor(x: torch.Tensor, spec: BlurSpec, key: str | int | Sequence[str | int] = 0) -> torch.Tensor:
    """Torch twin of `blur_array` for (H, W), (C, H, W) or (B, C, H, W) tensors, on any device.

    With ``spec.grayscale`` 3- or 4-channel input becomes 1 channel (BT.601, alpha dropped). ``key``
    may be one key for the whole batch or a sequence of B keys so each sample gets its own motion
    angle. Integer tensors are rounded and saturated back to their dtype; float tensors are not
    rounded. Results agree with `blur_array` to float32 rounding (≤ 1 level on uint8).
    """
    if not isinstance(spec, BlurSpec):
        raise TypeError(f"spec must be a BlurSpec, got {type(spec).__name__}")
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"expected (H, W), (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    in_dtype, in_ndim = x.dtype, x.ndim
    xb = x.reshape((1, 1) + x.shape) if x.ndim == 2 else x.unsqueeze(0) if x.ndim == 3 else x
    work = torch.float64 if in_dtype == torch.float64 else torch.float32
    xb = xb.to(work)
    b, c, h, w = xb.shape
    if spec.grayscale and c in (3, 4):
        wts = torch.tensor(_LUMA, dtype=work, device=xb.device).view(1, 3, 1, 1)
        xb = (xb[:, :3] * wts).sum(1, keepdim=True)
        if not in_dtype.is_floating_point:
            xb = xb.round()  # blur_array rounds the gray image to the input dtype before blurring
        c = 1

    keys: list[str | int]
    if isinstance(key, (str, int)):
        keys = [key]
    else:
        keys = list(key)
        if len(keys) != b:
            raise ValueError(f"got {len(keys)} keys for a batch of {b}")

    def padded(r_y: int, r_x: int) -> torch.Tensor:
        iy = torch.as_tensor(_reflect_index(h, r_y), device=xb.device)
        ix = torch.as_tensor(_reflect_index(w, r_x), device=xb.device)
        return xb.index_select(2, iy).index_select(3, ix)

    if spec.method == "median":
        r = spec.ksize // 2
        cols = F.unfold(padded(r, r).reshape(b * c, 1, h + 2 * r, w + 2 * r), spec.ksize)
        y = cols.median(dim=1).values.reshape(b, c, h, w)  # odd k*k: median is an exact sample
    else:
        np_dtype = np.uint8 if in_dtype == torch.uint8 else np.float32
        kernels = [make_kernel(spec, k, np_dtype) for k in (keys if spec.method == "motion" else keys[:1])]
        kh = max(k.shape[0] for k in kernels)
        kw = max(k.shape[1] for k in kernels)
        stack = np.zeros((len(kernels), kh, kw))
        for n, k in enumerate(kernels):  # centre smaller kernels so one grouped conv serves all
            oy, ox = (kh - k.shape[0]) // 2, (kw - k.shape[1]) // 2
            stack[n, oy:oy + k.shape[0], ox:ox + k.shape[1]] = k
        wt = torch.as_tensor(stack, dtype=work, device=xb.device)
        xp = padded(kh // 2, kw // 2)
        if len(kernels) == 1:
            y = F.conv2d(xp.reshape(b * c, 1, h + kh - 1, w + kw - 1), wt.view(1, 1, kh, kw))
        else:  # one kernel per sample: fold the batch into channels and use a grouped conv
            wt = wt.repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, kh, kw)
            y = F.conv2d(xp.reshape(1, b * c, h + kh - 1, w + kw - 1), wt, groups=b * c)
        y = y.reshape(b, c, h, w)

    if not in_dtype.is_floating_point:
        info = torch.iinfo(in_dtype)
        y = y.round().clamp_(info.min, info.max)
    y = y.to(in_dtype)
    if in_ndim == 2:
        return y[0, 0]
    if in_ndim == 3:
        return y[0]
    return y


# --------------------------------------------------------------------------------------------------
# Transform
# --------------------------------------------------------------------------------------------------

class RandomBlur:
    """A torchvision-style transform: ``RandomBlur(spec)(img)`` for PIL images, numpy arrays or tensors.

    Deterministic: the random part (motion angle) is drawn from ``spec.seed`` and a key. Pass
    ``key=relative_path`` to reproduce the offline tool; without a key the image content itself is
    hashed, so the same image always gets the same blur whatever worker or epoch it lands in, while
    differently augmented crops of it get different angles. Picklable, for DataLoader workers.
    """

    def __init__(self, spec: BlurSpec | Mapping[str, Any] | None = None) -> None:
        if spec is None:
            spec = BlurSpec()
        elif not isinstance(spec, BlurSpec):
            spec = BlurSpec.from_dict(spec)
        self.spec = spec

    def __call__(self, img: Any, key: str | int | None = None) -> Any:
        if isinstance(img, Image.Image):
            if key is None:
                key = self._content_key(img.mode, img.size, img.tobytes())
            return blur_pil(img, self.spec, key)
        if isinstance(img, np.ndarray):
            if key is None:
                key = self._content_key(str(img.dtype), img.shape, np.ascontiguousarray(img).tobytes())
            return blur_array(img, self.spec, key)
        if type(img).__module__.startswith("torch"):
            if key is None:
                arr = img.detach().cpu().contiguous().numpy()
                key = self._content_key(str(arr.dtype), arr.shape, arr.tobytes())
            return blur_tensor(img, self.spec, key)
        raise TypeError(f"RandomBlur expects a PIL image, numpy array or torch tensor, got {type(img).__name__}")

    @staticmethod
    def _content_key(kind: str, shape: Any, data: bytes) -> str:
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{kind}|{tuple(shape)}|".encode())
        h.update(data)
        return h.hexdigest()

    def __repr__(self) -> str:
        s = self.spec
        return (f"{type(self).__name__}(method={s.method!r}, sigma={s.sigma}, ksize={s.ksize}, "
                f"grayscale={s.grayscale}, seed={s.seed})")
