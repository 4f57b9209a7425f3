"""What each fine-tuning method costs, measured side by side: step time, peak memory, optimizer state.

    grass-bench                                  # SmolLM2-135M, batch 8, seq 128
    grass-bench --model llama_1b --precision bf16-true   # on a GPU, random weights

Every method trains in its own Python process, so each peak is its own, the way `train.py`
trains: Lightning, `FineTuningModule`, the method's callback or optimizer and (for ``+park``/
``+stream``) the offloading strategy. The peers run their own code: BAdam is the ``badam``
package's ``BlockOptimizer``; LoRA is peft. ``lisa`` is LISA as published (LMFlow's rule), run
by our GrassCallback, as the table's implementation column says. Batches are random tokens:
what a step costs does not depend on their values.

``--precision bf16-true`` loads and trains each row with bf16 weights the way its authors run it:
GRASS with fp32 masters of what it trains, BAdam with its fp32 copy of the active block, LISA in
pure bf16 (LMFlow's script); full fine-tuning runs as people run it in bf16, ``bf16-mixed`` (fp32
weights under bf16 autocast). The table's precision column says which.

A row's steps: GRASS's probe steps, 2 warm-up steps, ``--steps`` timed steps, ``--memory-steps``
steps whose peak memory is taken one by one, then for a layer-wise method ``--deep-steps`` steps
whose active set is forced to include the lowest block (backward then runs through every block:
the deepest draw a run can make). Peak memory is CUDA's peak allocated on a GPU, the process's
peak resident set on CPU. A step's own peak on CPU needs the freed heap handed back to the OS
first (``malloc_trim``), and the page faults that follow slow the next step by up to a tenth, so
the timed steps are never reset: their time is the median of their own, and their memory the
most since the probe ended.

The ``+ddp`` and ``+fsdp2`` rows train on 2 processes (``trainer=ddp``, ``trainer=fsdp``), each
with the batch size given, so a step sees twice the rows; their memory is the most of either
process, and their weights column says what one process holds (FSDP2: its shards, about half).

Reported: the median time of the timed steps (probe steps apart); the peak of the median
memory step, the most of the probe steps and of the deep steps, and the whole-run peak (the
most of every step); the mean number of blocks backward runs through; the most optimizer-state
bytes on the training device after a step; the bytes of weights a process holds; the most
parameters trained in one step; each as a ratio to full fine-tuning. Writes ``bench.json``, ``bench.md`` and ``bench.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchmetrics
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.distributed.tensor import DTensor

from grass_lightning.app.lm_loss import causal_lm_loss
from grass_lightning.core.blocks import find_blocks
from grass_lightning.core.checks import require_int
from grass_lightning.lightning.stats import RunStats, current_memory_mb, peak_memory_mb, reset_peak_memory

ROWS = {  # the bench's rows: overrides of the Hydra config (conf/method), and whose code runs
    "full": (["method=full"], "torch AdamW"),
    "lora": (["method=lora"], "peft"),
    "badam": (["method=badam"], "badam BlockOptimizer"),
    "lisa": (["method=lisa"], "grass_lightning, LMFlow's rule"),
    "grass-uniform": (["method=grass", "method.sampler=uniform"], "grass_lightning"),
    "grass": (["method=grass"], "grass_lightning"),
    "grass+recompute-probe": (["method=grass", "method.recompute=probe"], "grass_lightning"),
    "grass+recompute-none": (["method=grass", "method.recompute=none"], "grass_lightning"),
    "grass+park": (["method=grass", "method.offload=park", "method.idle_moments=keep"], "grass_lightning"),
    "grass+stream": (["method=grass", "method.offload=stream"], "grass_lightning"),
    "grass+ddp": (["method=grass", "trainer=ddp"], "grass_lightning, Lightning DDP, 2 processes"),
    "grass+fsdp2": (["method=grass", "trainer=fsdp"], "grass_lightning, Lightning FSDP2, 2 processes"),
}


class _NextToken:
    """Causal-LM loss on the batch itself: the `Task` `FineTuningModule` trains in the benchmark,
    over rows of token ids."""

    score_name = "loss"

    def collate(self, rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(rows)

    collate_eval = collate

    def metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection({"loss": torchmetrics.MeanMetric()})

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(model, batch, batch)  # as the app's causal-LM tasks compute it

    @torch.no_grad()
    def update(self, metrics: torchmetrics.MetricCollection, model, batch: torch.Tensor) -> None:
        metrics["loss"].update(self.loss(model, batch))


class _Footprint(Callback):
    """Per optimizer step: its peak memory since the last reset, how many blocks backward runs
    through (from the lowest block taking a gradient up; all of them when the embeddings train);
    the most optimizer-state bytes on the training device after a step (moments, and fp32
    masters: GRASS's in the state, BAdam's as its base optimizer's parameters); and from step
    ``deep_from`` on, an active set forced to include the lowest block.

    Peaks are reset when training starts, at step ``probe`` (the probe's end) and before every
    step from ``reset_from`` on. Put it before `RunStats` in the callbacks, so a reset is not timed."""

    def __init__(self, method, probe: int, reset_from: int, deep_from: int | None) -> None:
        self.layout, self.method, self.deep_from = None, method, deep_from
        self._resets = lambda index: index in (0, probe) or index >= reset_from
        self.most = 0
        self.start_mb: float | None = None
        self.peaks: list[float] = []
        self.depths: list[int] = []
        self._steps = 0
        self._open = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.layout = find_blocks(pl_module.model)  # the parameters as trained: FSDP2 replaces them when it shards
        self.start_mb = current_memory_mb(pl_module.device)
        self._steps = trainer.global_step
        self.weights_mb = sum(_local(p).untyped_storage().nbytes() for p in pl_module.parameters()) / 2**20

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._open:  # the first micro-batch of a step
            if self._resets(len(self.peaks)):
                reset_peak_memory(pl_module.device, release_cache=False)
            self._open = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if any(p.requires_grad for p in self.layout.embeddings):
            self.depths.append(len(self.layout))
            return
        lowest = next((i for i, block in enumerate(self.layout.blocks)
                       if any(p.requires_grad for p in block.parameters())), len(self.layout))
        self.depths.append(len(self.layout) - lowest)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._steps:
            return  # a micro-batch within a step
        self._steps, self._open = trainer.global_step, False
        self.peaks.append(peak_memory_mb(pl_module.device))
        bases = [self.method.stepping_optimizer(opt) for opt in trainer.optimizers]  # BAdam's wraps AdamW
        held = sum(_local(t).untyped_storage().nbytes() for base in bases for param_state in base.state.values()
                   for t in param_state.values() if torch.is_tensor(t) and t.dim() > 0 and t.device == pl_module.device)
        model = {id(p) for p in pl_module.parameters()}  # BAdam steps fp32 copies of its block: masters too
        held += sum(p.untyped_storage().nbytes() for base in bases for group in base.param_groups
                    for p in group["params"] if id(p) not in model)
        self.most = max(self.most, held)
        if self.deep_from is not None and len(self.peaks) >= self.deep_from:
            self.method.force_lowest_block(trainer)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (an FSDP2 shard's local tensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def measure(method: str, args: argparse.Namespace) -> dict | None:
    """Train ``method`` for its steps in this process (and, for a 2-process row, in the one
    Lightning starts beside it); its costs as a dict, on the first process (None on the other)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from grass_lightning.app.models import ModelSpec, weight_dtype
    from grass_lightning.app.module import FineTuningModule, OptimConfig
    from grass_lightning.app.setup import register_method_defaults, setup_method, setup_model, trainer_strategy
    overrides, implementation = ROWS[method]
    overrides = [f"model={args.model}", f"model.gradient_checkpointing={args.gradient_checkpointing}", *overrides]
    if method == "badam":
        overrides.append(f"method.switch_block_every={args.sampling_period}")
    elif method not in ("full", "lora"):
        overrides.append(f"method.sampling_period={args.sampling_period}")
    register_method_defaults()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    built = setup_method(cfg.method, seed=0)
    if args.probe_steps is not None and built.probe_steps:  # rows that probe
        cfg.method.probe_steps = args.probe_steps
        built = setup_method(cfg.method, seed=0)
    spec = ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
    if spec.kind != "causal_lm":
        raise ValueError(f"--model {args.model}: the benchmark trains causal LMs; {spec.name} is a {spec.kind}.")
    precision = row_precision(method, args.precision)
    probe = built.probe_steps  # none for LISA, full, LoRA, BAdam
    skip = 2 + probe  # GrassCallback runs the probe steps before max_steps updates
    deep = args.deep_steps if method not in ("full", "lora") else 0  # their every step is full-depth
    seed_everything(0)
    model = setup_model(spec, built, dtype=weight_dtype(precision))
    optim = OptimConfig(lr=built.lr, warmup_steps=0, lr_schedule="constant", accumulate_grad_batches=args.accumulate)
    module = FineTuningModule(model, _NextToken(), optim, built.wrap_optimizer, blocks=built.blocks)
    steps = skip + args.steps + args.memory_steps + deep
    vocab = model.get_input_embeddings().num_embeddings
    rows = steps * args.batch_size * args.accumulate
    tokens = torch.randint(0, vocab, (rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    stats = RunStats(warmup_steps=skip)
    memory_from, deep_from = skip + args.steps, skip + args.steps + args.memory_steps
    state = _Footprint(built, probe, reset_from=memory_from, deep_from=deep_from if deep else None)
    devices = cfg.trainer.devices
    trainer = Trainer(accelerator=args.accelerator, devices=devices, precision=precision, max_steps=steps - probe,
                      strategy=trainer_strategy(cfg.trainer.get("strategy", "auto"), built, devices, precision=precision),
                      use_distributed_sampler=False,  # every process its own random rows: the cost is the same
                      callbacks=[*built.callbacks, state, stats], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(tokens, batch_size=args.batch_size, collate_fn=module.task.collate))
    timed, memory, deeps = slice(skip, memory_from), slice(memory_from, deep_from), slice(deep_from, None)
    peaks = _most_of_every_process(trainer, state.peaks)
    if trainer.global_rank != 0:
        return None
    return {
        "method": method,
        "implementation": implementation,
        "configuration": built.describe(),
        "precision": _precision_cell(built, precision),
        "step_time_s": statistics.median(stats.step_times[timed]),
        "probe_step_time_s": statistics.median(stats.step_times[:probe]) if probe else None,
        "median_step_peak_mb": statistics.median(peaks[memory]),
        "timed_steps_peak_mb": max(peaks[timed]),
        "probe_peak_mb": max(peaks[:probe]) if probe else None,
        "deep_step_peak_mb": max(peaks[deeps]) if deep else None,
        "whole_run_peak_mb": max(peaks),
        "start_memory_mb": state.start_mb,
        "processes": trainer.world_size,
        "weights_mb": state.weights_mb,
        "optimizer_state_mb": state.most / 2**20,
        "trainable_params": stats.trainable_params_max,
        "timed_steps": len(stats.step_times[timed]),
        "backward_blocks": statistics.mean(state.depths[timed]),
        "deep_backward_blocks": statistics.mean(state.depths[deeps]) if deep else None,
        "device": str(module.device),
    }


def _most_of_every_process(trainer: Trainer, peaks: list[float]) -> list[float]:
    """Per step, the highest peak of any process (the one the device must hold)."""
    if trainer.world_size == 1:
        return peaks
    every = [None] * trainer.world_size
    torch.distributed.all_gather_object(every, peaks)
    return [max(step) for step in zip(*every)]


def row_precision(method: str, precision: str) -> str:
    """The precision a row trains in: ``--precision``, except that full fine-tuning "in bf16" is
    run as people run it, bf16-mixed (fp32 weights under bf16 autocast): pure bf16 AdamW over the
    whole model loses most small updates, which no one reports as full fine-tuning."""
    return "bf16-mixed" if method == "full" and precision == "bf16-true" else precision


def _precision_cell(built, precision: str) -> str:
    """How the row holds its weights, as a table cell."""
    if precision == "bf16-mixed":
        return "bf16-mixed: fp32 weights, bf16 autocast"
    return built.bf16_weights() if precision == "bf16-true" else precision


def table(rows: list[dict]) -> str:
    """Markdown: each cost and its ratio to full fine-tuning (the first row named ``full``)."""
    base = next((r for r in rows if r["method"] == "full"), None)

    def cell(row, key, fmt):
        if row.get(key) is None:
            return "–"
        ratio = f" ({row[key] / base[key]:.2f}×)" if base and base.get(key) else ""
        return f"{row[key]:{fmt}}{ratio}"

    lines = ["| method | code | configuration | precision | step time (s) | probe step (s) | blocks back-propagated | "
             "peak, median step (MB) | peak, probe (MB) | peak, lowest block drawn (MB) | whole-run peak (MB) | "
             "optimizer state and masters on device (MB) | weights per process (MB) | trained params |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peaks = [cell(r, "median_step_peak_mb", ".0f")]  # the others against full's whole-run peak
        for key in ("probe_peak_mb", "deep_step_peak_mb", "whole_run_peak_mb"):
            ratio = f" ({r[key] / base['whole_run_peak_mb']:.2f}×)" if r[key] is not None and base else ""
            peaks.append("–" if r[key] is None else f"{r[key]:.0f}{ratio}")
        depth = f"{r['backward_blocks']:.1f}" + ("" if r["deep_backward_blocks"] is None else f" ({r['deep_backward_blocks']:.0f} deep)")
        lines.append(f"| {r['method']} | {r['implementation']} | {r['configuration']} | {r.get('precision', '32-true')} | "
                     f"{cell(r, 'step_time_s', '.3f')} | "
                     f"{cell(r, 'probe_step_time_s', '.3f')} | {depth} | {' | '.join(peaks)} | "
                     f"{cell(r, 'optimizer_state_mb', '.1f')} | {cell(r, 'weights_mb', '.1f')} | "
                     f"{r['trainable_params'] / 1e6:.2f}M |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bars of each cost as a ratio to full fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["method"] == "full")
    labels = {"step_time_s": "step time", "median_step_peak_mb": "peak, median step",
              "whole_run_peak_mb": "whole-run peak", "optimizer_state_mb": "optimizer state on device"}
    fig, ax = plt.subplots(figsize=(9, 3.5))
    width = 0.8 / len(labels)
    for i, (key, label) in enumerate(labels.items()):
        ratios = [r[key] / base[key] if base[key] else 0.0 for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], ratios, width, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([x + 1.5 * width for x in range(len(rows))], [r["method"] for r in rows], fontsize=8)
    ax.set_ylabel("ratio to full fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def argument_parser() -> argparse.ArgumentParser:
    """The bench's arguments (the planner reads a bench run's recorded command with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a config in conf/model (a causal LM)")
    parser.add_argument("--methods", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches of --batch-size per optimizer step")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per method")
    parser.add_argument("--memory-steps", type=int, default=5,
                        help="steps after the timed ones whose peak memory is taken one by one (untimed)")
    parser.add_argument("--deep-steps", type=int, default=2,
                        help="layer-wise methods: steps after the timed ones whose active set includes the lowest block")
    parser.add_argument("--sampling-period", type=int, default=5,
                        help="LISA/GRASS steps per active set; short, so several sets fall in the timed steps")
    parser.add_argument("--probe-steps", type=int, default=None, help="GRASS probe steps (default: the method's)")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="every row recomputes block activations in backward (model.gradient_checkpointing=true)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method, print its JSON
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser()
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in ROWS]
    if unknown:
        parser.error(f"--methods: {unknown[0]!r} is not one of {', '.join(ROWS)}")
    minimums = {"deep_steps": 0, **dict.fromkeys(("batch_size", "seq_len", "accumulate", "steps", "memory_steps",
                                                   "sampling_period"), 1)}
    for name, minimum in minimums.items():
        try:
            require_int(f"--{name.replace('_', '-')}", getattr(args, name), minimum)
        except ValueError as error:
            parser.error(str(error))
    if "badam" in methods:
        try:
            import badam  # noqa: F401
        except ImportError:
            parser.error('--methods: badam needs the badam package: pip install "grass-lightning[peers]"')
    if args.one:
        from grass_lightning.app.setup import configure_console

        configure_console()
        row = measure(args.one, args)
        if row is not None:  # the first process of a row
            print("RESULT " + json.dumps(row), flush=True)
        if torch.distributed.is_initialized():  # both processes leave together: gloo aborts a lone exit
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return

    args.out.mkdir(parents=True, exist_ok=True)
    rows, started = [], time.perf_counter()
    for method in methods:
        command = [sys.executable, "-m", "grass_lightning.tools.bench", "--one", method, *(argv if argv is not None else sys.argv[1:])]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        result = next((line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
        if done.returncode != 0 or result is None:
            sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(result))
        print(f"{method:>15}: {rows[-1]['step_time_s']:.3f} s/step, whole-run peak {rows[-1]['whole_run_peak_mb']:.0f} MB, "
              f"optimizer state {rows[-1]['optimizer_state_mb']:.1f} MB on {rows[-1]['device']}", flush=True)
    report = {
        "command": "grass-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "batch_size": args.batch_size, "accumulate": args.accumulate, "seq_len": args.seq_len,
        "precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing,
        "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "wall_time_s": round(time.perf_counter() - started),
        "rows": rows,
    }
    markdown = table(rows)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench.md").write_text(f"`{report['command']}` ({report['date']}, {report['machine']}, "
                                       f"{report['wall_time_s']} s)\n\n{markdown}")
    if any(r["method"] == "full" for r in rows):
        plot(rows, args.out / "bench.png")
    print(markdown, end="")
    print(f"written: {args.out / 'bench.md'}, bench.json, bench.png ({report['wall_time_s']} s)")


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"


if __name__ == "__main__":
    main()
