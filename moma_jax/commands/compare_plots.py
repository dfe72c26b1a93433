"""A suite's plots: held-out loss vs training FLOPs per modality (seeds as bands), eta per
modality as bars with their 95% interval and the seeds as dots, the loss difference from dense
at equal FLOPs and eta along the curve, and per-layer expert load by group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moma_jax.commands.compare_report import MODALITIES


def plots(rep: dict[str, Any], out_dir: Path, seeds: int) -> list[Path]:
    """loss_vs_flops.png, eta.png, loss_diff.png and expert_load.png (where experts exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, m in zip(axes, MODALITIES, strict=True):
        for exp in rep["experiments"]:
            runs = [rep["curves"][f"{exp}/seed{s}"][f"eval_{m}"] for s in range(seeds)]
            flops = np.asarray(runs[0][0])
            n = min(len(r[1]) for r in runs)
            losses = np.asarray([r[1][:n] for r in runs])
            keep = flops[:n] > 0
            (line,) = ax.plot(flops[:n][keep], losses.mean(0)[keep], label=exp)
            if seeds > 1:
                ax.fill_between(
                    flops[:n][keep],
                    losses.min(0)[keep],
                    losses.max(0)[keep],
                    color=line.get_color(),
                    alpha=0.2,
                )
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(f"held-out loss ({m})")
        ax.set_title(m)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "loss_vs_flops.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    exps = [e for e in rep["experiments"] if e != rep["dense"]]
    width = 0.25
    for i, m in enumerate(MODALITIES):
        stats = [rep["experiments"][e][m]["eta_heldout"] for e in exps]
        x = np.arange(len(exps)) + (i - 1) * width
        means = np.asarray([s["mean"] for s in stats])
        low = np.asarray([s["mean"] if s["low"] is None else s["low"] for s in stats])
        high = np.asarray([s["mean"] if s["high"] is None else s["high"] for s in stats])
        bars = ax.bar(x, means, width, yerr=[means - low, high - means], label=m)
        for bar, s in zip(bars, stats, strict=True):
            if s["kinds"]["capped"]:  # a bound, not a value
                bar.set_hatch("//")
            for e in s["per_seed"]:
                if e is not None:
                    ax.plot(bar.get_x() + width / 2, e["value"], "k.", ms=3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(exps)), exps, rotation=20)
    ax.set_ylabel("eta (held-out): mean, 95% t-interval, seeds as dots")
    ax.set_title("hatched: includes a bound (crossing before a first evaluation)", fontsize=8)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "eta.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for col, m in enumerate(MODALITIES):
        for exp in exps:
            d = rep["experiments"][exp][m]["loss_diff_curve"]
            f = np.asarray(d["flops"])
            mean = np.asarray([np.nan if v is None else v for v in d["mean"]])
            (line,) = axes[0, col].plot(f, mean, label=exp)
            if seeds > 1:
                low = np.asarray([np.nan if v is None else v for v in d["low"]])
                high = np.asarray([np.nan if v is None else v for v in d["high"]])
                axes[0, col].fill_between(f, low, high, color=line.get_color(), alpha=0.2)
            for flops, etas in rep["experiments"][exp][m]["eta_curves"]:
                axes[1, col].plot(flops, etas, color=line.get_color(), lw=0.8)
        axes[0, col].axhline(0.0, color="k", lw=0.8)
        axes[0, col].set_ylabel(f"held-out loss minus dense ({m})")
        axes[1, col].axhline(1.0, color="k", lw=0.8)
        axes[1, col].set_ylabel(f"eta along the curve ({m})")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.set_xlabel("training FLOPs")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("equal FLOPs, paired by seed: mean with 95% t-band (top); eta per seed (bottom)")
    fig.tight_layout()
    paths.append(out_dir / "loss_diff.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    loads = [
        (exp, group, np.asarray(matrix))
        for exp in rep["experiments"]
        for group, matrix in rep["curves"][f"{exp}/seed0"]["layer_load"].items()
        if matrix
    ]
    if loads:
        fig, axes = plt.subplots(1, len(loads), figsize=(3.2 * len(loads), 3), squeeze=False)
        for ax, (exp, group, matrix) in zip(axes[0], loads, strict=True):
            im = ax.imshow(matrix, vmin=0, aspect="auto", cmap="viridis")
            ax.set_title(f"{exp}\n{group}", fontsize=8)
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.05)
        fig.suptitle("share of each group's tokens per expert, last logged step, seed 0")
        fig.tight_layout()
        paths.append(out_dir / "expert_load.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
