"""The importance heat-map of a run: blocks over steps, colour = importance relative to the
most important block at that step, dots = the blocks that trained. A LISA run measures no
importance: its picture is the dots alone, the blocks trained over time.

    grass-heatmap outputs/<date>/<time>/csv/metrics.csv   # writes importance.png beside it

`train.py` draws it for GRASS and LISA runs logged to CSV.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def read_history(metrics_csv: Path) -> tuple[list[int], list[list[float]], list[list[bool]]]:
    """Steps, per-block importance and per-block active flags from a CSVLogger file."""
    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    blocks = sorted(k.rsplit("/", 1)[1] for k in (rows[0] if rows else {}) if k.startswith("grass/importance/"))
    steps, importance, active = [], [], []
    for row in rows if blocks else []:
        if row.get(f"grass/importance/{blocks[0]}", "") == "":
            continue
        steps.append(int(row["step"]))
        importance.append([float(row[f"grass/importance/{b}"]) for b in blocks])
        active.append([row[f"grass/active/{b}"] == "1.0" for b in blocks])
    return steps, importance, active


def draw(metrics_csv: Path, out: Path | None = None) -> Path | None:
    """Write the heat-map PNG; None when the file holds no logged importance (too few steps)."""
    steps, importance, active = read_history(metrics_csv)
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative = []
    for values in importance:
        known = [v for v in values if not math.isnan(v)]
        top = max(known) if known else 1.0
        relative.append([v / top if top > 0 else math.nan for v in values])
    columns = list(zip(*relative))  # blocks x steps
    measured = any(not math.isnan(v) for values in importance for v in values)
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.22 * len(columns)))
    extent = (steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(columns) - 0.5)
    if measured:
        image = ax.imshow(columns, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, extent=extent,
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, label="relative importance")
        ax.set_title("Block importance (mean gradient norm / max over blocks) and the blocks trained")
    else:
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        ax.set_title("Blocks trained (uniform sampling measures no importance)")
    xs = [s for s, flags in zip(steps, active) for flag in flags if flag]
    ys = [b for flags in active for b, flag in enumerate(flags) if flag]
    ax.scatter(xs, ys, s=4, c="white" if measured else "black", marker="s", linewidths=0, label="trained")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("block")
    ax.legend(loc="upper right", fontsize=8, markerscale=3)
    out = out or metrics_csv.with_name("importance.png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics_csv", type=Path, help="csv/metrics.csv of a run")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: importance.png beside it)")
    args = parser.parse_args(argv)
    out = draw(args.metrics_csv, args.out)
    print(out or f"{args.metrics_csv} holds no grass/importance/* values: not a GRASS or LISA run, or too short.")


if __name__ == "__main__":
    main()
