"""Open-vocabulary models (YOLO-World, YOLOE): a vocabulary, a list of phrases, becomes the model's classes.

Each phrase's text embedding (the output of the model's own text encoder) comes from a `text_embeddings` file
first: a `.pt` file holding a dict phrase -> 1-D tensor, written once where the encoder can be downloaded
(`export_text_embeddings`, or `python -m streamd.stages.open_vocab`) and used offline / air-gapped. A phrase that
is not in a file goes to the text encoder, loaded on first use and kept. A vocabulary's class embeddings are
cached, so switching back to an earlier vocabulary encodes nothing; a vocabulary that cannot be set is remembered
and fails again at once. Everything but `export_text_embeddings` runs in the device's executor thread.

torch and ultralytics are imported inside the functions: this module is imported with the detection stage's
config, which `streamd validate` reads without loading models.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from streamd.errors import StageError

MAX_CACHED_VOCABULARIES = 256
_ENCODE_BATCH = 80  # phrases per text-encoder call (as Ultralytics does)
_SWITCHING: tuple[str, ...] = ()  # OpenVocabulary.current while a switch is under way (no vocabulary is empty)


class VocabularyError(StageError):
    """A vocabulary cannot be set: a phrase has no embedding and the text encoder is unavailable, a phrase is
    invalid, or the model takes no vocabulary. Fails the streams that use that vocabulary."""


def open_vocabulary_kind(inner: Any) -> str | None:
    """'world' (YOLO-World), 'yoloe' (YOLOE) or None (a closed-set or exported model) for a loaded nn.Module."""
    try:
        from ultralytics.nn.tasks import WorldModel, YOLOEModel
    except ImportError:  # an Ultralytics without open-vocabulary models
        return None
    if isinstance(inner, YOLOEModel):
        return "yoloe"
    if isinstance(inner, WorldModel):
        return "world"
    return None


def load_text_embeddings(path: str | Path) -> dict[str, Any]:
    """Read and check a text_embeddings file: a dict of non-empty phrase -> finite 1-D float tensor, one size."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise StageError(f"text_embeddings file {str(p)!r} does not exist")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise StageError(f"text_embeddings file {str(p)!r} cannot be read as a torch .pt file: {e}") from None
    if not isinstance(data, dict) or not data:
        raise StageError(f"text_embeddings file {str(p)!r} must hold a non-empty dict phrase -> tensor, "
                         f"not {type(data).__name__}")
    out: dict[str, Any] = {}
    dims: set[int] = set()
    for phrase, vec in data.items():
        if not isinstance(phrase, str) or not phrase.strip():
            raise StageError(f"text_embeddings file {str(p)!r}: key {phrase!r} is not a non-empty phrase")
        if not isinstance(vec, torch.Tensor) or vec.squeeze().ndim != 1 or not vec.is_floating_point():
            raise StageError(f"text_embeddings file {str(p)!r}: {phrase!r} is not a 1-D float tensor")
        vec = vec.detach().squeeze().float()
        if not torch.isfinite(vec).all():
            raise StageError(f"text_embeddings file {str(p)!r}: {phrase!r} has non-finite values")
        dims.add(vec.numel())
        out[phrase] = vec
    if len(dims) != 1:
        raise StageError(f"text_embeddings file {str(p)!r}: embeddings of different sizes {sorted(dims)}")
    return out


class TextEncoder:
    """The model's own text encoder (CLIP for YOLO-World, MobileCLIP for YOLOE), loaded on first use and kept."""

    def __init__(self, variant: str, device: str):
        self.variant = variant
        self.device = "cpu" if device == "auto" else device
        self._model: Any = None
        self.loads = 0

    def encode(self, phrases: list[str]) -> dict[str, Any]:
        """phrase -> 1-D float32 CPU tensor (the encoder's normalised output)."""
        import torch
        from ultralytics.nn.text_model import build_text_model

        if self._model is None:
            self._model = build_text_model(self.variant, device=self.device)
            self.loads += 1
        tokens = self._model.tokenize(list(phrases))
        with torch.no_grad():
            feats = torch.cat([self._model.encode_text(t) for t in tokens.split(_ENCODE_BATCH)])
        return {p: f.detach().float().cpu() for p, f in zip(phrases, feats)}


def encoder_for(inner: Any, device: str) -> TextEncoder:
    kind = open_vocabulary_kind(inner)
    if kind is None:
        raise StageError(f"{type(inner).__name__} is not an open-vocabulary model (YOLO-World / YOLOE)")
    # the variants Ultralytics' own WorldModel.get_text_pe / YOLOEModel.get_text_pe use
    variant = "clip:ViT-B/32" if kind == "world" else getattr(inner, "text_model", "mobileclip:blt")
    return TextEncoder(variant, device)


class OpenVocabulary:
    """The vocabulary of one loaded YOLO-World / YOLOE model (an Ultralytics `Model`), shared by every stage that
    uses it. Counters (`encoder_calls`, `vocabulary_builds`, `cache_hits`) say what a switch cost."""

    def __init__(self, yolo: Any, name: str, device: str):
        inner = yolo.model
        kind = open_vocabulary_kind(inner)
        assert kind is not None, name
        self.yolo, self.name, self.kind = yolo, name, kind
        head = inner.model[-1]
        self.dim = int(inner.txt_feats.shape[-1]) if kind == "world" else int(head.embed)
        self.encoder = encoder_for(inner, device)
        self.phrases: dict[str, Any] = {}  # phrase -> raw text embedding (from files, then the encoder)
        self._phrase_file: dict[str, str] = {}
        self.files: list[str] = []
        self._cache: OrderedDict[tuple[str, ...], Any] = OrderedDict()  # vocabulary -> class embeddings
        self.failed: dict[tuple[str, ...], VocabularyError] = {}
        names = inner.names.values() if isinstance(inner.names, dict) else inner.names
        feats = getattr(inner, "txt_feats" if kind == "world" else "pe", None)
        self._original = (tuple(str(n) for n in names), feats)  # what the model came with
        self.current: tuple[str, ...] | None = None  # None: the original classes
        self.encoder_calls = 0  # text-encoder invocations (attempts, failed ones included)
        self.vocabulary_builds = 0  # vocabularies whose class embeddings were assembled
        self.cache_hits = 0  # switches to a vocabulary whose class embeddings were cached

    # -- phrases ----------------------------------------------------------------------------------------------
    def add_file(self, path: str) -> int:
        """Load a text_embeddings file (StageError when it is bad or does not fit this model). Returns phrases."""
        import torch

        emb = load_text_embeddings(path)
        dim = next(iter(emb.values())).numel()
        if dim != self.dim:
            raise StageError(f"text_embeddings file {path!r} holds {dim}-dim embeddings; {self.name!r} "
                             f"({self.kind}) needs {self.dim}-dim ones from its text encoder {self.encoder.variant}")
        for phrase, vec in emb.items():
            old = self.phrases.get(phrase)
            if old is not None and not torch.allclose(old, vec, atol=1e-5):
                raise StageError(f"text_embeddings file {path!r} and {self._phrase_file.get(phrase, 'the encoder')!r} "
                                 f"disagree on the embedding of {phrase!r}")
        self.phrases.update(emb)
        self._phrase_file.update(dict.fromkeys(emb, path))
        self.failed.clear()  # a vocabulary that lacked a phrase may be whole now
        if path not in self.files:
            self.files.append(path)
        return len(emb)

    # -- switching --------------------------------------------------------------------------------------------
    def set(self, vocab: tuple[str, ...] | None) -> None:
        """Make `vocab` (None: the model's own classes) the model's classes; VocabularyError when it cannot."""
        if vocab == self.current:
            return
        if vocab is None:
            names, feats = self._original
            self._apply(names, feats)
            self.current = None
            return
        err = self.failed.get(vocab)
        if err is not None:
            raise err
        try:
            feats = self._class_embeddings(vocab)
        except VocabularyError as e:
            self.failed[vocab] = e
            raise
        self.current = _SWITCHING  # a failure half-way leaves the model unknown: the next set() re-applies
        try:
            self._apply(vocab, feats)
        except (AssertionError, ValueError, TypeError, IndexError) as e:  # Ultralytics' own checks of names
            self.failed[vocab] = VocabularyError(
                f"cannot set the vocabulary {list(vocab)} of {self.name!r}: {type(e).__name__}: {e}")
            raise self.failed[vocab] from None
        self.current = vocab

    def _class_embeddings(self, vocab: tuple[str, ...]) -> Any:
        import torch

        cached = self._cache.get(vocab)
        if cached is not None:
            self._cache.move_to_end(vocab)
            self.cache_hits += 1
            return cached
        bad = [p for p in vocab if not isinstance(p, str) or not p.strip()]
        if bad:
            raise VocabularyError(f"vocabulary {list(vocab)} of {self.name!r}: phrases must be non-empty text, "
                                  f"not {bad}")
        missing = [p for p in dict.fromkeys(vocab) if p not in self.phrases]
        if missing:
            self.phrases.update(self._encode(vocab, missing))
        raw = torch.stack([self.phrases[p] for p in vocab])[None]  # (1, n, dim)
        if self.kind == "yoloe":  # YOLOE keeps the text embeddings after its own text head (reprta), in `pe`
            head = self.yolo.model.model[-1]
            with torch.no_grad():
                raw = head.get_tpe(raw.to(next(head.parameters()).device)).detach()
        self.vocabulary_builds += 1
        self._cache[vocab] = raw
        while len(self._cache) > MAX_CACHED_VOCABULARIES:
            self._cache.popitem(last=False)
        return raw

    def _encode(self, vocab: tuple[str, ...], missing: list[str]) -> dict[str, Any]:
        self.encoder_calls += 1
        try:
            out = self.encoder.encode(missing)
        except Exception as e:  # noqa: BLE001 - import, download, weights, tokenizer: all mean "cannot encode"
            where = ", ".join(self.files) if self.files else "no text_embeddings file is configured"
            raise VocabularyError(
                f"cannot set the vocabulary {list(vocab)} of {self.name!r}: no text embedding for {missing} "
                f"({where}) and its text encoder ({self.encoder.variant}) could not be loaded or run "
                f"({type(e).__name__}: {e}); its weights are downloaded on first use and this machine may be "
                "offline. Precompute the phrases where it is online with "
                "streamd.stages.detect.export_text_embeddings and set the stage's text_embeddings"
            ) from None
        dims = {v.numel() for v in out.values()}
        if dims != {self.dim}:
            raise VocabularyError(f"the text encoder {self.encoder.variant} gave {sorted(dims)}-dim embeddings; "
                                  f"{self.name!r} needs {self.dim}")
        return out

    def _apply(self, names: tuple[str, ...], feats: Any) -> None:
        """Set names, class embeddings and the head's class count on the model and on its predictor's copy (the
        predictor deep-copies the model once; it is kept, so a switch rebuilds nothing)."""
        yolo = self.yolo
        targets = [yolo.model]
        pred = getattr(yolo, "predictor", None)
        copy = getattr(getattr(pred, "model", None), "model", None) if pred is not None else None
        if pred is not None:
            if type(copy) is type(yolo.model):
                targets.append(copy)
            else:  # a predictor laid out otherwise (another Ultralytics version): let Ultralytics rebuild it
                yolo.predictor = pred = None
        for m in targets:
            f = None if feats is None else feats.to(next(m.parameters()).device)
            if self.kind == "world":
                if f is not None:
                    m.txt_feats = f
                m.model[-1].nc = len(names)
                m.names = list(names)
            elif f is not None:
                m.set_classes(list(names), f)  # YOLOEModel.set_classes: checks the names, sets pe, names and nc
            else:  # back to a YOLOE built without embeddings (random weights from yaml)
                if hasattr(m, "pe"):
                    del m.pe
                m.names = dict(enumerate(names))
                m.model[-1].nc = len(names)
        if pred is not None:
            pred.model.names = dict(enumerate(names))  # AutoBackend copies the names; segment NMS counts them


# -- precomputing embeddings (online) ---------------------------------------------------------------------------
def export_text_embeddings(model: Any, phrases: Iterable[str], path: str | Path, device: str = "cpu") -> Path:
    """Encode `phrases` with `model`'s own text encoder and save them as a text_embeddings file.

    `model` is a model name or path that Ultralytics loads (`yolov8s-worldv2.pt`, `yoloe-11s-seg.pt`) or a loaded
    Ultralytics model. Run it where the encoder's weights can be downloaded (or are cached); phrases already in
    `path` are kept (new ones replace old ones of the same phrase). Returns the path."""
    import torch

    if isinstance(model, (str, Path)):
        from streamd.models import load_yolo

        model = load_yolo(str(model))
    from ultralytics.engine.model import Model

    encoder = encoder_for(model.model if isinstance(model, Model) else model, device)
    wanted = list(dict.fromkeys(phrases))
    if not wanted or not all(isinstance(p, str) and p.strip() for p in wanted):
        raise StageError(f"export_text_embeddings needs non-empty text phrases, not {wanted!r}")
    try:
        new = encoder.encode(wanted)
    except Exception as e:  # noqa: BLE001 - import, download, weights: one clear error
        raise StageError(f"the text encoder {encoder.variant} could not be loaded or run "
                         f"({type(e).__name__}: {e}); export_text_embeddings needs its weights (online once)") from None
    p = Path(path)
    old = load_text_embeddings(p) if p.exists() else {}
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**old, **new}, p)
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m streamd.stages.open_vocab",
                                 description="Precompute text embeddings for an open-vocabulary detection stage's "
                                             "text_embeddings option (run where the text encoder can be downloaded)")
    ap.add_argument("--model", required=True, help="e.g. yolov8s-worldv2.pt or yoloe-11s-seg.pt")
    ap.add_argument("--out", required=True, help="the .pt file to write (phrases already in it are kept)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("phrases", nargs="+", help="class phrases, e.g. 'person' 'forklift' 'person in hi-vis'")
    a = ap.parse_args(argv)
    try:
        out = export_text_embeddings(a.model, a.phrases, a.out, a.device)
    except StageError as e:
        print(f"error: {e}")
        return 1
    print(f"wrote {len(load_text_embeddings(out))} phrases to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
