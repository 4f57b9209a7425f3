"""Sweeps as Hydra users run them: Optuna's TPE search, and jobs spread over processes by the
joblib and submitit launchers; grass-gather reads every layout and marks the choice made on the
validation score."""

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from grass_lightning.app.setup import register_method_defaults
from grass_lightning.tools.gather import main as gather
from tests.helpers.app import CONF, choice_rows, write_jsonl

TINY = ["model=tiny_llama", "data=jsonl", "trainer.max_steps=4", "method.probe_steps=1", "data.val_size=8",
        "data.test_size=8", "test_before=false", "export=false", "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar"]


def _sweep(tmp_path, *overrides, env=None):
    data = write_jsonl(tmp_path / "mc.jsonl", choice_rows())
    done = subprocess.run([sys.executable, "train.py", "-m", *TINY, f"data.path={data}",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides], cwd=CONF.parent, capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "sweep"


@pytest.mark.slow
def test_an_optuna_search_of_three_trials_finds_its_best_inside_the_declared_space(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = _sweep(tmp_path, "hparams_search=grass_optuna", "hydra.sweeper.n_trials=3")
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    best = results.best_params
    assert 0.1 <= best["method.temperature"] <= 2.0 and best["method.sampling_period"] in (10, 25, 50, 100)
    assert 1 <= best["method.num_active"] <= 4 and 1e-5 <= best["optim.lr"] <= 1e-3
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(trials) == 3 and results.best_value == max(t["val_score"] for t in trials)  # chosen on validation
    gather([str(sweep)])
    printed = capsys.readouterr().out
    assert "Optuna's best trial (optimization_results.yaml): validation score" in printed and "its test score" in printed


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ["hydra/launcher=submitit_local"]],
                         ids=["joblib", "submitit_local"])
def test_jobs_spread_over_processes_keep_their_own_metrics_and_gather_reads_them(tmp_path, launcher):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher" if "joblib" in launcher[0] else "hydra_plugins.hydra_submitit_launcher")
    import os

    sweep = _sweep(tmp_path, *launcher, "seed=0,1", env={**os.environ, "OMP_NUM_THREADS": "1"})
    runs = {json.loads(p.read_text())["seed"]: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert set(runs) == {0, 1} and all(run["peak_memory_mb"] > 0 and run["val_score"] is not None for run in runs.values())
    gather([str(sweep)])
    row = json.loads((sweep / "summary.json").read_text())["runs"][0]
    assert row["runs"] == 2 and row["method"] == "grass"


def test_the_slurm_launcher_config_asks_for_one_gpu_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    register_method_defaults()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=grass_slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1 and launcher.mem_gb >= 32
