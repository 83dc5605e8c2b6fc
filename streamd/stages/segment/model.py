"""SAM 2.1 models by name, their weights (a local checkpoint, the Hugging Face hub, or random), and the loader the
model manager calls for a `sam2` model (`streamd.models.manager.LOADERS`).

Names: ``sam2.1-hiera-tiny``, ``-small``, ``-base-plus``, ``-large``, or the same with the hub's org
(``facebook/sam2.1-hiera-tiny``). The weights come from `checkpoint`: a local ``.pt`` file; ``hub`` (downloaded from
the Hugging Face hub on first use and cached; offline that fails at once, with the way out in the message); or
``random`` (built from the config with untrained weights: tests and benchmarks, the masks mean nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamd.errors import StageError

# name -> (the sam2 package's config, the hub repository, the checkpoint file in it)
MODELS: dict[str, tuple[str, str, str]] = {
    "sam2.1-hiera-tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt"),
    "sam2.1-hiera-small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "facebook/sam2.1-hiera-small",
                           "sam2.1_hiera_small.pt"),
    "sam2.1-hiera-base-plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "facebook/sam2.1-hiera-base-plus",
                               "sam2.1_hiera_base_plus.pt"),
    "sam2.1-hiera-large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "facebook/sam2.1-hiera-large",
                           "sam2.1_hiera_large.pt"),
}
DEFAULT_MODEL = "sam2.1-hiera-tiny"
INSTALL = 'SAM2_BUILD_CUDA=0 pip install --no-build-isolation "sam2>=1.1,<1.2" (or scripts/bootstrap.sh)'


def model_name(source: str) -> str:
    """The canonical name of `source` (a name, or the hub id facebook/<name>); StageError for anything else."""
    name = source.removeprefix("facebook/")
    if name not in MODELS:
        raise StageError(f"unknown SAM 2 model {source!r}: one of {', '.join(MODELS)} (or facebook/<name>)")
    return name


def checkpoint_path(name: str, checkpoint: str) -> str | None:
    """The checkpoint file to load (None: random weights). `hub` downloads it; offline it fails with a StageError
    that says how to give a local file instead."""
    if checkpoint == "random":
        return None
    if checkpoint != "hub":
        p = Path(checkpoint).expanduser()
        if not p.is_file():
            raise StageError(f"SAM 2 checkpoint {checkpoint!r} (model {name}) is not a file on this machine")
        return str(p)
    _, repo, filename = MODELS[name]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise StageError(f"SAM 2 weights from the hub need huggingface_hub (pip install 'streamd[sam2]'); or set "
                         f"checkpoint: /path/to/{filename}") from None
    try:
        return hf_hub_download(repo_id=repo, filename=filename)
    except Exception as e:  # noqa: BLE001 - offline, a missing repo, a refused request: the same way out
        raise StageError(
            f"cannot get the SAM 2 weights {repo}/{filename} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e)[:300]}). This machine is offline or the hub refused; download {filename} where there is "
            f"internet and set checkpoint: /path/to/{filename} (models.catalog.<name>.options.checkpoint, or the "
            "stage's checkpoint)") from None


def build(name: str, checkpoint: str, device: str, image_size: int | None) -> Any:
    """The sam2 package's video predictor module for `name` (SAM2VideoPredictor: SAM2Base and its post-processing
    settings), in eval mode on `device`. Blocking: run on the device's executor."""
    try:
        from sam2.build_sam import build_sam2_video_predictor
    except ImportError as e:
        raise StageError(f"the segment stage needs the sam2 package ({e}): {INSTALL}") from None
    ckpt = checkpoint_path(name, checkpoint)
    overrides = [f"++model.image_size={image_size}"] if image_size else []
    try:
        model = build_sam2_video_predictor(MODELS[name][0], ckpt_path=ckpt, device=device,
                                           hydra_overrides_extra=overrides)
    except (RuntimeError, KeyError, OSError) as e:  # a checkpoint of another model, a truncated file
        raise StageError(f"cannot build SAM 2 model {name} from {ckpt or 'its config'}: {type(e).__name__}: "
                         f"{str(e)[:300]}") from None
    return model


def model_loader(spec: Any, device: str) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """How the model manager loads a `sam2` model of the catalog: the module on the device's executor, then the
    engine that runs it (`Sam2Engine`: online tracking, objects of many streams in one forward)."""
    from streamd.stages.segment.engine import Sam2Engine

    name = model_name(spec.source)
    opts = spec.typed_options()
    precision = spec.precision
    if precision in ("8bit", "4bit"):  # refused by ModelSpec already; kept for a spec built by hand
        raise StageError(f"precision {precision} is not for a sam2 model")

    def wrap(model: Any) -> Any:
        return Sam2Engine(model, name, device, precision, opts.forward_batch)

    return lambda: build(name, opts.checkpoint, device, opts.image_size), wrap
