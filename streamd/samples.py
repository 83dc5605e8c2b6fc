"""Sample footage made from real photos: a camera pan over a photo, encoded to H.264 with PyAV.

The photos ship inside installed packages (Ultralytics' `assets/zidane.jpg`, `bus.jpg`), so this works offline.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import av
import numpy as np


def find_photo(name: str = "zidane.jpg") -> Path | None:
    spec = importlib.util.find_spec("ultralytics")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "assets" / name
        if p.is_file():
            return p
    return None


def load_photo(name: str = "zidane.jpg") -> np.ndarray:
    from PIL import Image

    p = find_photo(name)
    if p is None:
        raise FileNotFoundError(f"photo {name} not found (it ships with the ultralytics package)")
    with Image.open(p) as im:
        return np.asarray(im.convert("RGB"))


def pan_frames(photo: np.ndarray, n: int, fps: float, size: tuple[int, int]):
    """Yield `n` RGB frames of `size` (w, h): a crop moving over the photo scaled 1.25x larger than `size`."""
    from PIL import Image

    w, h = size
    big_w, big_h = int(w * 1.25) // 2 * 2, int(h * 1.25) // 2 * 2
    big = np.asarray(Image.fromarray(photo).resize((big_w, big_h), Image.BILINEAR))
    mx, my = (big_w - w) / 2, (big_h - h) / 2
    for i in range(n):
        t = i / fps
        x = int(mx + mx * math.sin(t))
        y = int(my + my * math.cos(t))
        yield np.ascontiguousarray(big[y : y + h, x : x + w])


def make_pan_clip(
    path: str | Path,
    photo: str = "zidane.jpg",
    seconds: float = 6.0,
    fps: int = 30,
    size: tuple[int, int] = (1280, 720),
    gop: int = 30,
    container: str = "mp4",
) -> Path:
    """Write an H.264 video (MP4, or another FFmpeg `container` such as mpegts) of a pan over a real photo.
    Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = load_photo(photo)
    tmp = path.with_suffix(".part" + path.suffix)
    with av.open(str(tmp), "w", format=container) as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height = size
        st.pix_fmt = "yuv420p"
        # a keyframe every `gop` frames exactly (no scene-cut keyframes in between)
        st.options = {"preset": "veryfast", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "0"}
        for arr in pan_frames(img, int(seconds * fps), fps, size):
            for pkt in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    tmp.replace(path)
    return path
