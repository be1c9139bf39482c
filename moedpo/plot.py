"""`moedpo plot RUN_DIR [RUN_DIR ...]`: one PNG page of a run's metrics, runs overlaid.

Panels: loss, reward accuracy, reward margin, chosen and rejected rewards, learning rate,
gradient norm, throughput, and for MoE models the dropped fraction, the routing drift from
the reference (agreement, router KL), the load's coefficient of variation and a heat map of
the expert load per layer (last logged train row of the first run). Train is a solid line, eval
dots on a dashed line.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import read_rows  # noqa: E402

PANELS = [
    ("loss", "DPO loss", ["loss"]),
    ("accuracy", "reward accuracy", ["rewards/accuracies"]),
    ("margin", "reward margin", ["rewards/margins"]),
    ("rewards", "rewards (chosen solid, rejected dotted)", ["rewards/chosen", "rewards/rejected"]),
    ("kl", "KTO: KL estimate z0", ["kl"]),
    ("lr", "learning rate", ["lr"]),
    ("grad_norm", "gradient norm", ["grad_norm"]),
    ("throughput", "pairs / s", ["examples_per_second"]),
    ("dropped", "MoE: dropped slot fraction", ["moe/dropped_fraction"]),
    ("agreement", "MoE: routing agreement with the reference", ["moe/routing_agreement"]),
    ("router_kl", "MoE: router KL(policy || reference)", ["moe/router_kl"]),
    ("load_cv", "MoE: expert load coefficient of variation", ["moe/load_cv"]),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a moedpo run directory?)")
    return read_rows(path)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def expert_load(rows: list[dict]) -> list[list[float]] | None:
    """[layer][expert] load (1.0 = fair share) of the last train row that has it."""
    for row in reversed(rows):
        if "train/moe/expert_load" in row:
            return row["train/moe/expert_load"]
    return None


def plot_runs(run_dirs: list[Path], out: Path) -> tuple[Path, list[str]]:
    """Draw the page; returns (png path, titles of the panels drawn)."""
    runs = [(d.name or str(d), read_metrics(d)) for d in run_dirs]
    has = {k for _, rows in runs for r in rows for k in r}
    panels = [p for p in PANELS if any(f"{split}/{k}" in has for k in p[2]
                                       for split in ("train", "eval"))]
    load = expert_load(runs[0][1])
    n = len(panels) + (load is not None)
    cols = 3
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5 * cols, 3.4 * ((n + 2) // 3)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    titles = []
    for ax, (_, title, keys) in zip(axes.flat, panels, strict=False):
        for i, (name, rows) in enumerate(runs):
            color = colors[i % len(colors)]
            for j, key in enumerate(keys):
                style = ":" if j else "-"
                x, y = series(rows, f"train/{key}")
                if x:
                    ax.plot(x, y, style, color=color, label=f"{name} train" if not j else None)
                x, y = series(rows, f"eval/{key}")
                if x:
                    ax.plot(x, y, "o--" if not j else "o:", color=color, markersize=3,
                            label=f"{name} eval" if not j else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        titles.append(title)
    axes.flat[0].legend(fontsize=7)
    if load is not None:
        ax = axes.flat[len(panels)]
        image = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set_title(f"MoE: expert load per layer ({runs[0][0]}, last train row)")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(len(load[0])))
        ax.set_yticks(range(len(load)))
        fig.colorbar(image, ax=ax, label="load (1 = fair share)")
        titles.append("expert load")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(", ".join(name for name, _ in runs))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out, titles
