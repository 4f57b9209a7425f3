"""GrassCallback inside users' own LightningModules, driven by a real Trainer."""

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from grass_lightning import GrassCallback
from grass_lightning.lightning.progress import GrassProgressBar
from tests.helpers.models import HFModule, ScaledModule, hf_loss, quiet_trainer, regression_loader, token_loader


class Spy(Callback):
    """Records, per optimizer step, the active set, the parameters that changed and the exact RMS
    of every block's gradient as the optimizer sees it. Place it after GrassCallback."""

    def __init__(self, grass: GrassCallback) -> None:
        self.grass = grass
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "_before"):
            self._before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self._active = (list(self.grass.schedule.active), self.grass.schedule.probing)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._rms = {}
        for i, block in enumerate(self.grass.schedule.active_set.layout.blocks):
            grads = [p.grad for p in block.parameters() if p.grad is not None]
            if grads:
                sq = sum(g.double().square().sum() for g in grads)
                self._rms[i] = (sq / sum(p.numel() for p in block.parameters())).sqrt().item()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not hasattr(self, "_rms"):
            return  # mid-accumulation
        changed = {n for n, p in pl_module.named_parameters() if not torch.equal(p, self._before[n])}
        active, probing = self._active
        self.steps.append(dict(active=active, probing=probing, changed=changed, rms=self._rms,
                               estimate=self.grass.schedule.importance.estimate.clone()))
        del self._before, self._rms


def _changed_blocks(names, path):
    prefix = path + "."
    return {int(n[len(prefix):].split(".")[0]) for n in names if n.startswith(prefix)}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert", "gpt_neox"])
def test_only_active_blocks_and_head_train_in_hugging_face_models(family):
    grass = GrassCallback(num_active=2, sampling_period=3, refresh_interval=3, probe_steps=2, seed=0)
    spy = Spy(grass)
    trainer = quiet_trainer(max_steps=9, callbacks=[grass, spy])
    trainer.fit(HFModule(family), token_loader())
    path = "model." + {"llama": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers",
                       "bert": "bert.encoder.layer", "gpt_neox": "gpt_neox.layers"}[family]
    assert [s["probing"] for s in spy.steps] == [True, True] + [False] * 9  # max_steps counts updates
    assert trainer.global_step == 11 and trainer.max_steps == 9  # the probe steps on top; max_steps given back
    for step in spy.steps:
        if step["probing"]:
            assert step["changed"] == set()  # probing updates nothing
        else:
            assert _changed_blocks(step["changed"], path) == set(step["active"])
            outside = {n for n in step["changed"] if not n.startswith(path + ".")}
            assert outside and not any("embed" in n or ".wte." in n or ".wpe." in n for n in outside)
    assert len(grass.state_dict()["history"]) == 4


def test_plain_module_with_explicit_blocks_path():
    grass = GrassCallback(num_active=1, sampling_period=2, refresh_interval=2, probe_steps=0,
                          blocks="net.body.layers", sampler="uniform", seed=0)
    spy = Spy(grass)
    quiet_trainer(max_steps=30, callbacks=[grass, spy]).fit(ScaledModule(), regression_loader())
    trained = set()
    for step in spy.steps[1:]:
        assert _changed_blocks(step["changed"], "net.body.layers") == set(step["active"])
        trained |= set(step["active"])
    assert trained == {0, 1, 2, 3}  # uniform visits every block


def test_importance_is_the_gradient_rms_without_accumulation():
    # refresh every step with ema=1: the estimate of each active block is that step's r_l
    grass = GrassCallback(num_active=2, sampling_period=4, refresh_interval=1, ema=1.0, probe_steps=1, seed=0)
    spy = Spy(grass)
    quiet_trainer(max_steps=7, callbacks=[grass, spy]).fit(HFModule("llama"), token_loader())
    assert len(spy.steps) == 8
    for step in spy.steps[1:]:
        assert sorted(step["rms"]) == step["active"]  # only active blocks have gradients
        for block, rms in step["rms"].items():
            assert step["estimate"][block].item() == pytest.approx(rms, rel=1e-5)


def test_with_accumulation_probe_and_refresh_measure_the_same_quantity():
    """Same micro-batches, same weights (lr=0): the probe's estimate of a block and a refresh's
    must agree, or blocks measured only by the probe enter the softmax at another scale."""
    grass = GrassCallback(num_active=2, sampling_period=1, refresh_interval=1, ema=1.0, probe_steps=1, seed=0)
    spy = Spy(grass)
    micro_batches = token_loader(n_batches=3)  # one optimizer step of 3 micro-batches per epoch, unshuffled
    quiet_trainer(max_steps=8, max_epochs=-1, accumulate_grad_batches=3, callbacks=[grass, spy]).fit(
        HFModule("llama", lr=0.0), micro_batches
    )
    probe = spy.steps[0]["estimate"]
    assert len(spy.steps) == 9 and not probe.isnan().any()
    compared = set()
    for step in spy.steps[1:]:
        for block in step["active"]:
            assert step["estimate"][block].item() == pytest.approx(probe[block].item(), rel=0.10), block
            compared.add(block)
    assert len(compared) >= 3


class _HeldAfterBackward(Callback):
    """Parameters of the blocks that hold a gradient after each backward pass."""

    def __init__(self):
        self.held = []

    def on_after_backward(self, trainer, pl_module):
        self.held.append(sum(p.grad is not None for p in pl_module.model.model.layers.parameters()))


def test_probe_with_accumulation_holds_no_gradients_and_updates_nothing():
    grass = GrassCallback(num_active=1, probe_steps=3, seed=0)
    spy, held = Spy(grass), _HeldAfterBackward()
    quiet_trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[grass, spy, held]).fit(
        HFModule("llama"), token_loader()
    )
    probing = [s for s in spy.steps if s["probing"]]
    assert len(probing) == 3 and all(s["changed"] == set() and s["rms"] == {} for s in probing)
    assert held.held[:6] == [0] * 6  # every micro-batch's block gradients were read and freed in backward
    assert held.held[6] > 0  # the update that follows keeps its active block's gradients
    assert not grass.state_dict()["importance"]["estimate"].isnan().any()


class ManualModule(HFModule):
    def __init__(self, lr: float = 1e-2):
        super().__init__("llama", lr)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = hf_loss(self.model, batch[0])
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()
        return loss


def test_manual_optimization():
    grass = GrassCallback(num_active=1, sampling_period=2, refresh_interval=2, probe_steps=2, seed=0)
    spy = Spy(grass)
    quiet_trainer(max_steps=8, callbacks=[grass, spy]).fit(ManualModule(), token_loader())
    assert [s["probing"] for s in spy.steps] == [True, True] + [False] * 8
    for step in spy.steps:
        blocks = _changed_blocks(step["changed"], "model.model.layers")
        assert blocks == (set() if step["probing"] else set(step["active"]))
    assert not grass.state_dict()["importance"]["estimate"].isnan().any()


class FilteringModule(HFModule):
    """Builds its optimizer over trainable parameters only, as many projects do."""

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def test_lisa_bug_cannot_happen_every_block_is_in_the_optimizer_and_trains():
    grass = GrassCallback(num_active=1, sampling_period=1, probe_steps=0, sampler="uniform", seed=0)
    spy = Spy(grass)
    quiet_trainer(max_steps=20, callbacks=[grass, spy]).fit(FilteringModule(), token_loader())
    trained = set().union(*(_changed_blocks(s["changed"], "model.model.layers") for s in spy.steps))
    assert trained == {0, 1, 2, 3}


def test_module_that_froze_blocks_before_building_the_optimizer_is_told_how_to_fix_it():
    class EarlyFreeze(FilteringModule):
        def configure_optimizers(self):
            for p in self.model.model.layers[2:].parameters():
                p.requires_grad_(False)
            opt = super().configure_optimizers()
            for p in self.model.model.layers[2:].parameters():
                p.requires_grad_(True)
            return opt

    with pytest.raises(ValueError, match=r"model\.model\.layers\.2\..* is in no optimizer.*all parameters"):
        quiet_trainer(max_steps=2, callbacks=[GrassCallback()]).fit(EarlyFreeze(), token_loader())


def test_teardown_gives_back_the_users_requires_grad_flags():
    module = HFModule("llama")
    quiet_trainer(max_steps=3, callbacks=[GrassCallback(num_active=1, probe_steps=1)]).fit(module, token_loader())
    assert all(p.requires_grad for p in module.parameters())


def test_bf16_mixed_precision_gives_finite_importance():
    grass = GrassCallback(num_active=1, sampling_period=2, refresh_interval=2, probe_steps=2, seed=0)
    quiet_trainer(max_steps=6, precision="bf16-mixed", callbacks=[grass]).fit(HFModule("llama"), token_loader())
    estimate = grass.state_dict()["importance"]["estimate"]
    assert torch.isfinite(estimate).all() and (estimate > 0).all()


def test_fp16_loss_scaling_is_never_read_as_gradient():
    from lightning.pytorch.plugins import MixedPrecision

    grass = GrassCallback(num_active=2, sampling_period=2, refresh_interval=1, ema=1.0, probe_steps=2, seed=0)
    spy = Spy(grass)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    quiet_trainer(max_steps=6, plugins=[plugin], callbacks=[grass, spy]).fit(HFModule("llama"), token_loader())
    probe_estimate = spy.steps[1]["estimate"]
    assert (probe_estimate < 0.1).all()  # unscaled: gradient RMS of a tiny model, not 4096 times it
    for step in spy.steps[2:]:
        for block, rms in step["rms"].items():
            assert step["estimate"][block].item() == pytest.approx(rms, rel=1e-5)
    assert all(s["changed"] == set() for s in spy.steps[:2])  # probing still updates nothing


def test_fp16_with_accumulation_reads_the_quantity_fp32_reads():
    """Under a loss scaler the readings are taken in backward and the scale divided out, as on any
    other path: per micro-batch, not the accumulated gradient (half the value here)."""
    from lightning.pytorch.plugins import MixedPrecision

    estimates = {}
    for precision in ("32-true", "16-mixed"):
        grass = GrassCallback(num_active=2, probe_steps=1, seed=0)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
                   ] if precision == "16-mixed" else []
        quiet_trainer(max_steps=1, accumulate_grad_batches=4, plugins=plugins, callbacks=[grass]).fit(
            HFModule("llama"), token_loader(n_batches=8, batch=8))
        estimates[precision] = grass.state_dict()["importance"]["estimate"]
    torch.testing.assert_close(estimates["16-mixed"], estimates["32-true"], rtol=0.02, atol=0)


def test_importance_probabilities_and_active_set_are_logged_against_the_step_they_describe(tmp_path):
    import csv

    grass = GrassCallback(num_active=2, sampling_period=2, refresh_interval=2, probe_steps=2, seed=0)
    spy = Spy(grass)
    trainer = quiet_trainer(max_steps=5, callbacks=[grass, spy], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(HFModule("llama"), token_loader())
    with (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("grass/probing")]
    for block in range(4):
        for kind in ("importance", "probability", "active"):
            assert f"grass/{kind}/{block:02d}" in rows[0]
    assert "grass/nonfinite" in rows[0]
    assert len(rows) == len(spy.steps) == 7
    for row, step in zip(rows, spy.steps):  # a draw step logs the set it trained, not the next one
        assert float(row["grass/probing"]) == float(step["probing"])
        logged = [b for b in range(4) if float(row[f"grass/active/{b:02d}"]) == 1.0]
        trained = _changed_blocks(step["changed"], "model.model.layers")
        assert logged == sorted(trained) == ([] if step["probing"] else step["active"])
    module = trainer.lightning_module
    assert not any(k.startswith("active") for k in TQDMProgressBar().get_metrics(trainer, module))  # stock bar: no floats
    assert GrassProgressBar().get_metrics(trainer, module)["active"] == ",".join(map(str, spy.steps[-1]["active"]))


def test_the_grass_bar_says_probe_while_probing():
    class Shown(Callback):
        def __init__(self):
            self.shown = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.shown.append(GrassProgressBar().get_metrics(trainer, pl_module)["active"])

    grass, shown = GrassCallback(num_active=2, probe_steps=3, seed=0), Shown()
    quiet_trainer(max_steps=2, callbacks=[grass, shown]).fit(HFModule("llama"), token_loader())
    assert shown.shown[:3] == ["probe"] * 3 and all("," in s for s in shown.shown[3:]) and len(shown.shown) == 5


def _run_grass(tmp_path, max_steps, ckpt_path=None, checkpoints=False, strategy="auto", idle_moments="drop",
               callbacks=(), precision="32-true"):
    from lightning.pytorch.callbacks import ModelCheckpoint

    grass = GrassCallback(num_active=2, sampling_period=3, refresh_interval=2, probe_steps=2, seed=0,
                          idle_moments=idle_moments)
    callbacks = [grass, *callbacks]
    if checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1))
    module = HFModule("llama")
    trainer = quiet_trainer(max_steps=max_steps, max_epochs=-1, callbacks=callbacks, strategy=strategy,
                            enable_checkpointing=checkpoints, precision=precision)
    trainer.fit(module, token_loader(n_batches=4), ckpt_path=ckpt_path)
    return module, trainer, grass


OFFLOAD_RUNS = [("auto", "drop"), ("auto", "keep"), ("grass_offload", "keep"), ("grass_offload_stream", "keep"),
                ("grass_offload_stream", "drop")]


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize(("strategy", "idle_moments"), OFFLOAD_RUNS, ids=["-".join(r) for r in OFFLOAD_RUNS])
def test_resume_from_a_mid_period_checkpoint_continues_exactly(tmp_path, strategy, idle_moments, precision):
    """12 updates (14 steps with the probe's 2) in one go equal 4 steps + ModelCheckpoint + resume
    (a draw every 3 steps); in bf16-true, fp32 masters and moments included (Lightning's restore
    would cast them to bf16)."""
    full, full_trainer, full_grass = _run_grass(tmp_path, 12, checkpoints=True, strategy=strategy,
                                                idle_moments=idle_moments, precision=precision)
    (ckpt,) = tmp_path.glob("*step=4.ckpt")
    resumed, resumed_trainer, resumed_grass = _run_grass(tmp_path, 12, ckpt_path=ckpt, strategy=strategy,
                                                         idle_moments=idle_moments, precision=precision)
    if precision == "bf16-true":
        state = resumed_trainer.optimizers[0].state_dict()["state"]
        assert any("master" in s for s in state.values())
        assert {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.float32}
        assert {p.dtype for p in resumed.parameters()} == {torch.bfloat16}
    assert resumed_trainer.global_step == full_trainer.global_step == 14
    a, b = full_grass.state_dict(), resumed_grass.state_dict()
    assert a["history"] == b["history"] and len(a["history"]) == 5
    assert torch.equal(a["importance"]["estimate"], b["importance"]["estimate"])
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    sa, sb = full_trainer.optimizers[0].state_dict()["state"], resumed_trainer.optimizers[0].state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


class _CountMoments(Callback):
    """Bytes of each block's Adam moments allocated when the optimizer is about to step."""

    def __init__(self):
        self.resident = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        layers = pl_module.model.model.layers
        self.resident.append({i for i, layer in enumerate(layers) if any(
            t.untyped_storage().nbytes() for p in layer.parameters()
            for k, t in optimizer.state.get(p, {}).items() if k != "step")})


@pytest.mark.parametrize("strategy", ["grass_offload", "grass_offload_stream"])
def test_offloading_strategy_trains_exactly_like_no_offload_and_keeps_idle_moments_off_the_device(tmp_path, strategy):
    plain, plain_trainer, plain_grass = _run_grass(tmp_path, 12, idle_moments="keep")
    count = _CountMoments()
    offloaded, trainer, grass = _run_grass(tmp_path, 12, strategy=strategy, idle_moments="keep", callbacks=[count])
    assert plain_grass.state_dict()["history"] == grass.state_dict()["history"]
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), offloaded.parameters()))
    sa, sb = plain_trainer.optimizers[0].state_dict()["state"], trainer.optimizers[0].state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])
    history = dict(grass.state_dict()["history"])
    active = None
    for step, resident in enumerate(count.resident):
        active = history.get(step, active)
        allowed = set(active or ()) if strategy == "grass_offload" else set((active or [None])[:1])
        assert resident <= allowed, (step, resident, active)  # stream: at most the prefetched first block
    assert any(count.resident)


def test_offloading_strategy_needs_keep_in_park_mode_and_warns_without_grass():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="offload='park' with idle_moments='drop'"):
        quiet_trainer(max_steps=1, strategy="grass_offload", callbacks=[GrassCallback()]).fit(HFModule(), token_loader())
    with pytest.warns(UserWarning, match="found no GrassCallback"):
        quiet_trainer(max_steps=1, strategy="grass_offload").fit(HFModule(), token_loader())


class _FailsAt(HFModule):
    """Raises in training step ``fail_at`` (as an out-of-memory error would), once."""

    def __init__(self, fail_at):
        super().__init__("llama")
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.fail_at:
            self.fail_at = None
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().training_step(batch, batch_idx)


def _installed(module, optimizer=None):
    """What GRASS may leave on a model: frozen flags, hooks in backward, optimizer hooks, parked moments."""
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    hooked = [n for n, p in module.named_parameters() if p._backward_hooks or p._post_accumulate_grad_hooks]
    parked = [] if optimizer is None else [
        k for s in optimizer.state.values() for k, t in s.items()
        if torch.is_tensor(t) and t.dim() and t.untyped_storage().nbytes() == 0]
    optimizer_hooks = [] if optimizer is None else [*optimizer._optimizer_step_pre_hooks, *optimizer._optimizer_step_post_hooks]
    return frozen, hooked, parked, optimizer_hooks


@pytest.mark.parametrize(("fail_at", "strategy"), [(1, "auto"), (5, "auto"), (5, "grass_offload_stream"),
                                                   (5, "grass_offload")], ids=["probe", "training", "stream", "park"])
def test_an_exception_in_fit_leaves_the_model_as_the_user_had_it_and_a_retry_trains(fail_at, strategy):
    module = _FailsAt(fail_at)
    grass = GrassCallback(num_active=1, sampling_period=2, probe_steps=3, seed=0, idle_moments="keep")
    trainer = quiet_trainer(max_steps=8, callbacks=[grass], strategy=strategy)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.fit(module, token_loader())
    assert _installed(module, trainer.optimizers[0]) == ([], [], [], [])
    assert trainer.max_steps == 8
    # the notebook retry: same module, same callback, a new Trainer
    before = {n: p.detach().clone() for n, p in module.model.model.layers.named_parameters()}
    quiet_trainer(max_steps=12, callbacks=[grass], strategy=strategy).fit(module, token_loader())
    changed = {int(n.split(".")[0]) for n, p in module.model.model.layers.named_parameters()
               if not torch.equal(p, before[n])}
    assert len(changed) >= 2  # blocks trained after the retry, not one or none


def test_skipped_batches_are_no_evidence_of_a_zero_gradient():
    class SkipsOddSteps(HFModule):
        def training_step(self, batch, batch_idx):
            return None if batch_idx % 2 else super().training_step(batch, batch_idx)

    grass = GrassCallback(num_active=2, sampling_period=3, refresh_interval=1, ema=1.0, probe_steps=2, seed=0)
    spy = Spy(grass)
    quiet_trainer(max_steps=12, callbacks=[grass, spy]).fit(SkipsOddSteps(), token_loader())
    estimates = torch.stack([s["estimate"] for s in spy.steps[2:]])
    assert not estimates.isnan().any() and (estimates > 0).all()


def test_fp16_with_an_optimizer_that_unscales_in_its_step_is_refused_before_training():
    from lightning.pytorch.plugins import MixedPrecision
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    class Fused(HFModule):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=True)

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module = Fused()
    with pytest.raises(MisconfigurationException, match=r"fp16 loss scaling .*fused=True.*fused=False"):
        quiet_trainer(max_steps=4, plugins=[plugin], callbacks=[GrassCallback(probe_steps=2)]).fit(module, token_loader())
    assert _installed(module)[:2] == ([], [])


def test_probe_steps_hold_a_users_warmup_schedule_in_automatic_optimization():
    """Lightning steps the user's scheduler after every optimizer step, probe steps included; the
    callback undoes that, so the first update runs at the warm-up's first learning rate."""

    class WarmUp(HFModule):
        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
            return [optimizer], [{"scheduler": schedule, "interval": "step"}]

    lrs = {}
    for probe in (0, 3):
        grass = GrassCallback(num_active=2, sampling_period=2, probe_steps=probe, seed=0,
                              sampler="grass" if probe else "uniform")
        spy = Spy(grass)

        class LR(Callback):
            def __init__(self):
                self.lrs = []

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                self.lrs.append(optimizer.param_groups[0]["lr"])

        seen = LR()
        quiet_trainer(max_steps=6, callbacks=[grass, spy, seen]).fit(WarmUp(), token_loader())
        lrs[probe] = [lr for lr, step in zip(seen.lrs, spy.steps) if not step["probing"]]
    assert lrs[0] == lrs[3] == pytest.approx([1e-2 * min(1.0, (s + 1) / 4) for s in range(6)])


def test_probe_steps_hold_a_plateau_scheduler_that_lightning_steps_after_the_batch():
    """Lightning steps ReduceLROnPlateau (interval "step") after on_train_batch_end, where the
    hold used to be: every probe step halved the learning rate of the first update."""

    class Plateau(HFModule):
        def training_step(self, batch, batch_idx):
            self.log("flat", 1.0)  # never improves: each step past the patience halves the LR
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
            return [optimizer], [{"scheduler": plateau, "interval": "step", "monitor": "flat"}]

    class LR(Callback):
        def __init__(self):
            self.lrs = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    firsts = {}
    for probe in (0, 3):
        grass = GrassCallback(num_active=2, probe_steps=probe, seed=0, sampler="grass" if probe else "uniform")
        seen = LR()
        quiet_trainer(max_steps=3, callbacks=[grass, seen]).fit(Plateau(), token_loader())
        firsts[probe] = seen.lrs[probe:]
    assert firsts[3] == firsts[0] == pytest.approx([1e-2, 1e-2, 5e-3])


def test_a_run_bounded_by_max_epochs_alone_gets_all_its_updates_after_the_probe():
    grass = GrassCallback(num_active=2, probe_steps=3, seed=0)
    spy = Spy(grass)
    trainer = quiet_trainer(max_steps=-1, max_epochs=2, callbacks=[grass, spy])
    trainer.fit(HFModule("llama"), token_loader(n_batches=5))
    assert [s["probing"] for s in spy.steps] == [True] * 3 + [False] * 10  # 2 epochs of 5 updates
    assert trainer.global_step == 13 and (trainer.max_steps, trainer.max_epochs) == (-1, 2)  # given back


def test_max_steps_zero_trains_nothing_not_even_a_probe():
    grass = GrassCallback(num_active=2, probe_steps=2, seed=0)
    module = HFModule("llama")
    before = [p.detach().clone() for p in module.parameters()]
    trainer = quiet_trainer(max_steps=0, callbacks=[grass])
    trainer.fit(module, token_loader())
    assert trainer.global_step == 0 and trainer.max_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_reprobe_steps_in_a_lightning_fit_train_the_active_set_and_refresh_every_block():
    grass = GrassCallback(num_active=1, sampling_period=3, refresh_interval=3, probe_steps=2, reprobe_steps=1, seed=0)
    spy = Spy(grass)
    trainer = quiet_trainer(max_steps=9, callbacks=[grass, spy])
    trainer.fit(HFModule("llama"), token_loader())
    training = [s for s in spy.steps if not s["probing"]]
    assert len(training) == 9
    for step in training:
        assert _changed_blocks(step["changed"], "model.model.layers") == set(step["active"])
    for window in range(3):  # each refresh re-measures every block: all four estimates move
        before = training[3 * window - 1]["estimate"] if window else spy.steps[1]["estimate"]
        assert (training[3 * window + 2]["estimate"] != before).all()


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_trains_the_same_blocks_to_the_same_weights_and_the_probe_sees_every_block(
        use_reentrant):
    """LISA implementations under checkpointing get no gradient into active blocks when the input
    does not require grad (reentrant checkpointing); GRASS must train exactly as without it."""

    def fit(checkpointing):
        torch.manual_seed(0)
        module = HFModule("llama")
        if checkpointing:
            module.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        grass = GrassCallback(num_active=2, sampling_period=3, refresh_interval=3, probe_steps=2, seed=0)
        spy = Spy(grass)
        quiet_trainer(max_steps=9, callbacks=[grass, spy]).fit(module, token_loader())
        return module, spy

    plain, plain_spy = fit(False)
    checkpointed, spy = fit(True)
    assert checkpointed.model.is_activation_checkpointing
    for a, b in zip(plain_spy.steps, spy.steps):
        assert _changed_blocks(a["changed"], "model.model.layers") == _changed_blocks(b["changed"], "model.model.layers")
        torch.testing.assert_close(a["estimate"], b["estimate"], rtol=1e-5, atol=1e-8, equal_nan=True)
    assert spy.steps[1]["estimate"].isfinite().all()  # the probe measured all four blocks
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class _Start(Callback):
    """The weights at fit start (after Lightning's bf16-true conversion), for counting what moved."""

    def on_fit_start(self, trainer, pl_module):
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _moved_share_of_trained_blocks(module, start, history):
    trained = {b for _, active in history for b in active}
    moved = total = 0
    for n, p in module.named_parameters():
        if n.startswith("model.model.layers.") and int(n.split(".")[3]) in trained:
            moved += int((p.detach().bfloat16() != start[n].bfloat16()).sum())
            total += p.numel()
    return moved / total


@pytest.mark.parametrize("module_class", [HFModule, ManualModule], ids=["automatic", "manual"])
def test_bf16_true_trains_the_active_blocks_through_fp32_masters(module_class):
    """Trainer(precision="bf16-true") with the user's own module: weights stay bf16, trained
    parameters get fp32 masters and moments, and about as many bf16 weights move at lr 5e-5 as
    in fp32 training; master_weights=False (pure bf16, LISA as LMFlow runs it) moves far fewer."""
    shares = {}
    for precision, masters in (("32-true", True), ("bf16-true", True), ("bf16-true", False)):
        grass = GrassCallback(num_active=2, sampling_period=100, probe_steps=2, seed=0, master_weights=masters)
        start = _Start()
        module = module_class(lr=5e-5)
        trainer = quiet_trainer(max_steps=10, precision=precision, callbacks=[grass, start])
        trainer.fit(module, token_loader())
        shares[precision, masters] = _moved_share_of_trained_blocks(module, start.weights, grass.state_dict()["history"])
        if precision == "bf16-true":
            assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
            state = trainer.optimizers[0].state
            keys = {k for s in state.values() for k in s}
            assert ("master" in keys) == masters
            assert {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == (
                {torch.float32} if masters else {torch.bfloat16})
    assert shares["bf16-true", True] >= 0.9 * shares["32-true", True]
    assert shares["bf16-true", False] < 0.7 * shares["32-true", True]


def test_float16_weights_are_refused_with_what_to_use_instead():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    module = HFModule()
    with pytest.raises(MisconfigurationException, match=r"float16 weights .*16-true.*loss scaling.*bf16-true"):
        quiet_trainer(max_steps=2, precision="16-true", callbacks=[GrassCallback(probe_steps=1)]).fit(module, token_loader())
    assert _installed(module)[:2] == ([], [])
