"""The Serve application: the first causal LM's engine deployment is the HTTP ingress
(:class:`BloomServer`); every other model gets a deployment of its own behind it.

Nothing runs at import: :func:`build_app` returns a bound application that ``serve run`` /
``serve deploy`` (import path ``bloomray.serving.app:build_app``) or ``bloomray serve`` start.
"""

from __future__ import annotations

import json
from typing import Any

from ray import serve

from bloomray.config import ConfigError
from bloomray.serving.engines import classifier_deployment, inspect_model_dir, llm_deployment
from bloomray.serving.ingress import INGRESS_OPTIONS, BloomServer
from bloomray.serving.options import ServeOptions


def build_app(args: dict[str, Any], env_vars: dict[str, str] | None = None) -> serve.Application:
    """Serve application builder.

    Args (a Serve config's ``args`` or the CLI): ``models`` ({name: dir}, or a JSON string of
    it) or ``model_dir``; the rest are :class:`ServeOptions` fields. An ``ingress_deployment``
    dict sets the Serve options of a separate ingress, which only an app without a causal LM
    has. ``env_vars`` (``bloomray serve``: the key file) go to whichever replica answers HTTP;
    under ``serve run`` / a RayService they come from the application's runtime_env.

    Raises:
        ConfigError: no models, a dir that is not a servable model, or an unknown option.
    """
    args = dict(args)
    models = args.pop("models", None)
    if isinstance(models, str):
        models = json.loads(models)
    if models is None and "model_dir" in args:
        models = {"default": args.pop("model_dir")}
    if not models:
        raise ConfigError("no models to serve: give models={name: model_dir} (or --model DIR)")
    ingress_options = dict(args.pop("ingress_deployment", None) or {})
    opts = ServeOptions.from_args(args)
    info, metas, classifiers = {}, {}, {}
    for name, path in models.items():
        meta = inspect_model_dir(name, path)
        info[name] = {"task": meta["task"]}
        if meta["task"] == "classification":
            classifiers[name] = classifier_deployment(name, meta["path"], opts)
        else:
            metas[name] = meta
    lms = list(metas)
    engines = {name: llm_deployment(name, metas[name], opts) for name in lms[1:]}
    bind = {"engines": engines, "classifiers": classifiers, "models": info, "options": args}
    if lms:  # the first causal LM's engine answers HTTP: one hop less for every streamed token
        return llm_deployment(lms[0], metas[lms[0]], opts, BloomServer, bind, env_vars)
    if env_vars:
        actor = dict(ingress_options.get("ray_actor_options") or {})
        actor["runtime_env"] = {**(actor.get("runtime_env") or {}), "env_vars": dict(env_vars)}
        ingress_options["ray_actor_options"] = actor
    ingress = serve.deployment(BloomServer, **{**INGRESS_OPTIONS, **ingress_options})
    return ingress.bind(None, **bind)
