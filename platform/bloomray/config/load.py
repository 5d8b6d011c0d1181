"""Reading a run configuration: YAML presets and files, ``--set key.sub=value`` overrides,
validation into :class:`~bloomray.config.schema.Config` with errors phrased for the person who
wrote the config, and writing the resolved config back (what ``--resume`` reloads).
"""

from __future__ import annotations

import difflib
import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bloomray.config.schema import Config, ConfigError
from bloomray.files import atomic_write_text

# The presets (``tiny-cpu``, ``bloom-560m-zero2``, ...) are package data in bloomray/presets/,
# read through importlib.resources so they are there in a wheel as in a checkout.
_PRESETS: Traversable = files("bloomray") / "presets"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (a path or a preset name, see :func:`preset_names`) and apply overrides.

    Args:
        path: YAML file, or the name of a packaged preset (``tiny-cpu``).
            None starts from the defaults.
        overrides: ``key.sub=value`` strings; values are parsed as YAML scalars/lists.

    Returns:
        The validated config.

    Raises:
        ConfigError: missing file, bad YAML, unknown key, wrong type or bad combination.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(resolve_preset(path))
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw)


def preset_names() -> list[str]:
    """The names of the packaged presets, sorted (``["bloom-1b7-zero2", ..., "tiny-cpu", ...]``)."""
    return sorted(x.name.removesuffix(".yaml") for x in _PRESETS.iterdir() if x.name.endswith(".yaml"))


def resolve_preset(path: str | os.PathLike[str]) -> Path | Traversable:
    """The YAML file for a path or a preset name; ConfigError if there is none.

    An existing file wins; otherwise the name (``tiny-cpu``, or a path's ``tiny-cpu.yaml``)
    picks a packaged preset, returned as an importlib.resources Traversable (a Path in a
    regular install): read it with ``.read_text()``.
    """
    p = Path(path)
    if p.is_file():
        return p
    candidate = _PRESETS / f"{p.name.removesuffix('.yaml')}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"config file not found: {path}. Give a YAML path or a preset: {', '.join(preset_names())}"
    )


def _read_yaml(path: Path | Traversable) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (train:, model:, ...)")
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict in place."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    set_key(raw, key, parsed)


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` of a nested dict in place, creating sections on the way."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a nested dict into a Config, translating pydantic errors into ConfigError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(err["loc"]))
        elif not loc:  # a model-level check (check_combinations)
            lines.append(err["msg"].removeprefix("Value error, "))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg} (got {err.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _unknown_key_message(loc: tuple[Any, ...]) -> str:
    section: type[BaseModel] = Config
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            break
        if issubclass(field.annotation, BaseModel):
            section = field.annotation
    allowed = list(section.model_fields)
    key = ".".join(str(p) for p in loc)
    hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    guess = f" Did you mean '{'.'.join([*map(str, loc[:-1]), hint[0]])}'?" if hint else ""
    return f"unknown config key '{key}'.{guess} Allowed here: {', '.join(allowed)}"


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (what a resume reloads), atomically."""
    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
