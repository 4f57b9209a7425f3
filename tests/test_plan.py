"""The memory planner: activations measured on the meta device and scaled, components against
counted tensor bytes of a real run, predicted against measured peak, and bad input."""

import argparse
import json
import subprocess
import sys

import pytest
import torch
from hydra.errors import MissingConfigException

from grass_lightning.app.models import ModelSpec, _blueprint
from grass_lightning.tools.activations import KINDS, fit_activations, meta_model, saved_bytes
from grass_lightning.tools.plan import MB, Planner, RunShape, compose, main
from tests.helpers.app import CONF


def _tiny_llama_maker():
    from omegaconf import OmegaConf

    cfg = compose(["model=tiny_llama"])
    auto, config = _blueprint(ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True)), None, None)
    return meta_model(auto, config)


def test_activations_fitted_at_two_lengths_predict_another_batch_and_length():
    make = _tiny_llama_maker()
    model = fit_activations(make, torch.float32, head_trained=True)
    measured = saved_bytes(make, torch.float32, batch=3, seq=200, head_trained=True)
    for kind in KINDS:
        assert model.bytes(kind, 3, 200) == pytest.approx(measured[kind], rel=0.01), kind
    # what each kind keeps: a trained block more than a frozen one (its weights' gradients need
    # their inputs), a recomputed one only its input (batch x length x hidden fp32 values)
    assert measured["trained"] > measured["frozen"] > measured["recomputed"] == 3 * 200 * 32 * 4


def test_the_plans_components_are_the_tensor_bytes_a_run_holds():
    """The bench's own run of tiny Llama under GRASS: trained parameters and optimizer-state bytes
    counted on the real tensors, against the plan of the same run."""
    from grass_lightning.tools.bench import argument_parser, measure

    args = argument_parser().parse_args(["--model", "tiny_llama", "--steps", "2", "--probe-steps", "1",
                                         "--batch-size", "2", "--seq-len", "16", "--sampling-period", "2",
                                         "--accelerator", "cpu"])
    row = measure("grass", args)
    planner = Planner(compose(["model=tiny_llama", "method=grass", "method.sampling_period=2", "method.probe_steps=1"]))
    deepest = next(p for p in planner.plan(RunShape(2, 16)).phases if p.name == "deepest draw")
    assert deepest.gradients / 4 == row["trainable_params"]  # fp32: 4 bytes per trained parameter
    assert deepest.moments / MB == pytest.approx(row["optimizer_state_mb"], rel=1e-6)  # exp_avg, exp_avg_sq
    weights = sum(p.numel() * 4 for p in planner_model_parameters())
    assert deepest.weights == weights


def planner_model_parameters():
    from grass_lightning.app.models import load_model

    from omegaconf import OmegaConf

    cfg = compose(["model=tiny_llama"])
    model, _ = load_model(ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True)), None)
    return list(model.parameters())


@pytest.mark.parametrize(("argv", "error", "message"), [
    (["model=nosuch"], MissingConfigException, "model/nosuch"),
    (["model=minilm"], ValueError, "the planner knows causal LMs"),
    (["model=tiny_llama", "method.num_active=9"], ValueError, r"num_active=9 exceeds the 4 blocks"),
    (["model=tiny_llama", "method.offload=park"], ValueError, r"offload='park' with idle_moments='drop'"),
])
def test_bad_input_gets_a_clear_error_before_any_planning(argv, error, message):
    with pytest.raises(error, match=message):
        main([*argv, "--overhead-mb", "0"])


@pytest.mark.parametrize(("flag", "value"), [("--batch-size", "0"), ("--seq-len", "-3"), ("--device-gb", "0")])
def test_bad_flags_are_refused_by_name(capsys, flag, value):
    with pytest.raises(SystemExit):
        main(["model=tiny_llama", flag, value])
    assert f"{flag}={value}" in capsys.readouterr().err


@pytest.mark.slow
def test_predicted_peaks_are_within_15_percent_of_a_bench_runs_measured_ones(tmp_path):
    """A 10M-parameter Llama, where tensors and not the process set the peak: full fine-tuning,
    GRASS and LISA measured by the bench, then predicted by `grass-plan --check`."""
    bench = [sys.executable, "-m", "grass_lightning.tools.bench", "--model", "small_llama", "--methods",
             "full,lisa,grass", "--batch-size", "8", "--seq-len", "256", "--steps", "3", "--memory-steps", "2",
             "--probe-steps", "2", "--sampling-period", "2", "--out", str(tmp_path)]
    done = subprocess.run(bench, cwd=CONF.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    check = subprocess.run([sys.executable, "-m", "grass_lightning.tools.plan", "--check", str(tmp_path / "bench.json")],
                           cwd=CONF.parent, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    ratios = [float(line.rsplit("|", 2)[-2]) for line in check.stdout.splitlines()
              if line.startswith(("| full", "| lisa", "| grass"))]
    assert len(ratios) == 3 and all(0.85 <= r <= 1.15 for r in ratios), check.stdout
