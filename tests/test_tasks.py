"""Tokenisation, losses and held-out scoring of the three tasks on tiny random models."""

import pytest
import torch

from grass_lightning.app.models import ModelSpec, byte_tokenizer, load_model
from grass_lightning.app.sources import Choice, Conversation, Generation
from grass_lightning.app.tasks import IGNORE, AnswerGeneration, ChoiceScoring, Classification, _final_number, task_class

LLAMA = ModelSpec("t", "causal_lm", "random", config=dict(model_type="llama", hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=4))


def test_task_follows_model_kind_and_record_kind():
    choice, gen = [Choice("q", ("a", "b"), 0)], [Generation("p", "r", "r")]
    assert task_class("causal_lm", choice) is ChoiceScoring
    assert task_class("classification", choice) is Classification
    assert task_class("causal_lm", gen) is AnswerGeneration
    with pytest.raises(ValueError, match="needs a causal LM"):
        task_class("classification", gen)
    with pytest.raises(ValueError, match="one fixed label set"):
        task_class("classification", [Choice("q", ("a", "b"), 0), Choice("q", ("c", "d"), 1)])


def test_choice_training_scores_the_choice_without_end_of_sequence_and_generation_with_it():
    task = ChoiceScoring(byte_tokenizer(), 64, [Choice("Q", ("yes", "no"), 1)])
    batch = task.collate([Choice("Q: ab", ("yes", "no"), 1), Choice("Q", ("yes", "no"), 0)])
    tok = byte_tokenizer()
    labels = batch["labels"][0].tolist()
    scored = [t for t in labels if t != IGNORE]
    assert scored == tok(" no", add_special_tokens=False)["input_ids"]  # scoring never reads <eos>
    assert labels[: len(tok("Q: ab")["input_ids"])] == [IGNORE] * len(tok("Q: ab")["input_ids"])
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # padded row
    generation = AnswerGeneration(tok, 64, [Generation("Q", "42", "42")])
    labels = generation.collate([Generation("Q", "42", "42")])["labels"][0].tolist()
    assert [t for t in labels if t != IGNORE] == tok(" 42", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_long_prompts_are_cut_from_the_left_and_keep_the_answer():
    task = ChoiceScoring(byte_tokenizer(), 16, [Choice("Q", ("yes", "no"), 0)])
    ids, labels = task._encode("x" * 100 + "END", "yes", eos=True)
    scored = sum(t != IGNORE for t in labels)  # " yes" (4 bytes) and <eos>
    assert len(ids) == 16 and scored == 5 and byte_tokenizer().decode(ids[: 16 - scored]).endswith("END")


def test_choice_scores_equal_one_unpadded_sequence_at_a_time():
    torch.manual_seed(0)
    model, tok = load_model(LLAMA, None)
    model.eval()
    records = [Choice("Color of the sky:", ("blue", "green", "a long red answer"), 0),
               Choice("Two, written as a digit, is:", ("2", "two"), 0)]
    task = ChoiceScoring(tok, 64, records)
    batch = task.collate_eval(records)
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()  # left padded
    scores = task.choice_scores(model, batch)
    expected = torch.full_like(scores, -torch.inf)
    for i, r in enumerate(records):  # unpadded, one choice at a time, every position's logits
        for j, choice in enumerate(r.choices):
            head = tok(r.prompt)["input_ids"]
            tail = tok(" " + choice, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([head + tail])).logits[0].log_softmax(-1)
            expected[i, j] = sum(logits[len(head) - 1 + k, t] for k, t in enumerate(tail))
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    metrics = task.metrics()
    task.update(metrics, model, batch)
    target = torch.tensor([r.label for r in records])
    chars = torch.tensor([[len(c) for c in r.choices] + [1.0] * (3 - len(r.choices)) for r in records])
    computed = metrics.compute()
    assert computed["accuracy"].item() == pytest.approx((expected.argmax(-1) == target).float().mean().item())
    assert computed["accuracy_norm"].item() == pytest.approx(
        ((expected / chars).argmax(-1) == target).float().mean().item())


def test_length_normalised_accuracy_can_pick_the_long_answer_that_the_sum_rejects():
    task = ChoiceScoring(byte_tokenizer(), 64, [Choice("Q", ("ab", "abcdefgh"), 1)])
    batch = task.collate_eval([Choice("Q", ("ab", "abcdefgh"), 1)])
    metrics = task.metrics()
    # summed log-likelihoods -3 (2 chars) vs -6 (8 chars): the sum picks the short one, per char the long one
    task.choice_scores = lambda model, batch: torch.tensor([[-3.0, -6.0]])
    task.update(metrics, None, batch)
    assert {name: value.item() for name, value in metrics.compute().items()} == {"accuracy": 0.0, "accuracy_norm": 1.0}


def test_length_normalisation_is_lm_evals_acc_norm_by_the_choice_without_its_leading_space():
    # lm-eval 0.4.13 (api/task.py, process_results): completion_len = len(choice); acc_norm = argmax(ll / len).
    # By hand: "ab" -2.2 / 2 = -1.10, "abcd" -4.2 / 4 = -1.05, so choice 1. Dividing by len(" " + choice)
    # would give -2.2 / 3 = -0.733 and -4.2 / 5 = -0.84, choice 0.
    record = Choice("Q", ("ab", "abcd"), 1)
    task = ChoiceScoring(byte_tokenizer(), 64, [record])
    batch = task.collate_eval([record])
    assert batch["choice_chars"].tolist() == [[2.0, 4.0]]
    task.choice_scores = lambda model, batch: torch.tensor([[-2.2, -4.2]])
    metrics = task.metrics()
    task.update(metrics, None, batch)
    assert metrics.compute()["accuracy_norm"].item() == 1.0


def test_final_number_and_exact_match():
    assert _final_number("so 3 + 4 = 7. The answer is 1,234.") == "1234"
    assert _final_number("no digits") is None
    numeric = AnswerGeneration(byte_tokenizer(), 32, [Generation("p", "r", "18")], max_new_tokens=4)
    assert numeric._matches("She makes $18 a day. The answer is 18", "18")
    assert not numeric._matches("The answer is 180", "18")
    text = AnswerGeneration(byte_tokenizer(), 32, [Generation("p", "Paris", "Paris")], max_new_tokens=4)
    assert text._matches("  paris ", "Paris") and not text._matches("Lyon", "Paris")


def test_generation_collates_left_padded_prompts():
    task = AnswerGeneration(byte_tokenizer(), 32, [Generation("p", "r", "1")], max_new_tokens=4)
    batch = task.collate_eval([Generation("long prompt", "r", "1"), Generation("p", "r", "2")])
    assert batch["prompt_mask"][1].tolist()[0] == 0 and batch["prompt_mask"][1].tolist()[-1] == 1
    assert batch["answers"] == ["1", "2"]
    assert (batch["labels"] != IGNORE).any(dim=1).all()  # and the responses, for the held-out loss


def test_numeric_answers_end_generation_once_the_number_after_the_common_lead_is_written():
    tok = byte_tokenizer()
    gsm = AnswerGeneration(tok, 64, [Generation("p", "3 + 4 = 7 apples. 7 * 2 = 14. The answer is 14", "14"),
                                     Generation("p", "Half of 10 is 5. The answer is 5", "5")])
    stop = gsm._stopping(prompt_width=2)[0]
    prompt = tok("p", add_special_tokens=False)["input_ids"] * 2

    def stops(*texts):
        rows = [prompt + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(map(len, rows))
        return stop(torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows]), None).tolist()

    assert stops("It is 3 + 4 = 7. ", "The answer is 1", "The answer is 1,2", "The answer is 12\n") == \
        [False, False, False, True]
    bare = AnswerGeneration(tok, 64, [Generation("p", "18", "18"), Generation("p", "-2.5", "-2.5")])
    assert bare._stopping(2)[0].answer_end.search("18 and more") and not bare._stopping(2)[0].answer_end.search("18")
    thought = AnswerGeneration(tok, 64, [Generation("p", "2 and 3 make 5", "5"), Generation("p", "so 4", "4")])
    assert thought._stopping(2) is None  # no lead that fires at the final number only: stop at <eos>
    words = AnswerGeneration(tok, 64, [Generation("p", "Paris", "Paris")])
    assert words._stopping(2) is None


def test_generation_passes_its_stopping_rule_and_keeps_what_it_generated():
    tok = byte_tokenizer()
    task = AnswerGeneration(tok, 64, [Generation("p", "The answer is 4", "4")], max_new_tokens=8)
    batch = task.collate_eval([Generation("p", "The answer is 4", "4")])
    seen = {}

    class Scripted:
        def __call__(self, input_ids, **kwargs):  # the held-out loss's forward: uniform logits
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, len(tok))})

        def generate(self, input_ids, stopping_criteria, **kwargs):
            seen["stop"] = stopping_criteria
            return torch.cat([input_ids, torch.tensor([tok("The answer is 4\n", add_special_tokens=False)["input_ids"]])], 1)

    metrics = task.metrics()
    (row,) = task.update(metrics, Scripted(), batch)
    assert seen["stop"][0].prompt_width == batch["prompt_ids"].shape[1]
    assert row["extracted"] == "4" and row["match"] and metrics.compute()["exact_match"].item() == 1.0


def test_classification_scores_the_held_out_cross_entropy_too():
    records = [Choice("good", ("neg", "pos"), 1), Choice("bad", ("neg", "pos"), 0)]
    task = Classification(byte_tokenizer(), 16, records)
    batch = task.collate(records)
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])

    class Fixed:
        def __call__(self, **kwargs):
            return type("Out", (), {"logits": logits})

    metrics = task.metrics()
    task.update(metrics, Fixed(), batch)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0])).item()
    assert metrics.compute()["loss"].item() == pytest.approx(expected)


def test_chat_is_rendered_by_the_chat_template_and_learns_the_assistant_turns_only():
    tok = byte_tokenizer()
    talk = Conversation((("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "2+2?"),
                         ("assistant", "4.")), answer="4")
    task = AnswerGeneration(tok, 256, [talk], max_new_tokens=4)
    ids, labels = task._pad([task._encode_chat(talk.messages)])["input_ids"][0], task.collate([talk])["labels"][0]
    assert tok.decode(ids) == "<|system|>\nBe brief.<eos>\n<|user|>\nHi<eos>\n<|assistant|>\nHello.<eos>\n" \
                              "<|user|>\n2+2?<eos>\n<|assistant|>\n4.<eos>\n"
    assert tok.decode(labels[labels != IGNORE]) == "Hello.<eos>\n4.<eos>\n"  # both assistant turns, each with its end
    batch = task.collate_eval([talk])
    assert batch["prompts"] == ["<|system|>\nBe brief.<eos>\n<|user|>\nHi<eos>\n<|assistant|>\nHello.<eos>\n"
                                "<|user|>\n2+2?<eos>\n<|assistant|>\n"]  # generation answers the last turn


def test_data_without_answers_is_scored_by_loss_and_perplexity_only():
    model, tok = load_model(LLAMA, None)
    records = [Generation("Say hi:", "hi there", None), Generation("Say bye:", "bye now", None)]
    task = AnswerGeneration(tok, 64, records, max_new_tokens=4)
    assert task.score_name == "loss"
    metrics = task.metrics()
    assert task.update(metrics, model.eval(), task.collate_eval(records)) == []  # nothing generated
    scores = metrics.compute()
    assert set(scores) == {"loss", "perplexity"}
    assert torch.isclose(scores["perplexity"], scores["loss"].exp(), rtol=1e-4)  # the same tokens


def test_chat_data_needs_a_tokenizer_with_a_chat_template():
    tok = byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="Chat data needs a tokenizer with a chat template"):
        AnswerGeneration(tok, 64, [Conversation((("user", "hi"), ("assistant", "yo")))])
