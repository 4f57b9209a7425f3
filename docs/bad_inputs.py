"""Run `python train.py` with each bad input that the tests cover and time how long it takes to fail.

    python docs/bad_inputs.py          # writes docs/bad_inputs.md (about 2 minutes on 2 cores)

Each case is a fresh process, as a user would start it, on the real models (MiniLM-L6 and SmolLM2
from the asset packages), so the time includes Python's start-up and imports (about 5 s). Run it
on a quiet machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "~callbacks.progress_bar"]
ERROR = re.compile(r"^(\w+(Error|Exception)): (.*)$")


def cases(tmp: Path) -> list[tuple[str, list[str]]]:
    rows = [{"text": f"item {i}", "label": "pos"} for i in range(40)]
    (tmp / "one_label.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "empty.jsonl").write_text("")
    (tmp / "string_label.jsonl").write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "label": "4"}) + "\n")
    (tmp / "notes.ckpt").write_text("just some notes\n")
    tiny = tmp / "tiny_run"
    subprocess.run([sys.executable, "train.py", "model=tiny_llama", "data=jsonl", f"data.path={_mc_file(tmp)}",
                    "trainer.max_steps=2", "method.probe_steps=1", f"hydra.run.dir={tiny}", *QUIET],
                   cwd=ROOT, check=True, capture_output=True)
    smollm2 = ["model=smollm2", "data=arc_easy"]
    return [
        ("`method.num_active` above the block count", [*smollm2, "method.num_active=40"]),
        ("`method.blocks` path that does not exist", [*smollm2, "method.blocks=model.layers"]),
        ("`method.blocks` at a module that is not a ModuleList", [*smollm2, "method.blocks=model.model.norm"]),
        ("`data.batch_size=0`", ["data.batch_size=0"]),
        ("`data.eval_batch_size=0`", ["data.eval_batch_size=0"]),
        ("`ckpt_path` at a text file", [f"ckpt_path={tmp / 'notes.ckpt'}"]),
        ("`ckpt_path` at a checkpoint of another model", [*smollm2, f"ckpt_path={tiny / 'checkpoints' / 'last.ckpt'}"]),
        ("`ckpt_path` that does not exist", ["ckpt_path=/no/such.ckpt"]),
        ("`data.path` that does not exist", ["data=jsonl", "data.path=/no/such/file.jsonl"]),
        ("an empty JSONL file", ["data=jsonl", f"data.path={tmp / 'empty.jsonl'}"]),
        ("a classification file with one label", ["data=jsonl", f"data.path={tmp / 'one_label.jsonl'}"]),
        ("a multiple-choice label given as a string", ["model=smollm2", "data=jsonl", f"data.path={tmp / 'string_label.jsonl'}"]),
        ("`data.test_size` larger than the data", ["data.test_size=900"]),
        ("`model.path` that does not exist", ["model=pretrained", "model.path=/no/such/model"]),
        ("multiple choice on a sequence classifier", ["data=piqa"]),
        ("an unknown method setting", ["+method.bogus=1"]),
        ("`method.sampler=random`", ["method.sampler=random"]),
        ("`method.offload=park` with `idle_moments=drop`", ["method.offload=park"]),
        ("FSDP1, not FSDP2", ["+trainer.strategy=fsdp"]),
        ("BAdam under `trainer=fsdp`", ["trainer=fsdp", "method=badam"]),
        ("bf16 weights with masters under `trainer=fsdp`", ["trainer=fsdp", "trainer.precision=bf16-true"]),
        ("float16 weights for a block method", [*smollm2, "trainer.precision=16-true"]),
        ("`export_dtype=float64`", ["export_dtype=float64"]),
        ("`trainer.max_steps=-1`", ["trainer.max_steps=-1"]),
        ("`optim.lr=0`", ["optim.lr=0"]),
        ("`data.max_length=1`, a causal LM", [*smollm2, "data.max_length=1"]),
        ("`data.max_length=0`", ["data.max_length=0"]),
        ("`data.max_length` shorter than an answer", [*smollm2, "data.max_length=3"]),
        ("`seed=abc`", ["seed=abc"]),
        ("`data.path` at a directory", ["data=jsonl", f"data.path={_directory(tmp)}"]),
        ("a JSONL file that starts with a byte-order mark (reads)", ["model=smollm2", "data=jsonl",
                                                                     f"data.path={_bom_file(tmp)}", "trainer.max_steps=1",
                                                                     "test_before=false", "export=false"]),
    ]


def _directory(tmp: Path) -> Path:
    (tmp / "exports").mkdir(exist_ok=True)
    return tmp / "exports"


def _bom_file(tmp: Path) -> Path:
    path = tmp / "bom.jsonl"
    rows = [{"question": f"Pick {i % 3}:", "choices": ["zero", "one", "two"], "label": i % 3} for i in range(40)]
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def _mc_file(tmp: Path) -> Path:
    path = tmp / "mc.jsonl"
    rows = [{"question": f"Pick {i % 3}:", "choices": ["zero", "one", "two"], "label": i % 3} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_case(overrides: list[str], tmp: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", *overrides, *QUIET, f"hydra.run.dir={tmp / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - started
    errors = [m for line in done.stderr.splitlines() if (m := ERROR.match(line.strip()))]
    if done.returncode == 0 or not errors:
        return seconds, f"(no error: exit code {done.returncode})"
    kind, _, message = errors[-1].groups()
    return seconds, f"{kind}: {message}"


def main() -> None:
    lines = ["# What a bad input gets, and how soon", "",
             "Written by `python docs/bad_inputs.py` (each case a fresh `python train.py` process on 2 CPU cores, "
             "so every time includes about 5 s of start-up and imports). SmolLM2 cases use `model=smollm2 "
             "data=arc_easy`; the others the defaults (MiniLM-L6 on SST-2).", "",
             "| bad input | overrides | seconds to fail | message |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, overrides in cases(tmp):
            seconds, message = run_case(overrides, tmp)
            shown = " ".join(o.replace(str(tmp) + "/", "") for o in overrides)
            message = message.replace(str(tmp) + "/", "").replace("|", "/")
            lines.append(f"| {name} | `{shown}` | {seconds:.1f} | {message} |")
            print(lines[-1], flush=True)
    lines += ["", "Not an error any more: `trainer.max_steps` at or below `method.probe_steps` (it counts updates; the "
              "probe steps come on top), so `trainer.max_steps=5` makes 5 updates after the 10 probe steps."]
    (ROOT / "docs" / "bad_inputs.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
