"""Image preprocessing of the Med-VLM encoders, in numpy only (the torch-free bundle path imports it)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["IMAGENET_MEAN_STD", "letterbox_input", "resize_bilinear"]

#: mean and std per RGB channel, on 0-255 (DINOv2 / timm ImageNet statistics)
IMAGENET_MEAN_STD = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def letterbox_input(rgb: npt.NDArray[np.uint8], size: int,
                    normalization: str) -> tuple[npt.NDArray[np.float32], tuple[int, int]]:
    """RGB uint8 ``(H, W, 3)`` -> image encoder input ``(3, size, size)`` float32 and the ``(h, w)`` of the
    content (the image scaled so its longer side is ``size``, padded at the bottom/right; see
    :meth:`segmentation.textseg.encoders.ImageEncoder.preprocess`; ``normalization``: ``minmax`` or
    ``imagenet``)."""
    from segmentation.litemedsam import preprocess_image

    chw, content = preprocess_image(rgb, "letterbox", size)
    if normalization == "imagenet":
        mean = np.asarray(IMAGENET_MEAN_STD[0], dtype=np.float32)[:, None, None] / 255.0
        std = np.asarray(IMAGENET_MEAN_STD[1], dtype=np.float32)[:, None, None] / 255.0
        chw = ((chw - mean) / std).astype(np.float32)
    return chw, content


def _bilinear_axis(n_in: int, n_out: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp],
                                                     npt.NDArray[np.float32]]:
    # torch's upsample_bilinear2d, align_corners=False: half-pixel centres, the source clamped at 0 and at n_in-1
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(values: npt.NDArray[np.floating], size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Resize a 2-D float map ``(h, w)`` to ``size = (H, W)`` as ``torch.nn.functional.interpolate(mode=
    "bilinear", align_corners=False)`` does (no antialiasing), in numpy: the same values to float rounding."""
    a = np.asarray(values, dtype=np.float32)
    r0, r1, wr = _bilinear_axis(a.shape[0], int(size[0]))
    c0, c1, wc = _bilinear_axis(a.shape[1], int(size[1]))
    rows = a[r0] * (1.0 - wr)[:, None] + a[r1] * wr[:, None]  # (H, w)
    return (rows[:, c0] * (1.0 - wc) + rows[:, c1] * wc).astype(np.float32, copy=False)
