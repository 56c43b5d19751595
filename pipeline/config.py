"""Typed pipeline configuration: YAML profiles in configs/ plus dotted overrides.

Each stage module owns its own ``Config`` dataclass; this module composes them into one
``PipelineConfig`` and applies a profile and ``section.key=value`` overrides on top of
the dataclass defaults. An unknown key anywhere is an error that names it.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import UserError

from pipeline.retrieval.settings import RetrievalSettings
from pipeline.stages import REGISTRY

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(UserError):
    """A profile or override that cannot be applied; the message names the key."""


@dataclass
class Paths:
    docs: str = "data/docs"  # folder of documents the index is built from
    qa: str = "data/qa"  # folder with train.jsonl and eval.jsonl
    artifacts: str = "artifacts"  # where every stage publishes its output
    reports: str = "reports"  # human-readable reports and plots

    def resolve(self, name: str) -> Path:
        path = Path(getattr(self, name))
        return path if path.is_absolute() else REPO_ROOT / path


def _stage_fields():
    return [
        (name, stage.Config, field(default_factory=stage.Config))
        for name, stage in REGISTRY.items()
    ]


PipelineConfig = dataclasses.make_dataclass(
    "PipelineConfig",
    [("profile", str, field(default="quick")), ("seed", int, field(default=0)),
     ("paths", Paths, field(default_factory=Paths)),
     ("retrieval", RetrievalSettings, field(default_factory=RetrievalSettings))] + _stage_fields(),
)
PipelineConfig.__doc__ = "Every setting of the pipeline: one section per stage."


def _coerce(value, annotation, key: str):
    """Check ``value`` against a field's annotation; ints widen to floats."""
    origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if origin is typing.Union or str(origin) == "types.UnionType":
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {annotation}")
    if annotation in (int, float, str, bool) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _apply(obj, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section (mapping), got {value!r}")
            _apply(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


def parse_override(text: str) -> dict:
    """``sft.lora.r=8`` -> ``{"sft": {"lora": {"r": 8}}}`` with a YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    tree: dict = {}
    node = tree
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def load_config(profile: str = "quick", overrides: list[str] | tuple = ()) -> "PipelineConfig":
    """Defaults, then ``configs/<profile>.yaml``, then each override in order."""
    path = CONFIG_DIR / f"{profile}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no profile '{profile}' ({path} missing); known profiles: {known}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    cfg = PipelineConfig()
    cfg.profile = profile
    _apply(cfg, data)
    for text in overrides:
        _apply(cfg, parse_override(text))
    return cfg


def section(cfg, name: str) -> dict:
    return dataclasses.asdict(getattr(cfg, name))
