"""FineTuningModule's own duties: LR schedule, accumulation and mixed precision under manual optimization."""

import json

import pytest
from lightning.pytorch import Callback

import grass_lightning.app.run as run
from grass_lightning.app.module import OptimConfig, lr_factor
from tests.helpers.app import choice_rows, compose_run, write_jsonl


def test_warmup_then_cosine_linear_or_constant():
    assert [lr_factor(s, warmup=3, total=10, kind="cosine") for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert lr_factor(3, 3, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 3, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(6.5, 3, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(6.5, 3, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 3, 10, "constant") == 1.0


def test_optim_settings_are_validated_with_their_key():
    with pytest.raises(ValueError, match=r"optim\.lr=0 must be a number > 0"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match=r"optim\.accumulate_grad_batches=0"):
        OptimConfig(accumulate_grad_batches=0)
    with pytest.raises(ValueError, match=r"optim\.gradient_clip_val=-1"):
        OptimConfig(gradient_clip_val=-1)


@pytest.mark.slow
def test_accumulation_counts_optimizer_steps_under_bf16(tmp_path):
    data = write_jsonl(tmp_path / "mc.jsonl", choice_rows())
    cfg = compose_run(tmp_path / "run", "model=tiny_llama", "data=jsonl", f"data.path={data}", "method.probe_steps=1",
                      "method.sampling_period=2", "method.refresh_interval=2", "optim.accumulate_grad_batches=2",
                      "trainer.precision=bf16-mixed", "trainer.max_steps=3")
    run.train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["updates"] == 3 and metrics["probe_steps"] == 1  # max_steps counts updates
    assert metrics["steps"] == 4  # optimizer steps (global_step), each of two micro-batches
    assert metrics["trainable_params_max"] > 0 and metrics["step_time_s"] > 0


class _PoisonedTokens:
    """Next-token loss; a batch whose first token is POISON gets a NaN loss (so NaN gradients)."""

    POISON = 63
    score_name = "loss"

    def metrics(self):
        import torchmetrics

        return torchmetrics.MetricCollection({"loss": torchmetrics.MeanMetric()})

    def loss(self, model, batch):
        loss = model(input_ids=batch, labels=batch).loss
        return loss * float("nan") if batch[0, 0] == self.POISON else loss


def test_a_step_with_nonfinite_gradients_is_skipped_counted_and_unseen_by_grass():
    import torch

    from grass_lightning import GrassCallback, FineTuningModule
    from tests.helpers.models import VOCAB, quiet_trainer, tiny_hf

    tokens = torch.randint(0, VOCAB - 1, (12 * 4, 8), generator=torch.Generator().manual_seed(0))
    tokens[[4 * 1, 4 * 5], 0] = _PoisonedTokens.POISON  # batch 1 (probing) and batch 5 (training)
    module = FineTuningModule(tiny_hf("llama"), _PoisonedTokens(), OptimConfig(lr=1e-2, warmup_steps=0))
    grass = GrassCallback(num_active=2, sampling_period=2, refresh_interval=2, probe_steps=2, seed=0)
    trainer = quiet_trainer(max_steps=8, callbacks=[grass])
    trainer.fit(module, torch.utils.data.DataLoader(tokens, batch_size=4))
    assert module.nonfinite_steps == 2  # one during the probe, one while training
    assert trainer.global_step == 10  # two probe steps and eight real updates: the skipped ones do not count
    assert all(torch.isfinite(p).all() for p in module.parameters())
    schedule = grass.state_dict()
    assert torch.isfinite(schedule["importance"]["estimate"]).all() and torch.isfinite(schedule["logits"]).all()
    # GRASS reads gradients in backward, before the module's check: the skipped probing step's
    # reading (4 blocks) and the skipped training step's (its 2 active blocks) end up in the next
    # measurement, which is skipped as non-finite, one count per block; no estimate takes them.
    assert int(schedule["importance"]["nonfinite"]) == 6
    assert trainer.callback_metrics["train/nonfinite_steps"] == 2


def test_clipping_reuses_the_finiteness_norm_and_bounds_every_update():
    import torch
    from lightning.pytorch import Callback

    from grass_lightning import FineTuningModule
    from tests.helpers.models import VOCAB, quiet_trainer, tiny_hf

    class Norms(Callback):
        def __init__(self):
            self.seen = []

        def on_train_start(self, trainer, module):
            def after_step(optimizer, args, kwargs):
                grads = [p.grad for p in module.parameters() if p.grad is not None]
                self.seen.append((float(module._grad_norm), float(torch.nn.utils.get_total_norm(grads))))

            trainer.optimizers[0].register_step_post_hook(after_step)

    tokens = torch.randint(0, VOCAB, (6 * 4, 8), generator=torch.Generator().manual_seed(0))
    module = FineTuningModule(tiny_hf("llama"), _PoisonedTokens(), OptimConfig(lr=1e-2, warmup_steps=0, gradient_clip_val=0.05))
    norms = Norms()
    quiet_trainer(max_steps=6, callbacks=[norms]).fit(module, torch.utils.data.DataLoader(tokens, batch_size=4))
    assert len(norms.seen) == 6
    assert all(raw > 0.05 for raw, _ in norms.seen)  # clipping had work to do
    assert all(clipped == pytest.approx(0.05, rel=1e-3) for _, clipped in norms.seen)


class _UpdateLRs(Callback):
    """The learning rate of every optimizer step that updates something (a probe step updates nothing)."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if any(p.grad is not None for p in pl_module.parameters()):
            self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("probe_steps", [3, 12])
def test_probe_steps_leave_the_warmup_to_the_updates(probe_steps):
    """GRASS's first update runs at the LR of LISA's first update, with the same max_steps both make
    the same number of updates, and the schedule counts updates (warm-up 3, cosine to max_steps)."""
    import torch

    from grass_lightning import GrassCallback, FineTuningModule
    from tests.helpers.models import VOCAB, quiet_trainer, tiny_hf

    tokens = torch.randint(0, VOCAB, (24 * 4, 8), generator=torch.Generator().manual_seed(0))
    lrs = {}
    for sampler, probe in (("uniform", 0), ("grass", probe_steps)):
        module = FineTuningModule(tiny_hf("llama"), _PoisonedTokens(), OptimConfig(lr=1e-2, warmup_steps=3))
        seen = _UpdateLRs()
        grass = GrassCallback(num_active=2, sampling_period=2, probe_steps=probe, sampler=sampler, seed=0)
        trainer = quiet_trainer(max_steps=8, callbacks=[grass, seen])
        trainer.fit(module, torch.utils.data.DataLoader(tokens, batch_size=4))
        assert trainer.global_step == 8 + probe
        lrs[sampler] = seen.lrs
    expected = [1e-2 * lr_factor(step, warmup=3, total=8, kind="cosine") for step in range(8)]
    assert lrs["uniform"] == pytest.approx(expected)
    assert lrs["grass"] == pytest.approx(expected)


def test_a_run_whose_every_loss_is_nan_stops_with_a_clear_error_instead_of_running_forever():
    """Skipped non-finite steps do not count toward max_steps, so an all-NaN run never ended."""
    import torch

    from grass_lightning import FineTuningModule
    from tests.helpers.models import VOCAB, quiet_trainer, tiny_hf

    tokens = torch.randint(0, VOCAB - 1, (12 * 4, 8), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = _PoisonedTokens.POISON  # every batch
    module = FineTuningModule(tiny_hf("llama"), _PoisonedTokens(), OptimConfig(lr=1e-2, max_nonfinite_steps=5))
    trainer = quiet_trainer(max_steps=3)
    with pytest.raises(FloatingPointError, match=r"5 optimizer steps in a row .*optim\.max_nonfinite_steps=5.*max_length"):
        trainer.fit(module, torch.utils.data.DataLoader(tokens, batch_size=4))
    assert module.nonfinite_steps == 5 and trainer.global_step == 0


def test_nonfinite_steps_that_are_not_in_a_row_do_not_stop_the_run():
    import torch

    from grass_lightning import FineTuningModule
    from tests.helpers.models import VOCAB, quiet_trainer, tiny_hf

    tokens = torch.randint(0, VOCAB - 1, (12 * 4, 8), generator=torch.Generator().manual_seed(0))
    tokens[::8, 0] = _PoisonedTokens.POISON  # every other batch
    module = FineTuningModule(tiny_hf("llama"), _PoisonedTokens(), OptimConfig(lr=1e-2, max_nonfinite_steps=2))
    trainer = quiet_trainer(max_steps=6)
    trainer.fit(module, torch.utils.data.DataLoader(tokens, batch_size=4))
    assert module.nonfinite_steps == 6 and trainer.global_step == 6


@pytest.mark.slow
def test_nonfinite_steps_in_a_row_stop_the_app_early(tmp_path, monkeypatch):
    from grass_lightning.app.tasks import ChoiceScoring

    real = ChoiceScoring.loss
    monkeypatch.setattr(ChoiceScoring, "loss", lambda self, model, batch: real(self, model, batch) * float("nan"))
    data = write_jsonl(tmp_path / "mc.jsonl", choice_rows())
    cfg = compose_run(tmp_path / "run", "model=tiny_llama", "data=jsonl", f"data.path={data}",
                      "method.probe_steps=1", "optim.max_nonfinite_steps=4", "trainer.max_steps=3", "test_before=false")
    with pytest.raises(FloatingPointError, match=r"4 optimizer steps in a row"):
        run.train(cfg)
