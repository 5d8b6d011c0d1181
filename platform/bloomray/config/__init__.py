"""Typed run configuration: YAML presets, ``--set key.sub=value`` overrides, validation.

All checks live here so the CLI, the job scripts and the tests agree. Every error is a
:class:`ConfigError` that names the key, what was wrong and what is allowed, and it is
raised before Ray starts. ``schema.py`` holds the sections and their checks, ``load.py``
reads presets, files and overrides into them; the names below are the public API.
"""

from bloomray.config.load import (
    apply_override,
    config_from_dict,
    dump_config,
    load_config,
    preset_names,
    resolve_preset,
    set_key,
)
from bloomray.config.schema import (
    CPU_HEAD_SIZES,
    OBJECTIVES,
    ONESHOT_METHODS,
    PRUNABLE_MODULES,
    Config,
    ConfigError,
    PruneConfig,
    check_trainable,
)

__all__ = [
    "CPU_HEAD_SIZES",
    "OBJECTIVES",
    "ONESHOT_METHODS",
    "PRUNABLE_MODULES",
    "Config",
    "ConfigError",
    "PruneConfig",
    "apply_override",
    "check_trainable",
    "config_from_dict",
    "dump_config",
    "load_config",
    "preset_names",
    "resolve_preset",
    "set_key",
]
