"""What is learned and how it is scored: tokenisation, loss and held-out metric per task.

- `Classification`: a sequence classifier over `Choice` records whose choices are a fixed set
  of label names; accuracy, and the held-out cross-entropy.
- `ChoiceScoring`: a causal LM learns prompt + right choice (loss on the choice tokens only, no
  end-of-sequence token: scoring never reads it, and on SmolLM2 its loss of 11 nats outweighed
  the answer's 8) and is scored by multiple-choice log-likelihood: the choice whose tokens have
  the highest summed log-probability after the prompt wins; accuracy. Also `accuracy_norm`, the
  same with each sum divided by the choice's length in characters, without the space before it
  (lm-eval 0.4's ``acc_norm``): summed log-likelihood favours short choices, which sinks sets
  whose right answers are long (OpenBookQA).
- `AnswerGeneration`: a causal LM learns prompt + response + end-of-sequence (the model must learn
  to stop), or a chat conversation rendered by the tokenizer's chat template with the loss on
  the assistant turns only (their end-of-turn tokens included). Scored by the held-out loss and
  perplexity on those tokens, and, when every example has an answer, by greedy generation:
  exact match of the answer (of the final number for arithmetic), the headline score then.
  Generation stops once the answer's number is written when every response ends in it after a
  common lead (GSM8K's "The answer is"), or is just the number. Its `update` returns what it
  generated, one row per example, so that a score of 0.0 can be read.

Each is a `Task`; ``update(metrics, model, batch)`` adds a batch to the metrics and returns
per-example rows to keep, or None.
"""

from __future__ import annotations

import os
import re
from typing import Protocol

import torch
import torchmetrics
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import StoppingCriteria, StoppingCriteriaList

from grass_lightning.app.lm_loss import IGNORE, causal_lm_loss
from grass_lightning.app.sources import Choice, Conversation, Generation, Record

ROOM_CHECKED = 256  # examples whose length `_CausalLM._check_room` checks before training
NUMBER = r"-?\d[\d,]*\.?\d*"
FINISHED_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:[^\d,.]|[,.]\D)"  # a character follows that cannot continue it


class Task(Protocol):
    """What the module trains and scores, and how batches are made: built as
    ``cls(tokenizer, max_length, records, max_new_tokens)``."""

    score_name: str  # the headline key of `metrics`

    def collate(self, records: list) -> dict | torch.Tensor:
        """A training batch."""

    def collate_eval(self, records: list) -> dict | torch.Tensor:
        """An evaluation batch."""

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The training loss of a batch."""

    def metrics(self) -> torchmetrics.MetricCollection:
        """Fresh held-out metrics, keyed by score name."""

    def update(self, metrics: torchmetrics.MetricCollection, model: nn.Module, batch) -> list[dict] | None:
        """Add a batch to ``metrics``; rows to keep per example (generation), or None."""


def task_class(kind: str, records: list[Record]) -> type[Task]:
    """The task for a model kind and the records' kind, or a clear error for a mismatch.

    Every task is built as ``cls(tokenizer, max_length, records, max_new_tokens)``; its
    ``metrics()`` are keyed by score name, ``score_name`` being the headline one.
    """
    if isinstance(records[0], (Generation, Conversation)):
        if kind != "causal_lm":
            raise ValueError("prompt/response, instruction or chat data needs a causal LM: choose a model with "
                             "kind 'causal_lm'.")
        return AnswerGeneration
    if kind == "causal_lm":
        return ChoiceScoring
    if len({r.choices for r in records}) != 1:
        raise ValueError(
            "A sequence classifier needs one fixed label set, but this data has per-example choices "
            "(multiple choice): use a causal LM (e.g. model=smollm2)."
        )
    return Classification


class Classification:
    score_name = "accuracy"

    def __init__(self, tokenizer, max_length: int, records: list[Choice], max_new_tokens: int = 0) -> None:
        self.labels = records[0].choices
        self.tokenizer, self.max_length = tokenizer, max_length
        tokenizer.truncation_side = "left"  # prompts end with the question (BoolQ): keep the end
        special = len(tokenizer("")["input_ids"])  # [CLS] and [SEP] for BERT
        if max_length <= special:
            raise ValueError(f"data.max_length={max_length} is too short: the tokenizer adds {special} special tokens, "
                             f"so no text would be left; give at least {special + 1}.")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def collate(self, records: list[Choice]) -> dict:
        batch = self.tokenizer([r.prompt for r in records], truncation=True, max_length=self.max_length,
                               padding=True, return_tensors="pt")
        return {**batch, "labels": torch.tensor([r.label for r in records])}

    collate_eval = collate

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    def metrics(self) -> torchmetrics.MetricCollection:
        """Accuracy, and the held-out cross-entropy ``loss``, which moves before accuracy does."""
        return torchmetrics.MetricCollection(
            {"accuracy": torchmetrics.classification.MulticlassAccuracy(self.num_labels, average="micro"),
             "loss": torchmetrics.MeanMetric()})

    @torch.no_grad()
    def update(self, metrics: torchmetrics.MetricCollection, model: nn.Module, batch: dict) -> None:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        metrics["accuracy"].update(logits.argmax(-1), labels)
        metrics["loss"].update(nn.functional.cross_entropy(logits.float(), labels, reduction="none"))


class _CausalLM:
    """Prompt-then-continuation sequences with the loss on the continuation only."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def _check_room(self, answers: list[tuple[list[str], bool]]) -> None:
        """Refuse a ``max_length`` that cannot hold an example's longest answer (with end-of-sequence
        when ``eos``) and one prompt token, for the first `ROOM_CHECKED` examples: `_encode` would
        cut the answer or the whole prompt, and the run would train and score on nothing."""
        for number, (options, eos) in enumerate(answers[:ROOM_CHECKED], 1):
            needed = max(len(self.tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in options) + eos + 1
            if needed > self.max_length:
                raise ValueError(f"data.max_length={self.max_length} is too short for a prompt and its answer: "
                                 f"example {number} needs {needed} tokens (its longest answer and one prompt token).")

    def _encode(self, prompt: str, continuation: str, eos: bool) -> tuple[list[int], list[int]]:
        head = self.tokenizer(prompt)["input_ids"]
        tail = self.tokenizer(" " + continuation, add_special_tokens=False)["input_ids"]
        if eos:
            tail = tail + [self.tokenizer.eos_token_id]
        tail = tail[: self.max_length - 1]
        head = head[-(self.max_length - len(tail)):]  # keep the end of a long prompt
        return head + tail, [IGNORE] * len(head) + tail

    def _pad(self, pairs: list[tuple[list[int], list[int]]], left: bool = False) -> dict:
        width = max(len(ids) for ids, _ in pairs)

        def fill(row: list[int], value: int) -> list[int]:
            padding = [value] * (width - len(row))
            return padding + row if left else row + padding

        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([fill(i, pad) for i, _ in pairs])
        labels = torch.tensor([fill(t, IGNORE) for _, t in pairs])
        mask = torch.tensor([fill([1] * len(i), 0) for i, _ in pairs])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return causal_lm_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])


class ChoiceScoring(_CausalLM):
    score_name = "accuracy"

    def __init__(self, tokenizer, max_length: int, records: list[Choice], max_new_tokens: int = 0) -> None:
        super().__init__(tokenizer, max_length)
        self.max_choices = max(len(r.choices) for r in records)
        self._check_room([(list(r.choices), False) for r in records])

    def collate(self, records: list[Choice]) -> dict:
        return self._pad([self._encode(r.prompt, r.choices[r.label], eos=False) for r in records])

    def collate_eval(self, records: list[Choice]) -> dict:
        """Every (example, choice) pair as one sequence, padded on the left so that all choices end
        at the last position: scoring then needs logits for the last few positions only."""
        pairs, rows = [], []
        chars = torch.ones(len(records), self.max_choices)  # 1 where absent: -inf stays -inf
        for i, r in enumerate(records):
            for j, choice in enumerate(r.choices):
                pairs.append(self._encode(r.prompt, choice, eos=False))
                rows.append((i, j))
                chars[i, j] = len(choice)  # lm-eval: the choice without the delimiter before it
        batch = self._pad(pairs, left=True)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # each counts from 0, as unpadded
        batch["example"], batch["choice"] = torch.tensor(rows).T
        batch["target"] = torch.tensor([r.label for r in records])
        batch["choice_chars"] = chars
        return batch

    def metrics(self) -> torchmetrics.MetricCollection:
        accuracy = torchmetrics.classification.MulticlassAccuracy(self.max_choices, average="micro")
        # compute_groups off: the two accuracies have equal states at first and would be merged
        return torchmetrics.MetricCollection({"accuracy": accuracy, "accuracy_norm": accuracy.clone()},
                                             compute_groups=False)

    @torch.no_grad()
    def choice_scores(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Summed log-likelihood of each choice's tokens, ``(examples, max_choices)``; -inf where an
        example has fewer choices. Logits only for the positions that predict a choice token: the
        vocabulary-wide softmax at every prompt position would cost as much as the model."""
        labels = batch["labels"]
        keep = min(int((labels != IGNORE).sum(-1).max()) + 1, labels.shape[1])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=keep).logits[:, :-1].float()
        targets = labels[:, labels.shape[1] - keep + 1:]
        scored = targets != IGNORE
        logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        # fp32 whatever the default dtype (bf16-true makes it bf16 inside Lightning's forward context)
        per_example = torch.full((len(batch["target"]), self.max_choices), -torch.inf, dtype=torch.float32,
                                 device=logp.device)
        per_example[batch["example"], batch["choice"]] = (logp * scored).sum(-1)
        return per_example

    def update(self, metrics: torchmetrics.MetricCollection, model: nn.Module, batch: dict) -> None:
        scores = self.choice_scores(model, batch)
        metrics["accuracy"].update(scores.argmax(-1), batch["target"])
        metrics["accuracy_norm"].update((scores / batch["choice_chars"]).argmax(-1), batch["target"])


class AnswerGeneration(_CausalLM):
    def __init__(self, tokenizer, max_length: int, records: list[Generation | Conversation],
                 max_new_tokens: int = 256) -> None:
        super().__init__(tokenizer, max_length)
        if any(isinstance(r, Conversation) for r in records) and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"Chat data needs a tokenizer with a chat template, and {type(tokenizer).__name__} "
                             f"({getattr(tokenizer, 'name_or_path', '') or 'this model'}) has none: use an instruct "
                             f"model (e.g. model=smollm2), or instruction data.")
        self._check_room([([r.response], True) for r in records if isinstance(r, Generation)])
        if max_length < 2:  # a conversation keeps its end: one prompt token and one of the answer
            raise ValueError(f"data.max_length={max_length} is too short for a prompt and its answer.")
        self.max_new_tokens = max_new_tokens
        self.with_answers = all(r.answer is not None for r in records)
        self.score_name = "exact_match" if self.with_answers else "loss"
        self.numeric = self.with_answers and all(_final_number(r.answer) == r.answer.strip().replace(",", "")
                                                 for r in records)
        self.answer_end = _answer_end([_response(r) for r in records]) if self.numeric else None

    def collate(self, records: list[Generation | Conversation]) -> dict:
        return self._pad([self._encode_chat(r.messages) if isinstance(r, Conversation)
                          else self._encode(r.prompt, r.response, eos=True) for r in records])

    def collate_eval(self, records: list[Generation | Conversation]) -> dict:
        batch = self.collate(records)  # the held-out loss
        if not self.with_answers:
            return batch
        prompts = [self._render(r.messages[:-1], generation_prompt=True) if isinstance(r, Conversation) else r.prompt
                   for r in records]
        ids = [self.tokenizer(p, add_special_tokens=not isinstance(r, Conversation))["input_ids"][-self.max_length:]
               for p, r in zip(prompts, records)]
        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id
        return {**batch,  # left padding: generation continues every row from its last prompt token
                "prompt_ids": torch.tensor([[pad] * (width - len(p)) + p for p in ids]),
                "prompt_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids]),
                "answers": [r.answer for r in records], "prompts": prompts}

    def _render(self, messages, generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in messages],
                                                  tokenize=False, add_generation_prompt=generation_prompt)

    def _encode_chat(self, messages: tuple[tuple[str, str], ...]) -> tuple[list[int], list[int]]:
        """The conversation as the chat template renders it; labels on the assistant turns only,
        found as the text each assistant turn adds after the template's generation prompt."""
        text, spans = self._render(messages), []
        for i, (role, _) in enumerate(messages):
            if role == "assistant":
                before, through = self._render(messages[:i], generation_prompt=True), self._render(messages[: i + 1])
                if not (through.startswith(before) and text.startswith(through)):
                    raise ValueError("The tokenizer's chat template does not render a conversation turn by turn "
                                     "(a shorter conversation is not a prefix of a longer one), so the assistant "
                                     "turns cannot be told apart for the loss.")
                spans.append((len(before), len(through)))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [token if end > start and any(a <= start and end <= b for a, b in spans) else IGNORE
                  for token, (start, end) in zip(ids, encoded["offset_mapping"])]
        return ids[-self.max_length:], labels[-self.max_length:]  # keep the end: the last answer

    def metrics(self) -> torchmetrics.MetricCollection:
        metrics = {"loss": torchmetrics.MeanMetric(), "perplexity": torchmetrics.text.Perplexity(ignore_index=IGNORE)}
        if self.with_answers:
            metrics["exact_match"] = torchmetrics.MeanMetric()
        return torchmetrics.MetricCollection(metrics, compute_groups=False)

    @torch.no_grad()
    def update(self, metrics: torchmetrics.MetricCollection, model: nn.Module, batch: dict) -> list[dict]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        scored = targets != IGNORE
        if scored.any():
            losses = nn.functional.cross_entropy(logits[scored], targets[scored])
            metrics["loss"].update(losses, weight=int(scored.sum()))  # the mean over the split's tokens
            metrics["perplexity"].update(logits, targets)
        if not self.with_answers:
            return []
        out = model.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"],
                             max_new_tokens=self.max_new_tokens, do_sample=False,
                             pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                             stopping_criteria=self._stopping(batch["prompt_ids"].shape[1]),
                             synced_gpus=isinstance(model, FSDPModule))  # FSDP2: every rank runs each forward
        texts = self.tokenizer.batch_decode(out[:, batch["prompt_ids"].shape[1]:], skip_special_tokens=True)
        rows = [{"prompt": prompt, "generated": text, "extracted": self._extract(text), "answer": answer,
                 "match": self._matches(text, answer)}
                for prompt, text, answer in zip(batch["prompts"], texts, batch["answers"])]
        metrics["exact_match"].update(torch.tensor([row["match"] for row in rows], dtype=torch.float32))
        return rows

    def _stopping(self, prompt_width: int) -> StoppingCriteriaList | None:
        if self.answer_end is None:
            return None
        return StoppingCriteriaList([_StopAtAnswerEnd(self.tokenizer, self.answer_end, prompt_width)])

    def _extract(self, text: str) -> str | None:
        """What is compared: the final number (numeric answers) or the text, whitespace- and case-folded."""
        return _final_number(text) if self.numeric else " ".join(text.split()).lower()

    def _matches(self, text: str, answer: str) -> bool:
        return self._extract(text) == self._extract(answer)


class _StopAtAnswerEnd(StoppingCriteria):
    """Ends a row once its new text holds the answer's finished number: greedy decoding would
    otherwise run on to ``max_new_tokens`` whenever the model has not learnt to stop."""

    def __init__(self, tokenizer, answer_end: re.Pattern, prompt_width: int) -> None:
        self.tokenizer, self.answer_end, self.prompt_width = tokenizer, answer_end, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor([self.answer_end.search(t) is not None for t in texts], device=input_ids.device)


def _answer_end(responses: list[str]) -> re.Pattern | None:
    """A pattern that first matches every response right after its final number: the words all
    responses put before it ("The answer is"; none when a response is just the number) and the
    number, finished. None when no such pattern exists (chain of thought without a common lead):
    then generation stops at end-of-sequence or ``max_new_tokens``."""
    finals = [list(re.finditer(NUMBER, response)) for response in responses]
    if not all(finals):
        return None
    leads = [response[: numbers[-1].start()] for response, numbers in zip(responses, finals)]
    lead = os.path.commonprefix([lead[::-1] for lead in leads])[::-1]
    if lead and any(head[: len(head) - len(lead)][-1:].isalnum() for head in leads):
        lead = re.sub(r"^\w+", "", lead)  # it begins inside a word: drop the part word
    lead = re.sub(r"^\W+", "", lead).strip()  # ". The answer is": the model may start a line with it
    pattern = re.compile(re.escape(lead) + r"\s*" + FINISHED_NUMBER if lead else FINISHED_NUMBER)
    for response, numbers in zip(responses, finals):
        found = pattern.search(response + "\n")
        if found is None or found.end() <= numbers[-1].start():  # it would stop at an earlier number
            return None
    return pattern


def _response(record: Generation | Conversation) -> str:
    return record.messages[-1][1] if isinstance(record, Conversation) else record.response


def _final_number(text: str) -> str | None:
    numbers = re.findall(NUMBER, text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None
