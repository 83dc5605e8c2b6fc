"""A loaded model's version: a content hash of its weights, computed once per load (`ModelManager._load`, in a
worker thread, never on the event loop or the device's executor).

- a weights file (a .pt .onnx .engine ..., an alias's file, the checkpoint Ultralytics loaded): sha256 of the
  file's bytes (`method: file`);
- a folder (a transformers model, a hub id found in the local Hugging Face cache): sha256 over its weight files,
  each file's path relative to the folder and its own sha256, in path order (`method: folder`);
- anything else (a `.yaml` built with random weights): sha256 of the loaded tensors, each parameter's and buffer's
  name, dtype, shape and bytes, in name order (`method: weights`). Two loads of a `.yaml` are two versions: their
  random weights differ.

A file's hash is cached by (path, size, mtime), so loading an unchanged file again reads nothing; a file in the
Hugging Face cache is a link to a blob named by the sha256 of its content, which is taken as it is (a model of
several GB is not read for it). Written `sha256:<16 hex digits>` (64 bits: enough to tell the weights of one
deployment apart).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from streamd.errors import StageError
from streamd.models.sources import resolve_model_path

PREFIX = "sha256:"
DIGITS = 16
_CHUNK = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".engine", ".gguf")
_HF_BLOB = re.compile(r"[0-9a-f]{64}")  # huggingface_hub's cache: blobs/<sha256 of the content> (git LFS files)


class Versions:
    """The manager's hash cache (one per manager; nothing process-global)."""

    def __init__(self) -> None:
        self._files: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> full hex digest

    def of(self, source: str, loaded: Any) -> tuple[str | None, str]:
        """(version, method) of a model loaded from `source`; (None, "none") when nothing can be hashed. Blocking."""
        path = _weights_path(source, loaded)
        if path is not None and path.is_file():
            return _short(self._file(path)), "file"
        if path is not None and path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
            if files:
                h = hashlib.sha256()
                for f in files:
                    h.update(f"{f.relative_to(path).as_posix()}\0{self._file(f)}\n".encode())
                return _short(h.hexdigest()), "folder"
        digest = tensors_digest(loaded)
        return (_short(digest), "weights") if digest is not None else (None, "none")

    def _file(self, path: Path) -> str:
        real = path.resolve()
        if real.parent.name == "blobs" and _HF_BLOB.fullmatch(real.name):
            return real.name
        st = real.stat()
        key = (str(real), st.st_size, st.st_mtime_ns)
        digest = self._files.get(key)
        if digest is None:
            h = hashlib.sha256()
            with real.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            digest = self._files[key] = h.hexdigest()
        return digest


def _short(digest: str) -> str:
    return PREFIX + digest[:DIGITS]


def _weights_path(source: str, loaded: Any) -> Path | None:
    """The file or folder the weights came from, if there is one on this machine (a .yaml has none)."""
    ckpt = getattr(loaded, "ckpt_path", None)  # Ultralytics: the checkpoint it read (a download's local file)
    if isinstance(ckpt, (str, Path)) and Path(ckpt).is_file():
        return Path(ckpt)
    try:
        p = Path(resolve_model_path(source))
    except StageError:
        return None
    if p.suffix in (".yaml", ".yml"):
        return None
    if p.exists():
        return p
    if source.count("/") == 1 and not source.startswith((".", "/")):  # a hub id: its snapshot in the local cache
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, no huggingface_hub: hash the tensors instead
            return None
    return None


def tensors_digest(obj: Any) -> str | None:
    """sha256 (hex) over the named parameters and buffers of the torch modules in `obj` (a module, or a tuple or
    list holding some); None when there is none."""
    try:
        import torch
    except ImportError:
        return None
    modules, todo = [], [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, (tuple, list)):
            todo.extend(x)
        elif isinstance(x, torch.nn.Module):
            modules.append(x)
    if not modules:
        return None
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        named = dict(m.named_parameters(remove_duplicate=False))
        named.update(m.named_buffers(remove_duplicate=False))
        for name in sorted(named):
            t = named[name].detach()
            h.update(f"{i}:{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
            if t.numel():  # its bytes, whatever the dtype (numpy has no bfloat16)
                h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
