"""Finding pipelines by name: inline in the config, then `<name>.yaml` in the pipelines folder(s).
The built-in `frame_info` pipeline needs no file (and no model)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from streamd.config import Config, PipelineConfig
from streamd.errors import ConfigError

BUILTIN = {"frame_info": {"description": "frame size, brightness and timestamps", "stages": [{"type": "frame_info"}]}}
REPO_PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def search_path(cfg: Config) -> list[Path]:
    dirs = [Path(cfg.pipelines_dir)] if cfg.pipelines_dir else [Path("pipelines")]
    if REPO_PIPELINES not in dirs:
        dirs.append(REPO_PIPELINES)
    return dirs


def available(cfg: Config) -> list[str]:
    names = set(cfg.pipelines) | set(BUILTIN)
    for d in search_path(cfg):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def resolve(cfg: Config, name: str, where: str) -> PipelineConfig:
    """The pipeline called `name`; `where` is the config key that named it (for the error message)."""
    if name in cfg.pipelines:
        return cfg.pipelines[name]
    for d in search_path(cfg):
        f = d / f"{name}.yaml"
        if f.is_file():
            try:
                return PipelineConfig.model_validate(yaml.safe_load(f.read_text()) or {})
            except yaml.YAMLError as e:
                raise ConfigError(where, f"pipeline file {f} is not valid YAML: {e}") from None
            except ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                raise ConfigError(where, f"pipeline file {f}: {loc}: {err['msg']}") from None
    if name in BUILTIN:
        return PipelineConfig.model_validate(BUILTIN[name])
    raise ConfigError(where, f"unknown pipeline {name!r} (available: {', '.join(available(cfg))})")
