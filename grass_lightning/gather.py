"""Gather the metrics.json of many runs (a Hydra multirun folder) into one table.

    python -m grass_lightning.gather multirun/2026-11-29/17-00-00

Runs are grouped by model, data and method; each cell is the mean ± standard deviation over
the runs (seeds) of the group. Writes summary.md, summary.json and loss_curves.png (training
loss per method, mean over seeds) beside the runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from grass_lightning.methods import METHODS

COLUMNS = ("score_before", "score", "step_time_s", "peak_memory_mb", "trainable_params_max")


def gather(root: Path) -> list[dict]:
    """One row per (model, data, method), methods in the order of `METHODS`."""
    groups = defaultdict(list)
    for path in sorted(root.rglob("metrics.json")):
        run = json.loads(path.read_text())
        groups[(run["model"], run["data"], run["method"])].append(run)
    if not groups:
        raise FileNotFoundError(f"No metrics.json under {root}.")
    rows = []
    for (model, data, method), runs in sorted(groups.items(), key=lambda kv: (kv[0][:2], _rank(kv[0][2]), kv[0][2])):
        row = {"model": model, "data": data, "method": method, "runs": len(runs), "score_name": runs[0]["score_name"]}
        for column in COLUMNS:
            values = [r[column] for r in runs if r.get(column) is not None]
            row[column] = statistics.mean(values) if values else None
            row[column + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| model | data | method | runs | score before | score after | step time (s) | peak memory (MB) | trained params (max) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        cell = lambda k, fmt: "–" if r[k] is None else f"{r[k]:{fmt}} ± {r[k + '_std']:{fmt}}"  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['data']} | {r['method']} | {r['runs']} | {cell('score_before', '.3f')} | "
            f"{cell('score', '.3f')} | {cell('step_time_s', '.3f')} | {cell('peak_memory_mb', '.0f')} | "
            f"{r['trainable_params_max'] / 1e6:.2f}M |"
        )
    return "\n".join(lines) + "\n"


def loss_curves(root: Path, out: Path, window: int = 10) -> Path | None:
    """Plot the training loss per method over steps: the mean over a group's runs (seeds) of each
    run's ``csv/metrics.csv``, smoothed by a moving average of ``window`` logged points."""
    curves = defaultdict(list)
    for path in sorted(root.rglob("metrics.json")):
        logged = path.parent / "csv" / "metrics.csv"
        if logged.is_file():
            with logged.open() as f:
                losses = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
            curves[json.loads(path.read_text())["method"]].append(losses)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in sorted(curves.items(), key=lambda kv: (_rank(kv[0]), kv[0])):
        steps = sorted(set.intersection(*(set(run) for run in runs)))
        mean = [statistics.mean(run[step] for run in runs) for step in steps]
        smooth = [statistics.mean(mean[max(0, i - window + 1): i + 1]) for i in range(len(mean))]
        ax.plot(steps, smooth, label=f"{method} ({len(runs)} runs)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (mean over seeds;\nmoving average of {window} logged values)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _rank(method: str) -> int:
    """Tables and plots list methods in the order of `METHODS`, others after them."""
    return METHODS.index(method) if method in METHODS else len(METHODS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder holding the runs (e.g. multirun/<date>/<time>)")
    root = parser.parse_args(argv).root
    rows = gather(root)
    table = markdown(rows)
    (root / "summary.md").write_text(table)
    (root / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table, end="")
    curves = loss_curves(root, root / "loss_curves.png")
    if curves is not None:
        print(f"loss curves: {curves}")


if __name__ == "__main__":
    main()
