"""Footage and frames for tests: clips made from a real photo, encoded images, frames pushed into Redis.

- `make_pan_clip` (re-exported from `streamd.samples`, which `streamd demo` uses too): footage made by panning over
  a real photo.
- `encode_jpeg`: an RGB array as JPEG bytes.
- `push_frames`: XADD encoded frames into a Redis stream.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np

from streamd.samples import make_pan_clip

__all__ = ["make_pan_clip", "encode_jpeg", "push_frames"]


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


async def push_frames(client: Any, key: str, images: list[np.ndarray], fmt: str = "jpeg",
                      extra: dict[str, Any] | None = None) -> list[str]:
    """XADD each image (JPEG, PNG or raw with shape/dtype) with a capture timestamp. Returns entry ids."""
    from PIL import Image

    ids = []
    for img in images:
        fields: dict[str, Any] = {"ts": repr(time.time()), **(extra or {})}
        if fmt == "raw":
            fields.update(image=img.tobytes(), shape=",".join(map(str, img.shape)), dtype=str(img.dtype))
        elif fmt == "png":
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            fields["image"] = buf.getvalue()
        else:
            fields["image"] = encode_jpeg(img)
        ids.append((await client.xadd(key, fields)).decode())
    return ids
