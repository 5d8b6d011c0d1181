"""The two search plots: quality vs latency (Pareto), and learning rate vs quality."""

from __future__ import annotations

from pathlib import Path

from bloomray.tune.select import Candidate


def plot_pareto(
    cands: list[Candidate], front: list[Candidate], winner: Candidate, quality_name: str, path: Path
) -> None:
    """Every trial, the front as a line, and the winner starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    sc = ax.scatter(
        [c.latency_ms for c in cands],
        [c.quality for c in cands],
        c=[c.sparsity for c in cands],
        cmap="viridis",
        vmin=0,
        vmax=1,
        s=40,
        label="trials",
        zorder=2,
    )
    ax.plot(
        [c.latency_ms for c in front],
        [c.quality for c in front],
        "r--",
        lw=1.2,
        label="Pareto front",
        zorder=1,
    )
    ax.scatter(
        [winner.latency_ms],
        [winner.quality],
        marker="*",
        s=260,
        c="red",
        edgecolors="k",
        label="winner",
        zorder=3,
    )
    for c in cands:
        ax.annotate(
            c.trial_id[-5:], (c.latency_ms, c.quality), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    fig.colorbar(sc, ax=ax, label="sparsity")
    ax.set_xlabel("CPU forward latency (ms, batch of the select config)")
    ax.set_ylabel(quality_name)
    ax.set_title("bloomray tune: quality vs latency")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_lr_vs_quality(rows: list[dict], quality_key: str, path: Path) -> None:
    """Learning rate (log x) against the trial's final quality, coloured by sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [
        (r["train.lr"], r[quality_key], r.get("sparsity") or 0.0)
        for r in rows
        if r.get("train.lr") is not None and r.get(quality_key) is not None
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    if pts:
        sc = ax.scatter(
            [p[0] for p in pts],
            [p[1] for p in pts],
            c=[p[2] for p in pts],
            cmap="viridis",
            vmin=0,
            vmax=1,
            s=40,
        )
        fig.colorbar(sc, ax=ax, label="sparsity")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(quality_key)
    ax.set_title("bloomray tune: learning rate vs quality")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
