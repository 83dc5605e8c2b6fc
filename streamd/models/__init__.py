"""Models: the catalog and its manager (lazy load, memory budget, LRU eviction, idle unload).

- `spec`: the `models:` config section (declared models, budgets) and the check of the models pipelines name;
- `sources`: aliases, device names, the Ultralytics loader;
- `memory`: what a model holds, what a device has, giving memory back;
- `entry`, `manager`: the catalog's entries and `ModelManager` (also `ModelRegistry`, its older name).

Light on import (the config imports `spec`): the manager and its errors are imported when first asked for.
"""

from __future__ import annotations

from typing import Any

from streamd.models.sources import ALIASES, load_yolo, resolve_device, resolve_model_path

__all__ = ["ALIASES", "InsufficientMemory", "ModelInUse", "ModelManager", "ModelRegistry", "ModelsConfig",
           "ModelSpec", "UnknownModel", "load_yolo", "resolve_device", "resolve_model_path"]

_LAZY = {"ModelManager": "manager", "ModelRegistry": "manager", "ModelRef": "entry", "State": "entry",
         "ModelsConfig": "spec", "ModelSpec": "spec", "InsufficientMemory": "errors", "ModelInUse": "errors",
         "UnknownModel": "errors", "ModelError": "errors"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamd.models' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"streamd.models.{module}"), name)
