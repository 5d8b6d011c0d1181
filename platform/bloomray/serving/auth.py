"""API keys: from a file named by ``BLOOMRAY_API_KEYS_FILE`` (one key per line; ``#`` comments
and blank lines ignored) or ``BLOOMRAY_API_KEYS`` (comma-separated, read by the driver, which
writes them to a private file for the replicas) — never from command-line arguments or a
deployment's runtime_env, which end up in shell history, process lists and the dashboard.
Compared in constant time.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from bloomray.config import ConfigError
from bloomray.files import atomic_write_text

ENV_KEYS = "BLOOMRAY_API_KEYS"
ENV_FILE = "BLOOMRAY_API_KEYS_FILE"
DEFAULT_KEY_FILE = Path.home() / ".bloomray" / "api_keys"


def load_keys() -> list[str]:
    """Configured keys (may be empty: the server then refuses to start).

    Raises:
        ConfigError: ``BLOOMRAY_API_KEYS_FILE`` names a file that does not exist.
    """
    keys = [k.strip() for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]
    path = os.environ.get(ENV_FILE)
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise ConfigError(f"{ENV_FILE}={path} does not exist; create it with one API key per line")
        for line in p.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return keys


def check_key(header: str | None, keys: list[str]) -> bool:
    """True when ``Authorization: Bearer <key>`` carries one of ``keys`` (constant time).

    The scheme name is matched case-insensitively (RFC 7235).
    """
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return False
    given = value.strip().encode()
    ok = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(given, key.encode())
    return ok


def write_key_file(path: Path, keys: list[str]) -> Path:
    """Write ``keys`` to ``path`` atomically with mode 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return atomic_write_text(path, "".join(k + "\n" for k in keys), mode=0o600)


def ensure_key_file(path: Path = DEFAULT_KEY_FILE) -> Path:
    """Create a key file with one random key (mode 0600) if there is none; return its path."""
    if not path.exists():
        write_key_file(path, [secrets.token_urlsafe(32)])
    return path
