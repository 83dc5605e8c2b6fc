"""Named errors of the model manager. Each is a StageError (a stage that meets one fails its frames with the
message) and carries `code`, the API's error code for it."""

from __future__ import annotations

from typing import Any

from streamd.errors import StageError
from streamd.models.memory import fmt_bytes


class ModelError(StageError):
    code = "model_error"


class UnknownModel(ModelError):
    code = "model_not_found"


class ModelLoadFailed(ModelError):
    """The loader raised: a missing file, a download that cannot happen offline, a model the runtime refuses."""

    code = "model_load_failed"


class ModelInUse(ModelError):
    """An unload asked while streams use the model (without force)."""

    code = "model_in_use"

    def __init__(self, name: str, users: dict[str, list[str]]):
        streams = ", ".join(users["streams"]) or "none"
        super().__init__(f"model {name!r} is in use (streams: {streams}; a forward pass may be running); "
                         "unload it with force to fail those streams")
        self.name = name
        self.users = users


class ModelConflict(ModelError):
    """A stage sets a batching option of a shared model to another value than the one its batcher runs with."""

    code = "model_conflict"


class ModelRevoked(ModelError):
    """The model was unloaded by force while a stream used it: that stream fails with this reason."""

    code = "model_unloaded"


class InsufficientMemory(ModelError):
    """Loading would exceed the device's budget even after unloading every idle model."""

    code = "insufficient_memory"

    def __init__(self, name: str, device: str, needed: int, budget: int, holders: list[dict[str, Any]]):
        held = "; ".join(_holder(h) for h in holders) or "nothing"
        super().__init__(f"cannot load model {name!r} on {device}: it needs {fmt_bytes(needed)}, the budget is "
                         f"{fmt_bytes(budget)} and {fmt_bytes(sum(h['memory_bytes'] for h in holders))} is held by "
                         f"models that cannot be unloaded: {held}")
        self.name = name
        self.device = device
        self.needed = needed
        self.budget = budget
        self.holders = holders

    def details(self) -> dict[str, Any]:
        return {"model": self.name, "device": self.device, "needed_bytes": self.needed, "budget_bytes": self.budget,
                "holders": self.holders}


def _holder(h: dict[str, Any]) -> str:
    why = []
    if h["streams"]:
        why.append(f"used by streams {', '.join(h['streams'])}")
    if h["pinned"]:
        why.append("pinned")
    if h["state"] != "ready":
        why.append(h["state"])
    if h.get("active"):
        why.append("running a forward pass")
    return f"{h['name']} ({fmt_bytes(h['memory_bytes'])}, {', '.join(why) or 'in use'})"
