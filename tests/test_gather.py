"""gather: tables over seeds, the average over data sets, loss-curve panels, from synthetic runs."""

import json

import pytest

from grass_lightning.tools.gather import averages, gather, loss_curves, main, smooth_losses


def _run(root, model, data, method, seed, score, losses=None, scores=None, settings=None, val=None, lr=None):
    folder = root / "-".join([model, data, method, str(seed), *(f"{k}{v}" for k, v in sorted((settings or {}).items())),
                              *([f"lr{lr}"] if lr is not None else [])])
    (folder / "csv").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "model": model, "data": data, "method": method, "seed": seed, "score": score, "score_name": "accuracy",
        "score_before": None, "step_time_s": 1.0, "peak_memory_mb": 100.0, "trainable_params_max": 10,
        "method_settings": {"lr": 1e-4, **(settings or {})},
        **({} if scores is None else {"scores": scores, "scores_before": {name: 0.25 for name in scores}}),
        **({} if val is None else {"val_score": val, "val_scores": {"accuracy": val}}),
        **({} if lr is None else {"optim_settings": {"lr": lr, "warmup_steps": 10}})}))
    if losses is not None:
        (folder / "csv" / "metrics.csv").write_text(
            "epoch,step,train/loss\n" + "".join(f"0,{i},{loss}\n" for i, loss in enumerate(losses)))


def test_rows_are_means_over_seeds_in_method_order(tmp_path):
    for seed, score in enumerate([0.5, 0.7]):
        _run(tmp_path, "m", "a", "grass", seed, score)
        _run(tmp_path, "m", "a", "full", seed, score + 0.1)
    rows = gather(tmp_path)
    assert [r["method"] for r in rows] == ["full", "grass"]
    assert rows[1]["score"] == pytest.approx(0.6) and rows[1]["score_std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows[1]["score_before"] is None


def test_average_over_sets_is_per_seed_and_skips_incomplete_seeds(tmp_path):
    # seed 0 and 1 ran on both sets; seed 2 of grass only on "a": it must not tilt the average
    for seed, (a, b) in enumerate([(0.4, 0.8), (0.6, 0.6)]):
        _run(tmp_path, "m", "a", "grass", seed, a)
        _run(tmp_path, "m", "b", "grass", seed, b)
    _run(tmp_path, "m", "a", "grass", 2, 0.0)
    _run(tmp_path, "solo", "a", "grass", 0, 0.9)  # one set only: no average row
    (row,) = averages(tmp_path)
    assert (row["model"], row["method"], row["seeds"], row["sets"]) == ("m", "grass", 2, ["a", "b"])
    assert row["score"] == pytest.approx(0.6) and row["score_std"] == pytest.approx(0.0)
    assert row["per_seed"] == pytest.approx({0: 0.6, 1: 0.6})


def test_loss_curves_draw_one_panel_per_data_set(tmp_path):
    import matplotlib.image

    _run(tmp_path / "one", "m", "a", "full", 0, 0.5, losses=[3, 2, 1])
    one = loss_curves(tmp_path / "one", tmp_path / "one.png")
    for data in ("a", "b", "c"):
        _run(tmp_path / "three", "m", data, "full", 0, 0.5, losses=[3, 2, 1])
    three = loss_curves(tmp_path / "three", tmp_path / "three.png")
    h1, w1 = matplotlib.image.imread(one).shape[:2]
    h3, w3 = matplotlib.image.imread(three).shape[:2]
    assert (w3, h3) == (2 * w1, 2 * h1)  # a 2 x 2 grid, the fourth cell hidden


def test_main_writes_both_tables(tmp_path, capsys):
    for data in ("a", "b"):
        _run(tmp_path, "m", data, "lisa", 0, 0.5)
    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| m | a | lisa | 1 |" in printed and "| m | lisa | 1 | 0.500 ± – | a, b |" in printed  # one run: no spread
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["runs"]) == 2 and summary["mean_over_sets"][0]["sets"] == ["a", "b"]
    assert sum(line.startswith("|---|") for line in (tmp_path / "summary.md").read_text().splitlines()) == 2


def test_another_recorded_score_is_tabulated_on_request_and_an_unrecorded_one_refused(tmp_path, capsys):
    for seed, norm in enumerate([0.3, 0.5]):
        _run(tmp_path, "m", "a", "grass", seed, 0.9, scores={"accuracy": 0.9, "accuracy_norm": norm})
    (row,) = gather(tmp_path, score="accuracy_norm")
    assert row["score_name"] == "accuracy_norm" and row["score"] == pytest.approx(0.4)
    assert row["score_before"] == pytest.approx(0.25)
    main([str(tmp_path), "--score", "accuracy_norm"])
    assert "| m | a | grass | 2 | 0.250 ± 0.000 | – | 0.400 ± 0.141 |" in (tmp_path / "summary_accuracy_norm.md").read_text()
    assert not (tmp_path / "summary.md").exists()  # the headline table is left alone
    _run(tmp_path, "m", "a", "grass", 2, 0.9)  # an older run that recorded its headline score only
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--score", "accuracy_norm"])
    assert "--score 'accuracy_norm'" in capsys.readouterr().err


def test_few_logged_losses_are_drawn_as_logged_and_many_are_smoothed():
    assert smooth_losses([4.0, 2.0, 0.0, 2.0], window=10) == (1, [4.0, 2.0, 0.0, 2.0])
    width, smooth = smooth_losses([float(i % 2) for i in range(100)], window=10)
    assert width == 10 and smooth[-1] == pytest.approx(0.5) and smooth[0] == 0.0


def test_runs_that_differ_in_method_settings_get_rows_of_their_own(tmp_path, capsys):
    """A sweep over method.temperature is not one row of mixed settings."""
    for seed in (0, 1):
        for temperature, score in ((0.25, 0.4), (1.0, 0.8)):
            _run(tmp_path, "m", "copa", "grass", seed, score, settings={"temperature": temperature, "num_active": 2})
    _run(tmp_path, "m", "sciq", "grass", 0, 0.1, settings={"temperature": 0.25, "num_active": 2})
    _run(tmp_path, "m", "copa", "full", 0, 0.9)
    rows = gather(tmp_path)
    assert [(r["data"], r["method"], r["settings"], r["runs"]) for r in rows] == [
        ("copa", "full", "", 1), ("copa", "grass", "temperature=0.25", 2), ("copa", "grass", "temperature=1.0", 2),
        ("sciq", "grass", "temperature=0.25", 1)]
    assert rows[1]["score"] == pytest.approx(0.4) and rows[2]["score"] == pytest.approx(0.8)
    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| m | copa | grass | temperature=1.0 | 2 | – | – | 0.800 ± 0.000 |" in printed
    assert "| m | sciq | grass | temperature=0.25 | 1 | – | – | 0.100 ± – |" in printed


def test_failed_jobs_and_runs_without_logged_losses_are_reported(tmp_path, capsys):
    _run(tmp_path, "m", "a", "grass", 0, 0.5, losses=[3, 2])
    _run(tmp_path, "m", "a", "grass", 1, 0.5)  # too short to log a loss
    crashed = tmp_path / "7" / ".hydra"
    crashed.mkdir(parents=True)
    (crashed / "overrides.yaml").write_text("- method.num_active=0\n- seed=1\n")
    main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "Jobs without metrics.json (failed, or still running):\n- 7: method.num_active=0 seed=1" in printed
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == [
        {"dir": "7", "overrides": ["method.num_active=0", "seed=1"]}]
    assert "not in the loss curves: 1 run(s) logged no training loss" in printed


def test_the_row_a_sweep_chooses_is_the_best_validation_score_not_the_best_test_score(tmp_path):
    for seed in (0, 1):
        _run(tmp_path, "m", "a", "grass", seed, 0.9, settings={"temperature": 0.5}, val=0.6)  # best on test
        _run(tmp_path, "m", "a", "grass", seed, 0.7, settings={"temperature": 1.0}, val=0.8)  # best on validation
    main([str(tmp_path)])
    table = (tmp_path / "summary.md").read_text()
    assert "| m | a | grass | temperature=1.0 | 2 | – | 0.800 ± 0.000 **(chosen)** | 0.700 ± 0.000 |" in table
    assert table.count("(chosen)") == 2  # the row and the note under the table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["settings"] for row in summary["chosen_on_validation"]] == ["temperature=1.0"]


def test_runs_that_differ_only_in_the_learning_rate_are_rows_not_seeds(tmp_path):
    _run(tmp_path, "m", "a", "grass", 0, 0.6, lr=1e-4, val=0.5)
    _run(tmp_path, "m", "a", "grass", 0, 0.8, lr=1e-3, val=0.7)
    rows = gather(tmp_path)
    assert [(r["settings"], r["runs"], r["score"]) for r in rows] == [("optim.lr=0.0001", 1, 0.6), ("optim.lr=0.001", 1, 0.8)]
