"""Masks as records carry them: COCO-style uncompressed RLE in the frame's coordinates (detection masks, SAM2's)."""

from __future__ import annotations

from typing import Any

import numpy as np


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO-style uncompressed RLE: column-major run lengths, the first run counting zeros."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    cuts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], cuts, [flat.size]))).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def frame_masks(masks: Any, frame_shape: tuple[int, int], chunk: int = 16) -> list[dict[str, Any]]:
    """Masks in the letterboxed input's coordinates -> RLE in the frame's, aligned with the boxes: the letterbox
    padding is cut off before scaling (`ops.scale_masks`). A few masks at a time, so many detections on a large
    frame never hold N full-size masks at once."""
    from ultralytics.utils import ops

    out = []
    for i in range(0, len(masks), chunk):
        m = ops.scale_masks(masks[i : i + chunk, None].float(), frame_shape)[:, 0] > 0.5
        out.extend(mask_rle(x) for x in m.cpu().numpy())
    return out
