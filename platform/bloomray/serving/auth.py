"""API keys: from ``BLOOMRAY_API_KEYS`` (comma-separated) or a file named by
``BLOOMRAY_API_KEYS_FILE`` (one key per line) — never from command-line arguments, which
end up in shell history and process lists. Compared in constant time."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

ENV_KEYS = "BLOOMRAY_API_KEYS"
ENV_FILE = "BLOOMRAY_API_KEYS_FILE"
DEFAULT_KEY_FILE = Path.home() / ".bloomray" / "api_keys"


def load_keys() -> list[str]:
    """Configured keys (may be empty: the server then refuses to start)."""
    keys = [k.strip() for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]
    path = os.environ.get(ENV_FILE)
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{ENV_FILE}={path} does not exist; create it with one API key per line")
        keys += [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return keys


def check_key(header: str | None, keys: list[str]) -> bool:
    """True when ``Authorization: Bearer <key>`` carries one of ``keys`` (constant time)."""
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer ") :].strip().encode()
    ok = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(given, key.encode())
    return ok


def ensure_key_file(path: Path = DEFAULT_KEY_FILE) -> Path:
    """Create a key file with one random key (mode 0600) if there is none; return its path."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32) + "\n")
        path.chmod(0o600)
    return path
