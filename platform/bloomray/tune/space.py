"""The search space: config keys -> Ray Tune distributions, checked before any trial runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ray import tune

from bloomray.config import CPU_HEAD_SIZES, Config, ConfigError, check_trainable, config_from_dict, set_key

# Data is prepared once per search and shared by every trial, so it cannot vary per trial;
# the rest describe the search itself or where it runs.
FROZEN_SECTIONS = ("data", "tune", "select", "ray", "output", "scaling")


def check_space(cfg: Config) -> None:
    """Every searched key must exist and accept the values the search may draw.

    Raises:
        ConfigError: frozen section, or a key/value the config rejects (unknown keys are
            named, with the closest valid key, by the config itself).
    """
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: give at least one key to search, e.g. train.lr")
    check_trainable(cfg)
    if "decode_rel" in cfg.tune.objectives:
        check_engine_shape(cfg)
    base = cfg.model_dump(mode="json")
    for key, param in cfg.tune.space.items():
        if key.split(".")[0] in FROZEN_SECTIONS:
            raise ConfigError(
                f"tune.space.{key}: the {key.split('.')[0]} section cannot vary per trial "
                f"(searchable: model, train, deepspeed, prune)"
            )
        probes = (
            [param.low, param.high] if param.type in ("loguniform", "uniform") else list(param.values or [])
        )
        for value in probes:
            trial = copy.deepcopy(base)
            set_key(trial, key, value)
            try:
                check_trainable(config_from_dict(trial))
            except ConfigError as exc:
                raise ConfigError(
                    f"tune.space.{key}: value {value!r} is not a valid config:\n{exc}"
                ) from None


def param_space(cfg: Config) -> dict[str, Any]:
    """Tune's ``param_space``: one entry per searched key (dots kept in the names)."""
    space: dict[str, Any] = {}
    for key, p in cfg.tune.space.items():
        if p.type == "loguniform":
            space[key] = tune.loguniform(p.low, p.high)
        elif p.type == "uniform":
            space[key] = tune.uniform(p.low, p.high)
        elif p.type == "choice":
            space[key] = tune.choice(p.values)
        else:
            space[key] = tune.grid_search(p.values)
    return space


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config with one trial's sampled values applied."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        set_key(raw, key, value)
    return config_from_dict(raw)


def check_engine_shape(cfg: Config) -> None:
    """``decode_rel`` runs the exports in vLLM: a causal LM, with a head size vLLM's CPU attention
    runs when the search is on CPUs (a hub-named model is checked when its trial starts).

    Raises:
        ConfigError: a classifier, or a CPU search on a shape vLLM cannot run.
    """
    if cfg.task != "causal_lm":
        raise ConfigError(
            f"tune.objectives decode_rel measures generation in vLLM: task={cfg.task} does not generate; "
            "use latency_ms"
        )
    if cfg.scaling.use_gpu:
        return
    from bloomray.model.build import PRESETS

    shape: dict[str, Any] = PRESETS[cfg.model.preset]
    if cfg.model.path:
        local = Path(cfg.model.path).expanduser() / "config.json"
        if not local.is_file():
            return
        shape = json.loads(local.read_text())
    heads = shape.get("n_head") or shape.get("num_attention_heads") or 1
    head = (shape.get("hidden_size") or shape.get("n_embed") or 0) // heads
    if head not in CPU_HEAD_SIZES:
        raise ConfigError(
            f"tune.objectives decode_rel runs the exports in vLLM, whose CPU attention takes head sizes "
            f"{', '.join(map(str, CPU_HEAD_SIZES))}; this model's is {head} (hidden_size / n_head): "
            "search a shape with one of them (e.g. model.preset=small), or use latency_ms"
        )
