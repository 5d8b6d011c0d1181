"""A non-editable install works: the presets and the Serve config are package data.

The repo's sources (pyproject.toml, README.md, platform/) are copied to a temp dir and
installed from there with pip (no build isolation, no index: offline), so the build leaves
nothing (build/, *.egg-info) in the checkout. The installed copy is then used from a folder
outside the repo, with the venv supplying the dependencies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGED_SERVE_CONFIG = ROOT / "platform" / "bloomray" / "serving" / "config.yaml"

USE_INSTALLED = """
import json, sys
import yaml
import bloomray
from bloomray.config import load_config, preset_names, resolve_preset
from bloomray.serving.run import DEFAULT_CONFIG, read_serve_config

cfg = load_config("tiny-cpu", ["train.max_steps=3"])
serve = yaml.safe_load(DEFAULT_CONFIG.read_text())
http, args = read_serve_config(DEFAULT_CONFIG)
print(json.dumps({
    "file": bloomray.__file__,
    "presets": preset_names(),
    "tiny_cpu": str(resolve_preset("tiny-cpu")),
    "max_steps": cfg.train.max_steps,
    "import_path": serve["applications"][0]["import_path"],
    "port": http["port"],
    "models": args["models"],
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """site dir holding a wheel install of bloomray built from a copy of the repo."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "platform",
        src / "platform",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"),
    )
    site = tmp / "site"
    before = _top_entries()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    out = subprocess.run(
        [*cmd, "--target", str(site), str(src)], capture_output=True, text=True, timeout=180, cwd=tmp
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert _top_entries() == before  # no build/ or *.egg-info left in the checkout
    return site


def _top_entries() -> set[str]:
    return {p.name for p in ROOT.iterdir()} | {f"platform/{p.name}" for p in (ROOT / "platform").iterdir()}


def test_wheel_holds_the_presets_and_the_serve_config(installed: Path):
    pkg = installed / "bloomray"
    repo_presets = sorted(p.name for p in (ROOT / "platform" / "bloomray" / "presets").glob("*.yaml"))
    assert repo_presets and sorted(p.name for p in (pkg / "presets").glob("*.yaml")) == repo_presets
    assert (pkg / "serving" / "config.yaml").read_text() == PACKAGED_SERVE_CONFIG.read_text()
    assert not (pkg / "serving" / "config.yaml").is_symlink()


def test_installed_package_loads_presets_and_serve_config_outside_the_repo(installed: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run(
        [sys.executable, "-c", USE_INSTALLED],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(installed), got["file"]  # not the checkout
    assert Path(got["tiny_cpu"]).is_relative_to(installed)
    assert {"tiny-cpu", "classify-tiny-cpu", "tune-tiny-cpu", "bloom-560m-zero2"} <= set(got["presets"])
    assert got["max_steps"] == 3
    assert got["import_path"] == "bloomray.serving.app:build_app"
    assert got["port"] == 8000 and "default" in got["models"]


def test_installed_cli_prints_the_serve_config(installed: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    code = "import sys; from bloomray.cli import main; sys.exit(main(['serve', '--print-config']))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == PACKAGED_SERVE_CONFIG.read_text()
    assert yaml.safe_load(out.stdout)["applications"][0]["import_path"] == "bloomray.serving.app:build_app"


def test_repo_serve_config_is_the_packaged_file():
    # `serve deploy serve/config.yaml` from a checkout reads the one packaged file (a link, no copy).
    link = ROOT / "serve" / "config.yaml"
    assert link.is_symlink() and link.resolve() == PACKAGED_SERVE_CONFIG.resolve()
    assert not (ROOT / "jobs" / "configs").exists()
