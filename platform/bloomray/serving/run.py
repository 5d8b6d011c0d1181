"""``bloomray serve``: start the Serve app on a local Ray or attach it to a cluster."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from bloomray.config import ConfigError
from bloomray.serving.auth import (
    DEFAULT_KEY_FILE,
    ENV_FILE,
    ENV_KEYS,
    ensure_key_file,
    load_keys,
    write_key_file,
)

# The shipped Serve config, package data (bloomray/serving/config.yaml); `serve deploy` needs
# a file: `bloomray serve --print-config > serve.yaml` (in a checkout, serve/config.yaml links here).
DEFAULT_CONFIG: Traversable = files("bloomray.serving") / "config.yaml"


def read_serve_config(path: str | os.PathLike[str] | Traversable) -> tuple[dict[str, Any], dict[str, Any]]:
    """(http_options, app args) of the first application in a Serve config."""
    p = Path(path) if isinstance(path, str | os.PathLike) else path
    if not p.is_file():
        raise ConfigError(f"serve config not found: {path} (default: {DEFAULT_CONFIG})")
    cfg = yaml.safe_load(p.read_text()) or {}
    apps = cfg.get("applications") or []
    if not apps:
        raise ConfigError(f"{path}: no applications section")
    return dict(cfg.get("http_options") or {}), dict(apps[0].get("args") or {})


def key_file() -> str:
    """The API-key file the ingress reads; keys themselves never travel in a runtime_env.

    ``BLOOMRAY_API_KEYS_FILE`` is used as is; keys in ``BLOOMRAY_API_KEYS`` are written to a
    private (0600) file; with neither, ``~/.bloomray/api_keys`` is created with a random key.

    Raises:
        ConfigError: ``BLOOMRAY_API_KEYS_FILE`` names a file that does not exist.
    """
    if os.environ.get(ENV_FILE):
        load_keys()  # a missing file is a ConfigError here, before any replica fails on it
        return os.environ[ENV_FILE]
    keys = [k.strip() for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]
    if keys:
        digest = hashlib.sha256(",".join(keys).encode()).hexdigest()[:12]
        return str(write_key_file(DEFAULT_KEY_FILE.parent / f"keys-{digest}", keys))
    path = ensure_key_file()
    print(f"[serve] no API key configured: using the key in {path} (send 'Authorization: Bearer <key>')")
    return str(path)


def start_server(
    models: dict[str, str] | None,
    config: str | os.PathLike[str] | Traversable = DEFAULT_CONFIG,
    port: int | None = None,
    address: str | None = None,
    overrides: dict[str, Any] | None = None,
    name: str = "bloomray",
    route_prefix: str = "/",
    host: str | None = None,
) -> str:
    """Deploy the app, wait until every model deployment is up, and return its base URL.

    Raises:
        ConfigError: a bad model dir or option (before anything starts).
        RuntimeError: a deployment failed to start (Serve's message names the replica error).
    """
    from ray import serve

    from bloomray.raycluster import init_ray
    from bloomray.serving.app import build_app

    http, args = read_serve_config(config)
    if models:
        args["models"] = models
    args.update(overrides or {})
    env = {ENV_FILE: key_file(), "TOKENIZERS_PARALLELISM": "false"}
    init_ray(address)
    app = build_app(args, env_vars=env)  # checks every model dir first
    http_port = port or int(http.get("port", 8000))
    serve.start(
        http_options={
            "host": host or "127.0.0.1",
            "port": http_port,
            "request_timeout_s": http.get("request_timeout_s"),
        }
    )
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    return f"http://127.0.0.1:{http_port}{route_prefix.rstrip('/')}"


def serve_forever(url: str) -> int:
    """Block until SIGINT/SIGTERM, then shut Serve and Ray down cleanly; returns the exit code."""
    import ray
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"[serve] listening on {url}  (Ctrl-C to stop)", flush=True)
    stop.wait()
    print("[serve] shutting down", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0
