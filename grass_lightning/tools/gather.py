"""Gather the metrics.json of many runs (a Hydra multirun folder) into tables.

    grass-gather multirun/2026-11-29/17-00-00

Runs are grouped by model, data (a JSONL file by its name) and method, and by the method
settings in which runs of one model and method differ (a sweep over ``method.temperature``
gives a row per temperature, named in a ``settings`` column); each cell is the mean ± standard
deviation over the runs (seeds) of the group, "–" for the spread of a single run. Hydra jobs
that left no metrics.json (failed, or still running) are listed below the tables. When a model
ran on two or more data sets, a second table gives each method's score averaged over the sets
(the paper's "Avg." column). Writes summary.md, summary.json and loss_curves.png (training loss
per method, mean over seeds, one panel per model and data set) beside the runs.

The score is each run's headline score on the test split; ``--score accuracy_norm`` tabulates
another score the runs recorded (``scores`` in metrics.json) into summary_accuracy_norm.md and
.json instead. Beside it stands the validation score of the final weights, and for each model and
data set the row with the best mean validation score is marked as the one a sweep chooses; its
test score is shown beside it and never used to choose. Any sweep's folder reads the same: Hydra's
basic launcher, joblib and submitit all write one job folder per run; an Optuna sweep's
``optimization_results.yaml`` is printed too, with the chosen trial's test score.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

ORDER = ("full", "lora", "badam", "lisa", "grass-uniform", "grass-static", "grass")  # densest first
COLUMNS = ("score_before", "val_score", "score", "step_time_s", "peak_memory_mb", "trainable_params_max")


def _runs(root: Path, score: str | None = None) -> list[tuple[Path, dict]]:
    """Every run under ``root``, each with its ``settings`` label; with ``score``, that score
    stands in for the headline one."""
    runs = [(path, json.loads(path.read_text())) for path in sorted(root.rglob("metrics.json"))]
    if not runs:
        raise FileNotFoundError(f"No metrics.json under {root}.")
    _label_settings([run for _, run in runs])
    for _, run in runs:  # the headline validation score, or --score's, from val_scores (older runs have no val_score)
        recorded = run.get("val_scores") or {}
        run["val_score"] = recorded.get(score or run["score_name"])
    if score is None:
        return runs
    for path, run in runs:
        recorded = run.get("scores") or {}
        if score not in recorded:
            raise ValueError(f"--score {score!r}: {path} records {sorted(recorded) or 'only its headline score'}; "
                             f"gather the runs that record it, or leave --score out.")
        run.update(score=recorded[score], score_name=score,
                   score_before=None if run.get("scores_before") is None else run["scores_before"][score])
    return runs


def _label_settings(runs: list[dict]) -> None:
    """Set each run's ``settings``: the method and optimizer settings (metrics.json's
    ``method_settings``, and ``optim_settings`` as ``optim.<key>``) in which the runs of its model
    and method differ, as ``key=value, ...``; empty where they agree. Runs that differ only in
    ``optim.lr`` (an Optuna trial, say) are rows of their own, not seeds of one."""
    families = defaultdict(list)
    for run in runs:
        families[(run["model"], run["method"])].append(run)
    for family in families.values():
        chosen = [{**r.get("method_settings", {}), **{f"optim.{k}": v for k, v in r.get("optim_settings", {}).items()}}
                  for r in family]
        keys = sorted({key for settings in chosen for key in settings})
        differ = [k for k in keys if len({json.dumps(settings.get(k)) for settings in chosen}) > 1]
        for run, settings in zip(family, chosen):
            run["settings"] = ", ".join(f"{k}={settings.get(k)}" for k in differ)


def _order(key: tuple) -> tuple:
    """Sort (..., method, settings) keys by what precedes the method, then methods in the order of `ORDER`."""
    return (*key[:-2], _rank(key[-2]), key[-2], key[-1])


def spread(values: list[float]) -> float | None:
    """Standard deviation over runs; None (printed "–") for a single run, which has no spread."""
    return statistics.stdev(values) if len(values) > 1 else None


def gather(root: Path, score: str | None = None) -> list[dict]:
    """One row per (model, data, method, settings), methods in the order of `ORDER`."""
    groups = defaultdict(list)
    for _, run in _runs(root, score):
        groups[(run["model"], run["data"], run["method"], run["settings"])].append(run)
    rows = []
    for (model, data, method, settings), runs in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        row = {"model": model, "data": data, "method": method, "settings": settings, "runs": len(runs),
               "score_name": runs[0]["score_name"]}
        for column in COLUMNS:
            values = [r[column] for r in runs if r.get(column) is not None]
            row[column] = statistics.mean(values) if values else None
            row[column + "_std"] = spread(values)
        rows.append(row)
    return rows


def failed(root: Path) -> list[dict]:
    """Hydra jobs under ``root`` that wrote no metrics.json (failed, or not finished), with their overrides."""
    from omegaconf import OmegaConf

    jobs = []
    for overrides in sorted(root.rglob(".hydra/overrides.yaml")):
        job = overrides.parent.parent
        if not (job / "metrics.json").exists():
            jobs.append({"dir": str(job.relative_to(root)), "overrides": list(OmegaConf.load(overrides))})
    return jobs


def averages(root: Path, score: str | None = None) -> list[dict]:
    """Per (model, method), the score averaged over every data set the model ran on: the mean ±
    std over seeds of each seed's average. A seed counts only if it ran on every set, so a
    missing run never tilts the average; models run on a single set get no row."""
    scores = defaultdict(dict)  # (model, method, settings) -> {(data, seed): score}
    sets = defaultdict(set)
    for _, run in _runs(root, score):
        scores[(run["model"], run["method"], run["settings"])][(run["data"], run["seed"])] = run["score"]
        sets[run["model"]].add(run["data"])
    rows = []
    for (model, method, settings), by_run in sorted(scores.items(), key=lambda kv: _order(kv[0])):
        per_seed = {seed: statistics.mean(by_run[(data, seed)] for data in sets[model])
                    for seed in sorted({seed for _, seed in by_run})
                    if all((data, seed) in by_run for data in sets[model])}
        if len(sets[model]) < 2 or not per_seed:
            continue
        means = list(per_seed.values())
        rows.append({"model": model, "method": method, "settings": settings, "sets": sorted(sets[model]),
                     "seeds": len(per_seed), "score": statistics.mean(means), "score_std": spread(means),
                     "per_seed": per_seed})  # for comparing methods seed by seed (same data order)
    return rows


def cell(value: float | None, spread: float | None, fmt: str) -> str:
    """``mean ± std`` as a table cell; "–" for what is missing. A signed ``fmt`` ("+.3f", for
    differences) signs the mean only: a spread has no sign."""
    if value is None:
        return "–"
    return f"{value:{fmt}} ± " + ("–" if spread is None else f"{spread:{fmt.lstrip('+')}}")


def _method(row: dict, with_settings: bool) -> str:
    return f"{row['method']} | {row['settings'] or '–'}" if with_settings else row["method"]


def chosen(rows: list[dict]) -> list[dict]:
    """Per (model, data), the row with the best mean validation score: what a sweep chooses."""
    best = {}
    for row in rows:
        key = (row["model"], row["data"])
        if row["val_score"] is not None and (key not in best or row["val_score"] > best[key]["val_score"]):
            best[key] = row
    return list(best.values())


def markdown(rows: list[dict]) -> str:
    settings = any(r["settings"] for r in rows)  # the column appears only where runs differ in them
    picked = {id(r) for r in chosen(rows)}
    head = (f"| model | data | method |{' settings |' if settings else ''} runs | test score before | validation "
            f"score | test score after | step time (s) | peak memory (MB) | trained params (max) |")
    lines = [head, "|" + "---|" * (11 if settings else 10)]
    for r in rows:
        shown = lambda k, fmt: cell(r[k], r[k + "_std"], fmt)  # noqa: E731
        mark = " **(chosen)**" if id(r) in picked and len(rows) > 1 else ""
        lines.append(
            f"| {r['model']} | {r['data']} | {_method(r, settings)} | {r['runs']} | {shown('score_before', '.3f')} | "
            f"{shown('val_score', '.3f')}{mark} | {shown('score', '.3f')} | {shown('step_time_s', '.3f')} | "
            f"{shown('peak_memory_mb', '.0f')} | {r['trainable_params_max'] / 1e6:.2f}M |"
        )
    if len(rows) > 1:
        lines.append("\n(chosen): the best mean validation score of its model and data; its test score is only reported.")
    return "\n".join(lines) + "\n"


def optuna_best(root: Path) -> str | None:
    """An Optuna sweep's best trial (Hydra's ``optimization_results.yaml``) and that trial's test score."""
    results = root / "optimization_results.yaml"
    if not results.is_file():
        return None
    from omegaconf import OmegaConf

    best = OmegaConf.to_container(OmegaConf.load(results))
    params = best.get("best_params", {})
    wanted = {f"{key}={value}" for key, value in params.items()}
    trial = next((overrides.parent.parent for overrides in sorted(root.rglob(".hydra/overrides.yaml"))
                  if wanted <= set(OmegaConf.load(overrides))), None)
    test = None
    if trial is not None and (trial / "metrics.json").is_file():
        test = json.loads((trial / "metrics.json").read_text())["score"]
    return (f"Optuna's best trial (optimization_results.yaml): validation score {best.get('best_value')}, "
            f"{', '.join(sorted(wanted))}" + (f"; its test score {test:.4f} (job {trial.name})" if test is not None else ""))


def markdown_averages(rows: list[dict]) -> str:
    settings = any(r["settings"] for r in rows)
    lines = [f"| model | method |{' settings |' if settings else ''} seeds | mean score over the sets | sets |",
             "|" + "---|" * (6 if settings else 5)]
    lines += [f"| {r['model']} | {_method(r, settings)} | {r['seeds']} | {cell(r['score'], r['score_std'], '.3f')} | "
              f"{', '.join(r['sets'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown_failed(jobs: list[dict]) -> str:
    lines = ["Jobs without metrics.json (failed, or still running):"]
    lines += [f"- {job['dir']}: {' '.join(job['overrides'])}" for job in jobs]
    return "\n".join(lines) + "\n"


def loss_curves(root: Path, out: Path, window: int = 10) -> Path | None:
    """Plot the training loss per method over steps, one panel per (model, data): the mean over a
    group's runs (seeds) of each run's ``csv/metrics.csv``, smoothed by a moving average of
    ``window`` logged points (see `smooth_losses`)."""
    curves = defaultdict(list)  # (model, data, method, settings) -> runs' {step: loss}
    for path, run in _runs(root):
        losses = _logged_losses(path)
        if losses:
            curves[(run["model"], run["data"], run["method"], run["settings"])].append(losses)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({key[:2] for key in curves})
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4 * rows), squeeze=False)
    for ax, (model, data) in zip(axes.flat, panels):
        for (_, _, method, settings), runs in sorted(((k, v) for k, v in curves.items() if k[:2] == (model, data)),
                                                     key=lambda kv: _order(kv[0])):
            steps = sorted(set.intersection(*(set(run) for run in runs)))
            mean = [statistics.mean(run[step] for run in runs) for step in steps]
            width, smooth = smooth_losses(mean, window)
            label = f"{method}{f' ({settings})' if settings else ''} ({len(runs)} runs)"
            ax.plot(steps, smooth, label=label, color=f"C{_rank(method)}" if not settings else None)  # a method keeps its colour
        ax.set_title(f"{model} on {data}" if len(panels) > 1 else "")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (mean over seeds" + (f";\nmoving average of {width} logged values)" if width > 1 else ")"))
        ax.legend()
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _logged_losses(metrics_json: Path) -> dict[int, float]:
    """The training losses a run logged to ``csv/metrics.csv`` beside its metrics.json, by step."""
    logged = metrics_json.parent / "csv" / "metrics.csv"
    if not logged.is_file():
        return {}
    with logged.open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def unlogged(root: Path) -> list[str]:
    """Runs that logged no training loss: too few optimizer steps for ``trainer.log_every_n_steps``."""
    return [str(path.parent.relative_to(root)) for path, _ in _runs(root) if not _logged_losses(path)]


def smooth_losses(values: list[float], window: int) -> tuple[int, list[float]]:
    """Moving average over ``window`` values, or over a tenth of them if that is fewer: a short
    run logs few losses, and averaging most of them would draw a cumulative mean, not a curve."""
    width = max(1, min(window, len(values) // 10))
    return width, [statistics.mean(values[max(0, i - width + 1): i + 1]) for i in range(len(values))]


def _rank(method: str) -> int:
    """Tables and plots list methods in the order of `ORDER`, others after them."""
    return ORDER.index(method) if method in ORDER else len(ORDER)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder holding the runs (e.g. multirun/<date>/<time>)")
    parser.add_argument("--score", help="a score the runs recorded besides their headline one (e.g. accuracy_norm)")
    args = parser.parse_args(argv)
    root, score = args.root, args.score
    try:
        rows, means = gather(root, score), averages(root, score)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    jobs = failed(root)
    best = optuna_best(root)
    table = (markdown(rows) + ("\n" + markdown_averages(means) if means else "") + (f"\n{best}\n" if best else "")
             + ("\n" + markdown_failed(jobs) if jobs else ""))
    name = "summary" if score is None else f"summary_{score}"
    (root / f"{name}.md").write_text(table)
    summary = {"runs": rows, "chosen_on_validation": chosen(rows), "mean_over_sets": means, "optuna": best, "failed": jobs}
    (root / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table, end="")
    curves = loss_curves(root, root / "loss_curves.png")
    if curves is not None:
        print(f"loss curves: {curves}")
    silent = unlogged(root)
    if silent:
        print(f"not in the loss curves: {len(silent)} run(s) logged no training loss (fewer optimizer steps than "
              f"trainer.log_every_n_steps), e.g. {silent[0]}")


if __name__ == "__main__":
    main()
