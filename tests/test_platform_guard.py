"""The package folder `platform/` must never shadow the stdlib module `platform`."""

import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_platform_init():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert not list(ROOT.glob("platform.py"))


def test_stdlib_platform_works_from_repo_root():
    code = "import platform, uuid; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    system, where = out.stdout.split()
    assert system == platform.system()
    assert not where.startswith(str(ROOT / "platform"))
