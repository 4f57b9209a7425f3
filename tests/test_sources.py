"""Reading the shipped evaluation sets and users' JSONL files; carving splits."""

import json

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from grass_lightning.app.sources import ALPACA_WITH_INPUT, Choice, Conversation, Generation, carve, read_jsonl, sst2
from tests.helpers.app import CONF, write_jsonl

SIZES = {"sst2": 872, "boolq": 3270, "piqa": 1838, "siqa": 1954, "hellaswag": 10042, "winogrande": 1267,
         "arc_easy": 570, "arc_challenge": 299, "openbookqa": 500, "gsm8k": 1319}


def _read(name: str) -> list:
    """A built-in set, read as its conf/data file's ``records._target_`` reads it."""
    return instantiate(OmegaConf.load(CONF / "data" / f"{name}.yaml").records)


def test_every_builtin_set_has_its_data_config():
    assert sorted(p.stem for p in (CONF / "data").glob("*.yaml") if p.stem != "jsonl") == sorted(SIZES)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_builtin_sets_read_into_valid_records(name):
    records = _read(name)
    assert len(records) == SIZES[name]
    for r in records:
        if isinstance(r, Choice):
            assert len(r.choices) >= 2 and 0 <= r.label < len(r.choices) and r.prompt
        else:
            assert r.prompt and r.response and r.answer
    if name == "gsm8k":
        assert records[0].answer == "18" and records[0].response.endswith("The answer is 18")
        assert "<<" not in records[0].response
    if name == "arc_easy":  # lettered and numbered answer keys both map to the right index
        assert {len(r.choices) for r in records} >= {4}


def test_labels_are_balanced_enough_to_be_real():
    for name in ("sst2", "piqa", "winogrande"):
        labels = [r.label for r in _read(name)]
        assert 0.4 < sum(labels) / len(labels) < 0.6


def test_carve_is_disjoint_fixed_by_seed_and_sized():
    records = sst2()
    a = carve(records, 100, 200, seed=0, name="sst2")
    assert (len(a.train), len(a.val), len(a.test)) == (572, 100, 200)
    ids = lambda split: {id(r) for r in split}  # noqa: E731
    assert not ids(a.train) & ids(a.test) and not ids(a.val) & ids(a.test) and not ids(a.train) & ids(a.val)
    assert carve(records, 100, 200, seed=0, name="sst2").test == a.test
    assert carve(records, 100, 200, seed=1, name="sst2").test != a.test
    fractions = carve(records, 0.1, 0.25, seed=0, name="sst2")
    assert (len(fractions.val), len(fractions.test)) == (87, 218)


def test_empty_split_is_refused_with_the_sizes():
    records = [Choice("q", ("a", "b"), 0)] * 10
    with pytest.raises(ValueError, match=r"data 'mine' has 10 examples: test_size=5 and val_size=5 leave the train split"):
        carve(records, 5, 5, seed=0, name="mine")
    with pytest.raises(ValueError, match=r"data\.test_size=1\.5"):
        carve(records, 1, 1.5, seed=0, name="mine")


def test_three_jsonl_shapes(tmp_path):
    cls = read_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}]))
    assert cls == [Choice("x", ("neg", "pos"), 1), Choice("y", ("neg", "pos"), 0)]
    fixed = read_jsonl(tmp_path / "c.jsonl", labels=["pos", "neg"])
    assert fixed[0] == Choice("x", ("pos", "neg"), 0)
    mc = read_jsonl(write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "choices": ["a", "b", "c"], "label": 2}]))
    assert mc == [Choice("Question: q\nAnswer:", ("a", "b", "c"), 2)]  # as the built-in sets ask
    pr = read_jsonl(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "response": "4"}]))
    assert pr == [Generation("2+2=", "4", "4")]


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.path='.*missing\.jsonl': no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a", "label": 0}) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        read_jsonl(bad)
    outside = write_jsonl(tmp_path / "o.jsonl", [{"question": "q", "choices": ["a", "b"], "label": 0},
                                                 {"question": "q", "choices": ["a", "b"], "label": 2}])
    with pytest.raises(ValueError, match=r"o\.jsonl:2: label 2 is outside the 2 choices"):
        read_jsonl(outside)
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(ValueError, match=r"u\.jsonl:2: label 'meh' is not one of the labels \['pos', 'neg'\]"):
        read_jsonl(unknown, labels=["pos", "neg"])
    mixed = write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "label": 1}, {"prompt": "p", "response": "r"}])
    with pytest.raises(ValueError, match=r"x\.jsonl:2: a prompt_response line in a classification file"):
        read_jsonl(mixed)
    shapeless = write_jsonl(tmp_path / "s.jsonl", [{"sentence": "a"}])
    with pytest.raises(ValueError, match=r"s\.jsonl:1: expected the keys of one of"):
        read_jsonl(shapeless)


def test_a_jsonl_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Spreadsheet exports start with a UTF-8 byte-order mark, which json.loads refuses."""
    rows = [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}]
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "plain.jsonl", rows).read_bytes())
    assert read_jsonl(marked) == read_jsonl(tmp_path / "plain.jsonl")


def test_jsonl_files_that_cannot_train_are_refused_with_the_reason(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"data\.path='.*empty\.jsonl' is empty"):
        read_jsonl(empty)
    one_label = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}])
    with pytest.raises(ValueError, match=r"one\.jsonl'.*every line has the label 'pos'.*at least two labels"):
        read_jsonl(one_label)
    assert len(read_jsonl(one_label, labels=["pos", "neg"])) == 2  # named labels: a file may hold one of them
    named = write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "choices": ["a", "b"], "label": "b"}])
    with pytest.raises(ValueError, match=r"n\.jsonl:1: label 'b' must be the integer index of the right choice \(0\.\.1\)"):
        read_jsonl(named)


def test_a_prompt_template_makes_the_prompt_from_a_lines_keys(tmp_path):
    rows = [{"question": "2+2?", "choices": ["3", "4"], "label": 1, "topic": "sums"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    (record,) = read_jsonl(path, prompt_template="[{topic}] {question} ->")
    assert record.prompt == "[sums] 2+2? ->"
    with pytest.raises(ValueError, match=r"m\.jsonl:1: data\.prompt_template='\{context\}' names \{context\}, which"):
        read_jsonl(path, prompt_template="{context}")
    with pytest.raises(ValueError, match=r"data\.prompt_template='\{0\}' is not a format string"):
        read_jsonl(path, prompt_template="{0}")


def test_chat_and_instruction_lines(tmp_path):
    chat = read_jsonl(write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}], "answer": 3},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]))
    assert chat == [Conversation((("system", "s"), ("user", "u"), ("assistant", "a")), "3"),
                    Conversation((("user", "u"), ("assistant", "a")), None)]
    instruction = read_jsonl(write_jsonl(tmp_path / "i.jsonl", [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi.", "output": "hi"}]))
    assert instruction[0] == Generation(ALPACA_WITH_INPUT.format(instruction="Add.", input="2 and 3"), "5", None)
    assert instruction[1].prompt.endswith("### Instruction:\nSay hi.\n\n### Response:\n") and "### Input" not in instruction[1].prompt


@pytest.mark.parametrize(("rows", "message"), [
    ([{"messages": []}], r"c\.jsonl:1: an empty conversation"),
    ([{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}],
     r"c\.jsonl:1: message 0 has the unknown role 'robot'; roles are \('system', 'user', 'assistant'\)"),
    ([{"messages": [{"role": "user", "content": "x"}]}], r"c\.jsonl:1: the last message is the user's; a conversation must end"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
      {"instruction": "i", "output": "o"}], r"c\.jsonl:2: a instruction line in a chat file"),
    ([{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}],
     r"c\.jsonl:1: message 0 must be an object with a string content"),
])
def test_chat_errors_name_the_file_the_line_and_the_problem(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        read_jsonl(write_jsonl(tmp_path / "c.jsonl", rows))


def test_a_prompt_template_does_not_apply_to_chat(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(ValueError, match="chat data is made into text by the tokenizer's chat template"):
        read_jsonl(write_jsonl(tmp_path / "c.jsonl", rows), prompt_template="{messages}")
