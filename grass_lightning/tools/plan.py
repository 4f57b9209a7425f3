"""Will it fit? A run's memory predicted from the model's config alone (no weights), per method.

    grass-plan model=smollm2 method=grass --device-gb 24                 # one run's plan
    grass-plan model=llama3_8b method=grass trainer.precision=bf16-true --device-gb 80 --seq-len 2048
    grass-plan --table                                                   # popular shapes on 24 and 80 GB
    grass-plan --check docs/results/bench_cpu_smollm2_fsdp2/bench.json   # predicted against measured

The model and method are the Hydra config's (``conf/model``, ``conf/method`` and any override),
as ``train.py`` would run them. Tensor bytes are counted on the model's meta-device skeleton:
weights, gradients of what trains, fp32 masters and Adam moments on the device and on the host
(offload), DDP's gradient buckets. Activations are measured, not guessed
(:mod:`grass_lightning.tools.activations`). The whole-run peak is the most of the probe step,
the end of the deepest draw's backward (the lowest block trained: backward through every block;
plus a working set: one frozen block's activations, as a recomputed block rebuilds them, and one
chunk of the loss's logits) and the optimizer step (fp32 copies of the gradients under master
weights; AdamW's temporary of its largest tensor). On a CPU the process itself holds memory before any tensor (the
interpreter, torch, Lightning, transformers): ``--overhead-mb``, by default measured as the
resident set of a fresh process that imports what a run imports (`process_overhead_mb`).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from grass_lightning.app.lm_loss import CHUNK_ELEMENTS

MB = 2**20
TABLE_MODELS = ("llama3_8b", "qwen2_5_7b", "llama_3b")
CHECKPOINTING = "model.gradient_checkpointing=true"  # how the peers' users run long sequences
TABLE_METHODS = {  # the table's rows: overrides of the Hydra config
    "full, bf16-mixed, gradient checkpointing": ["method=full", "trainer.precision=bf16-mixed", CHECKPOINTING],
    "LoRA r=16, bf16, gradient checkpointing": ["method=lora", "trainer.precision=bf16-true", CHECKPOINTING],
    "BAdam, bf16 + fp32 block copy, gradient checkpointing": ["method=badam", "trainer.precision=bf16-true",
                                                               CHECKPOINTING],
    "LISA γ=2, pure bf16, gradient checkpointing": ["method=lisa", "method.num_active=2", "trainer.precision=bf16-true",
                                                    CHECKPOINTING],
    "GRASS γ=2, bf16 + fp32 masters, recompute idle": ["method=grass", "trainer.precision=bf16-true"],
    "GRASS γ=2, the same, offload stream": ["method=grass", "method.offload=stream", "trainer.precision=bf16-true"],
    "GRASS γ=2, the same, head frozen": ["method=grass", "method.offload=stream", "method.train_head=false",
                                         "trainer.precision=bf16-true"],
}


@dataclass
class Phase:
    """Bytes on the training device (and host) at one moment of a run."""

    name: str
    weights: float = 0.0
    gradients: float = 0.0
    masters: float = 0.0
    moments: float = 0.0
    buffers: float = 0.0  # DDP's gradient buckets
    activations: float = 0.0
    working: float = 0.0  # backward's working set
    host: float = 0.0  # moments and masters offloaded to host memory
    overhead: float = 0.0  # the CPU process itself
    host_is_device: bool = False  # training on the CPU: host memory is the device's

    @property
    def device(self) -> float:
        return (self.weights + self.gradients + self.masters + self.moments + self.buffers + self.activations
                + self.working + self.overhead + (self.host if self.host_is_device else 0.0))


@dataclass
class Plan:
    """What a run needs: its phases and the whole-run peak (their most)."""

    label: str
    phases: list[Phase] = field(default_factory=list)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda phase: phase.device)


@dataclass
class RunShape:
    """What the plan depends on besides the model, method and precision."""

    batch_size: int
    seq_len: int
    processes: int = 1  # DDP ranks (each holds the whole model)
    updates: int = 300  # how many draws so far bounds what idle_moments=keep and park hold
    overhead_mb: float = 0.0
    cpu: bool = False  # training on the CPU: offloaded state stays in the same memory


class Planner:
    """The model's skeleton, its blocks and its measured activations for one method and
    precision (``cfg``: a composed ``conf/train.yaml``); `plan` then costs any `RunShape`."""

    def __init__(self, cfg) -> None:
        from omegaconf import OmegaConf

        from grass_lightning.app.models import ModelSpec, _blueprint, resolve_model_path, weight_dtype
        from grass_lightning.app.setup import check_model, setup_method
        from grass_lightning.core.blocks import find_blocks
        from grass_lightning.tools.activations import fit_activations, meta_model

        self.method = method = setup_method(cfg.method, seed=0)
        spec = ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
        if spec.kind != "causal_lm":
            raise ValueError(f"model={spec.name}: the planner knows causal LMs; {spec.name} is a {spec.kind}.")
        self.precision = str(cfg.trainer.get("precision", "32-true"))
        self.checkpointing = spec.gradient_checkpointing
        self.label = f"{spec.name}, {method.name}" + (f" ({method.describe()})" if method.name != "full" else "") \
            + f", {self.precision}"
        path = resolve_model_path(spec)
        check_model(method, spec, path, None)  # method.blocks and method.num_active against the model's blocks
        auto, config = _blueprint(spec, path, None)
        make = meta_model(auto, config)
        prepared = lambda num_blocks: method.prepare(make(num_blocks), spec.kind)  # noqa: E731  (LoRA's adapters)
        skeleton = prepared(config.num_hidden_layers)
        self.layout = layout = find_blocks(skeleton)
        self.half = weight_dtype(self.precision)
        self.wbytes = 2 if self.half is not None else 4
        compute = self.half or (torch.bfloat16 if self.precision == "bf16-mixed" else torch.float32)
        self.block_params = [sum(p.numel() for p in layout.block_params(i)) for i in range(len(layout))]
        self._params = list(skeleton.parameters())
        self.total = sum(p.numel() for p in self._params)
        self.adapters = sum(p.numel() for n, p in skeleton.named_parameters() if "lora_" in n)
        self.embeddings = sum(p.numel() for p in layout.embeddings)
        self.acts = fit_activations(prepared, compute, self._head_trained())

    def _head_trained(self) -> bool:
        callback = self.method.block_callback
        if callback is None:
            return self.method.name == "full"
        c = callback.config
        trained = {id(p) for p in self.layout.always_trained(c.train_embeddings, c.train_head)}
        return any(id(p) in trained for p in self.layout.head)

    def plan(self, shape: RunShape) -> Plan:
        """The phases of a run of ``shape``: the probe (if any) and the deepest draw, or a step."""
        method, acts, n_blocks = self.method, self.acts, len(self.layout)
        b, s, wbytes = shape.batch_size, shape.seq_len, self.wbytes

        # under bf16 autocast each weight's bf16 cast is kept for backward, whatever the batch
        casts = 2 * self.total if self.precision == "bf16-mixed" else 0

        def activations(trained: int, frozen: int, recomputed: int) -> float:
            if self.checkpointing:  # model.gradient_checkpointing: every block recomputes
                trained, frozen, recomputed = 0, 0, trained + frozen + recomputed
            return (acts.bytes("trained", b, s) * trained + acts.bytes("frozen", b, s) * frozen
                    + acts.bytes("recomputed", b, s) * recomputed + acts.bytes("outside", b, s) + casts)

        def buckets(gradient_bytes: float) -> float:  # DDP's all-reduce buckets: what trains (re-wrapped)
            return gradient_bytes if shape.processes > 1 else 0.0

        # backward's working set: one block's activations rebuilt, one chunk of the loss's logits (and grad, softmax)
        working = acts.bytes("frozen", b, s) + 3 * CHUNK_ELEMENTS * 4
        base = dict(weights=self.total * wbytes, overhead=shape.overhead_mb * MB, working=working, host_is_device=shape.cpu)
        result = Plan(self.label)
        callback = method.block_callback
        if callback is None and method.name == "lora":
            trained = self.adapters * wbytes
            state = dict(gradients=trained, moments=self.adapters * 8, buffers=buckets(trained))
            result.phases += [Phase("backward", **base, **state, activations=activations(n_blocks, 0, 0)),
                              self._step_phase(base, state, 0.0)]
        elif callback is None and method.name == "badam":
            block = max(self.block_params)
            copy = block * 4 if self.half is not None else 0  # BAdam's fp32 copy of the active block, and its fp32 gradient
            state = dict(gradients=block * wbytes + copy, masters=copy, moments=block * 8, buffers=buckets(block * wbytes))
            result.phases += [Phase("deepest draw", **base, **state, activations=activations(1, n_blocks - 1, 0)),
                              self._step_phase(base, state, 0.0)]
        elif callback is None:  # full fine-tuning
            mbytes = 8 if self.half is None else 4  # pure bf16 AdamW keeps bf16 moments
            state = dict(gradients=self.total * wbytes, moments=self.total * mbytes, buffers=buckets(self.total * wbytes))
            result.phases += [Phase("backward", **base, **state, activations=activations(n_blocks, 0, 0)),
                              self._step_phase(base, state, 0.0)]
        else:
            result.phases.extend(self._block_phases(callback.config, shape, base, activations, buckets))
        return result

    def _step_phase(self, base: dict, state: dict, fp32_gradients: float) -> Phase:
        """The optimizer step, after backward freed the activations: fp32 copies of the gradients
        (master weights), and AdamW's update of its largest trained tensor, which makes a
        temporary of its size in fp32 (``exp_avg_sq.sqrt()``), one tensor at a time."""
        largest = max((p.numel() for p in self._trained_tensors()), default=0)
        return Phase("optimizer step", **{**base, "working": fp32_gradients + largest * 4}, **state)

    def _trained_tensors(self):
        callback = self.method.block_callback
        if callback is None:
            return [p for p in self._params if p.requires_grad]  # as the method left them (LoRA: its adapters)
        c = callback.config
        blocks = [p for i in range(len(self.layout)) for p in self.layout.block_params(i)]
        return [*blocks, *self.layout.always_trained(c.train_embeddings, c.train_head)]

    def _block_phases(self, c, shape: RunShape, base: dict, activations, buckets) -> list[Phase]:
        """GRASS and LISA: the deepest draw (and the probe)."""
        n_blocks, wbytes, offload = len(self.layout), self.wbytes, self.method.offload
        always = sum(p.numel() for p in self.layout.always_trained(c.train_embeddings, c.train_head))
        gamma = c.num_active
        trained = always + sum(sorted(self.block_params)[-gamma:])
        masters = self.half is not None and c.master_weights
        mbytes, master_bytes = (8 if (self.half is None or masters) else 4), (4 if masters else 0)
        draws = math.ceil(shape.updates / c.sampling_period) + 1
        visited = n_blocks * (1 - (1 - gamma / n_blocks) ** draws)  # blocks drawn so far, expected
        per_block = sum(self.block_params) / n_blocks
        held = always + per_block * (visited if c.idle_moments == "keep" else gamma)  # parameters with moments
        on_device = {"none": held, "park": always + per_block * gamma, "stream": max(self.block_params)}[offload]
        host = (held - on_device) * (mbytes + master_bytes)
        idle = n_blocks - gamma  # the deepest draw: backward through every block
        acts = activations(gamma, 0, idle) if c.recompute == "idle" else activations(gamma, idle, 0)
        gradients = trained * wbytes
        state = dict(gradients=gradients, masters=on_device * master_bytes, moments=on_device * mbytes,
                     buffers=buckets(gradients), host=host)
        phases = [Phase("deepest draw", **base, **state, activations=acts),
                  self._step_phase(base, state, fp32_gradients=trained * 4 if masters else 0.0)]
        if c.probe_steps:
            recomputed = c.recompute in ("idle", "probe")
            # one process frees each gradient as it is read; DDP keeps them for its all-reduce
            gradients = 0.0 if shape.processes == 1 else (self.total - self.embeddings) * wbytes
            phases.append(Phase("probe", **base, gradients=gradients, buffers=buckets(gradients),
                                activations=activations(0, 0, n_blocks) if recomputed else activations(n_blocks, 0, 0)))
        return phases


def process_overhead_mb() -> float:
    """The resident set of a fresh Python process once it has imported what a training run imports
    (torch, Lightning, transformers, this package) and touched the allocator: what a CPU run holds
    before its first tensor."""
    code = ("import torch, lightning, transformers, grass_lightning.tools.bench; "
            "from grass_lightning.lightning.stats import current_memory_mb; "
            "print(current_memory_mb(torch.device('cpu')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def compose(overrides: list[str]):
    """``conf/train.yaml`` with ``overrides``, as ``train.py`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from grass_lightning.app.setup import register_method_defaults

    register_method_defaults()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def shape_of(cfg, args: argparse.Namespace) -> RunShape:
    """Batch and length from the flags (else ``data.batch_size``, ``data.max_length``), DDP's ranks
    from ``trainer.devices`` under a DDP strategy, updates from ``trainer.max_steps``."""
    trainer = cfg.trainer
    ddp = str(trainer.get("strategy", "auto")).startswith("ddp")
    return RunShape(batch_size=args.batch_size or cfg.data.batch_size, seq_len=args.seq_len or cfg.data.max_length,
                    processes=int(trainer.devices) if ddp else 1, updates=int(trainer.max_steps),
                    overhead_mb=args.overhead_mb, cpu=args.accelerator == "cpu")


def report(result: Plan, shape: RunShape, device_gb: float | None) -> str:
    """The components of each phase, the peak, and whether it fits."""
    keys = ("weights", "gradients", "masters", "moments", "buffers", "activations", "working", "overhead", "host")
    lines = [f"{result.label}: batch {shape.batch_size} x {shape.seq_len} tokens, {shape.processes} process(es); MB",
             "| phase | " + " | ".join(keys) + " | device total |", "|---" * (len(keys) + 2) + "|"]
    for phase in result.phases:
        lines.append(f"| {phase.name} | " + " | ".join(f"{getattr(phase, k) / MB:,.0f}" for k in keys)
                     + f" | {phase.device / MB:,.0f} |")
    peak = result.peak
    lines.append(f"whole-run peak: {peak.device / MB:,.0f} MB ({peak.name}); offloaded to host memory: "
                 f"{peak.host / MB:,.0f} MB")
    if device_gb is not None:
        lines.append(f"fits {device_gb:g} GB: {'yes' if peak.device <= device_gb * 2**30 else 'no'}")
    return "\n".join(lines)


def largest(planner: Planner, shape: RunShape, device_gb: float, what: str) -> int:
    """The largest ``batch_size`` or ``seq_len`` whose run fits ``device_gb`` (0: none does)."""
    def fits(value: int) -> bool:
        return planner.plan(RunShape(**{**vars(shape), what: value})).peak.device <= device_gb * 2**30

    low, high = 0, 1
    while high <= 2**20 and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def table(device_gbs: tuple[float, ...], seq_len: int, overhead_mb: float) -> str:
    """Popular shapes x methods: the largest batch of ``seq_len`` tokens that fits each device size."""
    lines = [f"| model | method | " + " | ".join(f"{gb:g} GB: peak at batch 1 / largest batch" for gb in device_gbs) + " |",
             "|---" * (2 + len(device_gbs)) + "|"]
    for model in TABLE_MODELS:
        for label, overrides in TABLE_METHODS.items():
            planner = Planner(compose([f"model={model}", *overrides]))
            shape = RunShape(batch_size=1, seq_len=seq_len, overhead_mb=overhead_mb)
            one = planner.plan(shape).peak.device / 2**30
            cells = [f"{one:.1f} GB / {largest(planner, shape, gb, 'batch_size') or 'does not fit'}" for gb in device_gbs]
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check(path: Path, overhead_mb: float) -> tuple[str, list[float]]:
    """Predicted against measured whole-run peak for every row of a bench run: a table and the ratios."""
    from grass_lightning.tools.bench import ROWS, row_precision

    report_ = json.loads(path.read_text())
    args = _bench_args(report_["command"])
    lines = [f"`{report_['command']}` ({report_['date']}, {report_['machine']}); overhead {overhead_mb:.0f} MB",
             "", "| row | precision | predicted (MB) | measured (MB) | predicted / measured |", "|---|---|---|---|---|"]
    ratios = []
    for row in report_["rows"]:
        if "fsdp" in row["method"]:
            lines.append(f"| {row['method']} | | not modelled: the planner plans one process or DDP | "
                         f"{row['whole_run_peak_mb']:,.0f} | |")
            continue
        overrides, _ = ROWS[row["method"]]
        precision = row_precision(row["method"], args.precision)
        extra = []
        if row["method"] == "badam":
            extra.append(f"method.switch_block_every={args.sampling_period}")
        elif row["method"] not in ("full", "lora"):
            extra.append(f"method.sampling_period={args.sampling_period}")
            if args.probe_steps is not None and "lisa" not in row["method"]:
                extra.append(f"method.probe_steps={args.probe_steps}")
        cfg = compose([f"model={args.model}", *overrides, f"trainer.precision={precision}", *extra])
        steps = 2 + args.steps + args.memory_steps + args.deep_steps
        shape = RunShape(args.batch_size, args.seq_len, processes=row.get("processes", 1), updates=steps,
                         overhead_mb=overhead_mb, cpu=row["device"] == "cpu")
        predicted = Planner(cfg).plan(shape).peak.device / MB
        measured = row["whole_run_peak_mb"]
        ratios.append(predicted / measured)
        lines.append(f"| {row['method']} | {precision} | {predicted:,.0f} | {measured:,.0f} | {predicted / measured:.2f} |")
    return "\n".join(lines) + "\n", ratios


def _bench_args(command: str) -> argparse.Namespace:
    """The arguments a bench run was given (its recorded command line), with the bench's defaults."""
    from grass_lightning.tools.bench import argument_parser

    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w.endswith("bench")) + 1
    return argument_parser().parse_args(words[start:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: model=..., method=..., trainer.precision=...")
    parser.add_argument("--device-gb", type=float, default=None, help="the device's memory, GB (2^30 bytes)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row; default: data.max_length")
    parser.add_argument("--overhead-mb", type=float, default=None,
                        help="memory a process holds before any tensor; default: measured on a CPU (--accelerator "
                             "cpu, --check), 0 on a GPU (CUDA's allocated bytes exclude it)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="gpu")
    parser.add_argument("--table", action="store_true", help="popular shapes x methods on 24 and 80 GB")
    parser.add_argument("--check", type=Path, help="a bench.json: predicted against measured for each row")
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value} must be an integer >= 1")
    if args.device_gb is not None and args.device_gb <= 0:
        parser.error(f"--device-gb={args.device_gb:g} must be above 0")
    if args.overhead_mb is None:
        args.overhead_mb = process_overhead_mb() if args.accelerator == "cpu" or args.check else 0.0
    if args.check:
        text, ratios = check(args.check, args.overhead_mb)
        print(text, end="")
        print(f"predicted / measured: {min(ratios):.2f} to {max(ratios):.2f}; "
              f"{sum(abs(r - 1) <= 0.15 for r in ratios)} of {len(ratios)} rows within ±15%")
        return
    if args.table:
        print(table((24, 80), args.seq_len or 2048, args.overhead_mb), end="")
        return
    cfg = compose(args.overrides)
    planner, shape = Planner(cfg), shape_of(cfg, args)
    print(report(planner.plan(shape), shape, args.device_gb))
    if args.device_gb is not None:
        print(f"largest batch of {shape.seq_len} tokens that fits: {largest(planner, shape, args.device_gb, 'batch_size')}; "
              f"largest length at batch {shape.batch_size}: {largest(planner, shape, args.device_gb, 'seq_len')}")


if __name__ == "__main__":
    main()
