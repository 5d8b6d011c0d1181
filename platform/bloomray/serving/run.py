"""``bloomray serve``: start the Serve app on a local Ray or attach it to a cluster."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from bloomray.config import ConfigError
from bloomray.serving.auth import ENV_FILE, ENV_KEYS, ensure_key_file

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "serve" / "config.yaml"


def read_serve_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(http_options, app args, deployment options) of the first application in a Serve config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"serve config not found: {path} (default: {DEFAULT_CONFIG})")
    cfg = yaml.safe_load(p.read_text()) or {}
    apps = cfg.get("applications") or []
    if not apps:
        raise ConfigError(f"{path}: no applications section")
    deployment = dict((apps[0].get("deployments") or [{}])[0])
    deployment.pop("name", None)
    return dict(cfg.get("http_options") or {}), dict(apps[0].get("args") or {}), deployment


def key_env() -> dict[str, str]:
    """The API-key env vars the replicas get; creates ~/.bloomray/api_keys if none is set."""
    env = {k: os.environ[k] for k in (ENV_KEYS, ENV_FILE) if os.environ.get(k)}
    if not env:
        path = ensure_key_file()
        env[ENV_FILE] = str(path)
        print(f"[serve] no API key configured: using the key in {path} (send 'Authorization: Bearer <key>')")
    return env


def start_server(
    models: dict[str, str] | None,
    config: str | Path = DEFAULT_CONFIG,
    port: int | None = None,
    address: str | None = None,
    overrides: dict[str, Any] | None = None,
    deployment_overrides: dict[str, Any] | None = None,
    name: str = "bloomray",
    route_prefix: str = "/",
    host: str | None = None,
) -> str:
    """Deploy the app and return its base URL (Serve keeps running in the Ray cluster)."""
    from ray import serve

    from bloomray.raycluster import init_ray
    from bloomray.serving.app import BloomServer

    http, args, deployment = read_serve_config(config)
    if models:
        args["models"] = models
    for name_, path in (args.get("models") or {}).items():
        if not Path(path).exists() and not address:
            raise ConfigError(
                f"model {name_!r}: {path} does not exist; pass --model DIR (an export or tune winner/)"
            )
    args.update(overrides or {})
    deployment.update(deployment_overrides or {})
    actor = dict(deployment.pop("ray_actor_options", {}) or {})
    actor["runtime_env"] = {"env_vars": {**key_env(), "TOKENIZERS_PARALLELISM": "false"}}
    http_port = port or int(http.get("port", 8000))
    init_ray(address)
    serve.start(
        http_options={
            "host": host or http.get("host", "127.0.0.1"),
            "port": http_port,
            "request_timeout_s": http.get("request_timeout_s"),
        }
    )
    app = BloomServer.options(ray_actor_options=actor, **deployment).bind(models=args.pop("models"), **args)
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    return f"http://127.0.0.1:{http_port}{route_prefix.rstrip('/')}"


def serve_forever(url: str) -> None:
    """Block until Ctrl-C, then shut Serve down cleanly."""
    from ray import serve

    print(f"[serve] listening on {url}  (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] shutting down")
        serve.shutdown()
