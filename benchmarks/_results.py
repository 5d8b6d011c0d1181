"""Shared by the benchmark scripts: the machine line of a section, and appending to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def machine_line() -> str:
    """``date: machine, CPUs, torch, commit`` for a section heading."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "n/a"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, commit {commit}"


def append_results(section: str) -> None:
    """Append a section to RESULTS.md (created with its header if missing)."""
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by the scripts in benchmarks/ (newest last). Each section's "
            "ratios are measured in one run on one box; compare ratios, not absolute numbers across boxes.\n"
        )
    with RESULTS.open("a") as f:
        f.write("\n" + section + "\n")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table whose columns are the keys of the first row."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def report(name: str, body: list[str], quick: bool) -> None:
    """Print a dated section; append it to RESULTS.md unless it is a ``--quick`` check."""
    section = "\n".join([f"## {name}: {machine_line()}{' (--quick)' if quick else ''}", "", *body])
    print("\n" + section, flush=True)
    if quick:
        print("\n[bench] --quick: RESULTS.md left unchanged")
    else:
        append_results(section)
        print(f"\n[bench] appended to {RESULTS}")
