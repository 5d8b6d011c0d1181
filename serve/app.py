"""Import path for Ray Serve's CLI; nothing runs at import.

serve run serve.app:build_app model_dir=outputs/tune/winner     # from the repo root
serve deploy serve/config.yaml                                   # on a cluster (see README)
"""

from bloomray.serving.app import BloomServer, build_app

__all__ = ["BloomServer", "build_app"]
