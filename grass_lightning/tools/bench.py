"""What each fine-tuning method costs, measured side by side: step time, peak memory, optimizer state.

    python -m grass_lightning.bench                                  # SmolLM2-135M, batch 8, seq 128
    python -m grass_lightning.bench --model llama_1b --precision bf16-true   # on a GPU, random weights

Every method trains in its own Python process, so each peak is its own, the way `train.py`
trains: Lightning, `GrassModule`, the method's callback and (for ``+park``/``+stream``) the
offloading strategy. Batches are random tokens: what a step costs does not depend on their
values. Reported per method: the median time of the steps after the first ``skip`` (``skip``
is 2, plus the probe steps for GRASS, which cost about a full fine-tuning step each and are
reported apart), peak memory (CUDA's peak allocated on a GPU, the process's peak resident set
on CPU) and the part of it held before training (libraries, weights), the mean number of blocks
the backward pass runs through (the lowest trained block sets it: the main cost difference
between LISA and GRASS runs, whose active sets differ), the most optimizer-state bytes on the training device after a step, the most
parameters trained in one step, and each as a ratio to full fine-tuning. Writes ``bench.json``,
``bench.md`` and ``bench.png`` into ``--out``.
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

from grass_lightning.lightning.stats import RunStats, current_memory_mb, peak_memory_mb

ROWS = ("full", "lora", "lisa", "grass", "grass+park", "grass+stream")  # the bench's rows: methods and variants
_OVERRIDES = {  # each row as overrides of the Hydra config (conf/method)
    "full": ["method=full"],
    "lora": ["method=lora"],
    "lisa": ["method=lisa"],
    "grass": ["method=grass"],
    "grass+park": ["method=grass", "method.offload=park", "method.idle_moments=keep"],
    "grass+stream": ["method=grass", "method.offload=stream"],
}


class _NextToken:
    """Causal-LM loss on the batch itself: the task `GrassModule` trains in the benchmark."""

    score_name = "loss"

    def metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection({"loss": torchmetrics.MeanMetric()})

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch, labels=batch).loss


class _Footprint(Callback):
    """Memory when training starts (interpreter, libraries, weights), the most bytes the
    optimizer's state holds on the training device after a step, and per step how many blocks
    the backward pass runs through (from the lowest trained block up), which sets its cost."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.most = 0
        self.start_mb: float | None = None
        self.depths: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_mb = current_memory_mb(pl_module.device)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        schedule = next((c.schedule for c in trainer.callbacks if getattr(c, "schedule", None) is not None), None)
        trained = schedule.active if schedule is not None and not schedule.probing else [0]
        self.depths.append(self.num_blocks - min(trained))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        held = sum(t.untyped_storage().nbytes() for opt in trainer.optimizers for state in opt.state.values()
                   for t in state.values() if torch.is_tensor(t) and t.dim() > 0 and t.device == pl_module.device)
        self.most = max(self.most, held)


def measure(method: str, args: argparse.Namespace) -> dict:
    """Train ``method`` for its steps in this process; its costs as a dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from grass_lightning.app.methods import build_method
    from grass_lightning.app.models import ModelSpec, load_model, resolve_model_path
    from grass_lightning.app.module import GrassModule, OptimConfig
    from grass_lightning.app.run import trainer_strategy
    from grass_lightning.core.blocks import find_blocks

    overrides = [f"model={args.model}", f"model.gradient_checkpointing={args.gradient_checkpointing}", *_OVERRIDES[method]]
    if method.startswith(("lisa", "grass")):
        overrides.append(f"method.sampling_period={args.sampling_period}")
    if method.startswith("grass") and args.probe_steps is not None:
        overrides.append(f"method.probe_steps={args.probe_steps}")
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    built = build_method(cfg.method, seed=0)
    spec = ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
    if spec.kind != "causal_lm":
        raise ValueError(f"--model {args.model}: the benchmark trains causal LMs; {spec.name} is a {spec.kind}.")
    probe = sum(c.config.probe_steps for c in built.callbacks)  # none for LISA, full, LoRA
    skip = 2 + probe  # GrassCallback runs the probe steps before max_steps updates
    seed_everything(0)
    model, _ = load_model(spec, resolve_model_path(spec))
    model = built.prepare(model, spec.kind)
    optim = OptimConfig(lr=built.lr, warmup_steps=0, lr_schedule="constant", accumulate_grad_batches=args.accumulate)
    module = GrassModule(model, _NextToken(), optim)
    steps = skip + args.steps
    vocab = model.get_input_embeddings().num_embeddings
    rows = steps * args.batch_size * args.accumulate
    tokens = torch.randint(0, vocab, (rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    stats, state = RunStats(warmup_steps=skip), _Footprint(len(find_blocks(model)))
    trainer = Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=steps - probe,
                      strategy=trainer_strategy("auto", built),
                      callbacks=[*built.callbacks, stats, state], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(tokens, batch_size=args.batch_size))
    return {
        "method": method,
        "step_time_s": stats.step_time_s(),
        "probe_step_time_s": statistics.median(stats.step_times[:probe]) if probe else None,
        "peak_memory_mb": peak_memory_mb(module.device),
        "start_memory_mb": state.start_mb,
        "optimizer_state_mb": state.most / 2**20,
        "trainable_params": stats.trainable_params_max,
        "timed_steps": len(stats.step_times) - skip,
        "backward_blocks": statistics.mean(state.depths[skip:]),
        "device": str(module.device),
    }


def table(rows: list[dict]) -> str:
    """Markdown: each cost and its ratio to full fine-tuning (the first row named ``full``)."""
    base = next((r for r in rows if r["method"] == "full"), None)

    def cell(row, key, fmt):
        ratio = f" ({row[key] / base[key]:.2f}×)" if base and base[key] else ""
        return f"{row[key]:{fmt}}{ratio}"

    lines = ["| method | step time (s) | blocks back-propagated | peak memory (MB) | of which before training (MB) | "
             "optimizer state on device (MB) | trained params | probe step (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        start = "–" if r["start_memory_mb"] is None else f"{r['start_memory_mb']:.0f}"
        probe = "–" if r["probe_step_time_s"] is None else f"{r['probe_step_time_s']:.3f}"
        lines.append(f"| {r['method']} | {cell(r, 'step_time_s', '.3f')} | {r['backward_blocks']:.1f} | "
                     f"{cell(r, 'peak_memory_mb', '.0f')} | {start} | {cell(r, 'optimizer_state_mb', '.1f')} | "
                     f"{r['trainable_params'] / 1e6:.2f}M | {probe} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bars of each cost as a ratio to full fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["method"] == "full")
    labels = {"step_time_s": "step time", "peak_memory_mb": "peak memory", "optimizer_state_mb": "optimizer state on device"}
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(labels)
    for i, (key, label) in enumerate(labels.items()):
        ratios = [r[key] / base[key] if base[key] else 0.0 for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], ratios, width, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([x + width for x in range(len(rows))], [r["method"] for r in rows])
    ax.set_ylabel("ratio to full fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a config in conf/model (a causal LM)")
    parser.add_argument("--methods", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches of --batch-size per optimizer step")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per method")
    parser.add_argument("--sampling-period", type=int, default=5,
                        help="LISA/GRASS steps per active set; short, so several sets fall in the timed steps")
    parser.add_argument("--probe-steps", type=int, default=None, help="GRASS probe steps (default: the method's)")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="every row recomputes block activations in backward (model.gradient_checkpointing=true)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method, print its JSON
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in ROWS]
    if unknown:
        parser.error(f"--methods: {unknown[0]!r} is not one of {', '.join(ROWS)}")
    for name in ("batch_size", "seq_len", "accumulate", "steps", "sampling_period"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)), flush=True)
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
        print(f"{method:>13}: {rows[-1]['step_time_s']:.3f} s/step, peak {rows[-1]['peak_memory_mb']:.0f} MB, "
              f"optimizer state {rows[-1]['optimizer_state_mb']:.1f} MB on {rows[-1]['device']}", flush=True)
    report = {
        "command": "python -m grass_lightning.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
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
