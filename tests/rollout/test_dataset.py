"""PromptDataset: jsonl/parquet, keys, chat template, length filter, shuffle, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles.config import RolloutConfig
from miles.rollout.dataset import DatasetError, PromptDataset, load_eval_datasets


class CharTokenizer:
    """One token per character; the "chat template" joins the messages."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def apply_chat_template(self, conversation, tokenize=False, add_generation_prompt=False, **kwargs):
        text = "".join(f"<{m['role']}>{m['content']}" for m in conversation)
        if kwargs.get("tools"):
            text = f"[tools:{len(kwargs['tools'])}]" + text
        if kwargs.get("enable_thinking") is False:
            text += "<nothink>"
        return text + ("<assistant>" if add_generation_prompt else "")


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROWS = [{"input": f"q{i}", "label": str(i), "metadata": {"id": i}} for i in range(10)]


def test_jsonl_keys_labels_metadata(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl", [{"q": "hi", "a": 1, "m": {"x": 1}, "t": [{"name": "f"}]}, "", ROWS[0]]
    )
    ds = PromptDataset(
        path, input_key="q", label_key="a", metadata_key="m", tool_key="t", skip_bad_samples=True
    )
    assert len(ds) == 1 and len(ds.bad_rows) == 1  # the last row lacks "q"
    (s,) = ds.next_batch(1)
    assert (s.prompt, s.label, s.prompt_ids) == ("hi", 1, [])
    assert s.metadata == {"x": 1, "tools": [{"name": "f"}]}


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"input": "a", "label": "1", "metadata": '{"k": 2}'}]), path)
    (s,) = PromptDataset(path, label_key="label").next_batch(1)
    assert (s.prompt, s.label, s.metadata) == ("a", "1", {"k": 2})
    pq.write_table(pa.Table.from_pylist([{"input": "a"}, {"input": None}]), path)
    with pytest.raises(
        DatasetError,
        match=r"d\.parquet: row 2: 'input' must be a string or a non-empty list of messages, got null",
    ):
        PromptDataset(path)


def test_chat_template_string_and_messages(tmp_path):
    rows = [
        {"input": "hi"},
        {"input": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]},
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    ds = PromptDataset(
        path,
        tokenizer=CharTokenizer(),
        apply_chat_template=True,
        apply_chat_template_kwargs={"enable_thinking": False},
    )
    a, b = ds.next_batch(2)
    assert a.prompt == "<user>hi<nothink><assistant>"
    assert b.prompt == "<system>S<user>U<nothink><assistant>"
    assert b.prompt_ids == [ord(c) for c in b.prompt]
    with pytest.raises(
        DatasetError, match=r"d\.jsonl:2: 'input' is a list of messages; pass --apply-chat-template"
    ):
        PromptDataset(path)


def test_chat_template_with_real_tokenizer(tmp_path, smollm2):
    from miles.models.loading import load_tokenizer

    tok = load_tokenizer(smollm2)
    path = _jsonl(tmp_path / "d.jsonl", [{"input": "What is 2+2?"}])
    (s,) = PromptDataset(path, tokenizer=tok, apply_chat_template=True).next_batch(1)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert s.prompt == expected and "What is 2+2?" in s.prompt and s.prompt.rstrip().endswith("assistant")
    assert s.prompt_ids == tok.encode(expected, add_special_tokens=False)
    assert tok.decode(s.prompt_ids) == expected


def test_max_prompt_len_drops_and_counts(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"input": "x" * n} for n in (3, 10, 5, 11)])
    ds = PromptDataset(path, tokenizer=CharTokenizer(), max_prompt_len=5)
    assert len(ds) == 2 and ds.num_too_long == 2
    assert [s.prompt for s in ds.samples()] == ["xxx", "xxxxx"]
    with pytest.raises(DatasetError, match="no usable prompts \\(4 too long"):
        PromptDataset(path, tokenizer=CharTokenizer(), max_prompt_len=1)


def _order(ds, n):
    return [s.label for s in ds.next_batch(n)]


def test_shuffle_deterministic_and_changes_per_epoch(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    a = PromptDataset(path, label_key="label", shuffle=True, seed=7)
    b = PromptDataset(path, label_key="label", shuffle=True, seed=7)
    e0, e1 = _order(a, 10), _order(a, 10)
    assert e0 == _order(b, 10) and e1 == _order(b, 10)
    assert sorted(e0) == sorted(e1) == sorted(str(i) for i in range(10))
    assert e0 != e1 and e0 != [str(i) for i in range(10)]
    assert a.epoch == 1
    assert _order(PromptDataset(path, label_key="label", shuffle=True, seed=8), 10) != e0
    assert _order(PromptDataset(path, label_key="label"), 10) == [str(i) for i in range(10)]


def test_batches_cross_epochs_and_stop_at_num_epoch(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS[:3])
    ds = PromptDataset(path, label_key="label", num_epoch=2)
    batches = [ds.next_batch(2) for _ in range(4)]
    assert [len(b) for b in batches] == [2, 2, 2, 0]
    assert [s.group_index for b in batches for s in b] == list(range(6))
    assert ds.exhausted


def test_state_dict_resume_equality(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    full = PromptDataset(path, label_key="label", shuffle=True, seed=3)
    expected = [
        (s.label, s.group_index) for s in full.next_batch(7) + full.next_batch(7) + full.next_batch(9)
    ]
    first = PromptDataset(path, label_key="label", shuffle=True, seed=3)
    got = [(s.label, s.group_index) for s in first.next_batch(7) + first.next_batch(7)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 1 and state["position"] == 4
    resumed = PromptDataset(path, label_key="label", shuffle=True, seed=3)
    resumed.load_state_dict(state)
    got += [(s.label, s.group_index) for s in resumed.next_batch(9)]
    assert got == expected
    smaller = PromptDataset(_jsonl(tmp_path / "e.jsonl", ROWS[:5]), label_key="label")
    with pytest.raises(DatasetError, match="has 5 usable prompts, the checkpoint was taken with 10"):
        smaller.load_state_dict(state)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"input": "a",', "d.jsonl:3: invalid JSON"),
        ("[1, 2]", "d.jsonl:3: expected a JSON object, got a list"),
        (
            '{"prompt": "a", "label": "1"}',
            "d.jsonl:3: no key 'input' (--input-key); the row has keys: 'prompt', 'label'",
        ),
        (
            '{"input": 5, "label": "1"}',
            "d.jsonl:3: 'input' must be a string or a non-empty list of messages, got int",
        ),
        ('{"input": [{"content": "x"}], "label": "1"}', "d.jsonl:3: 'input' message 0 must be an object"),
        ('{"input": "a"}', "d.jsonl:3: no key 'label' (--label-key); the row has keys: 'input'"),
        (
            '{"input": "a", "label": "1", "metadata": [1]}',
            "d.jsonl:3: 'metadata' must be an object, got a list",
        ),
        (
            '{"input": "a", "label": "1", "tools": "f"}',
            "d.jsonl:3: 'tools' must be a list of tools, got a string",
        ),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, line, message):
    path = _jsonl(tmp_path / "d.jsonl", [ROWS[0], "", line, ROWS[1]])  # blank line 2 still counts
    with pytest.raises(DatasetError) as e:
        PromptDataset(path, label_key="label")
    assert message in str(e.value) and str(path) in str(e.value)
    ds = PromptDataset(path, label_key="label", skip_bad_samples=True)
    assert len(ds) == 2 and len(ds.bad_rows) == 1 and message in ds.bad_rows[0]


def test_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="prompt data not found"):
        PromptDataset(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unsupported prompt file type '.csv'"):
        PromptDataset(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        PromptDataset(_jsonl(tmp_path / "d.jsonl", ROWS), apply_chat_template=True)


def test_from_config_and_eval_datasets(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", ROWS)
    ev = _jsonl(tmp_path / "ev.jsonl", [{"question": "q", "answer": "a"}])
    cfg = RolloutConfig(
        prompt_data=str(train),
        label_key="label",
        rollout_shuffle=True,
        eval_input_key="question",
        eval_label_key="answer",
    )
    ds = PromptDataset.from_config(cfg, tokenizer=None)
    assert len(ds) == 10 and ds.shuffle
    evals = load_eval_datasets([("aime", str(ev))], cfg)
    (s,) = evals["aime"].samples()
    assert (s.prompt, s.label) == ("q", "a")
    with pytest.raises(DatasetError, match="given twice"):
        load_eval_datasets([("a", str(ev)), ("a", str(ev))], cfg)
    with pytest.raises(DatasetError, match="--prompt-data"):
        PromptDataset.from_config(RolloutConfig(), tokenizer=None)


# ------------------------------------------------------------------ text encoding


def test_a_line_that_is_not_utf8_names_the_file_and_line(tmp_path):
    """It was a bare UnicodeDecodeError naming neither."""
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps(ROWS[0]).encode(),
        b'{"input": "caf\xe9", "label": "1"}',
        json.dumps(ROWS[1]).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DatasetError) as e:
        PromptDataset(path, label_key="label")
    assert str(e.value) == f"{path}:2: not UTF-8 text: invalid continuation byte: b'\\xe9' at byte 14"
    ds = PromptDataset(path, label_key="label", skip_bad_samples=True)
    assert [s.prompt for s in ds.samples()] == ["q0", "q1"] and ds.bad_rows == [str(e.value)]


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ROWS[:2]).encode())
    ds = PromptDataset(path, label_key="label")
    assert [(s.prompt, s.label) for s in ds.samples()] == [("q0", "0"), ("q1", "1")]


def test_a_lone_surrogate_in_a_prompt_is_a_bad_row(tmp_path):
    """Valid JSON (a \\ud800 escape), but half a character: no tokenizer can encode it."""
    path = _jsonl(tmp_path / "d.jsonl", [ROWS[0], '{"input": "a\\ud800b", "label": "1"}'])
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: the prompt holds a lone surrogate '\\ud800'"):
        PromptDataset(path, tokenizer=CharTokenizer(), label_key="label")
    assert len(PromptDataset(path, label_key="label", skip_bad_samples=True)) == 1


def test_parquet_strings_that_are_not_utf8_name_the_row_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"ok", b"\xff\xfebad", b"fine"], type=pa.binary()).view(pa.string())
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"input": raw, "label": ["1", "2", "3"]}), path)
    with pytest.raises(DatasetError) as e:
        PromptDataset(path, label_key="label")
    assert (
        str(e.value)
        == f"{path}: row 2: column 'input' is not UTF-8 text: invalid start byte: b'\\xff' at byte 0"
    )
    ds = PromptDataset(path, label_key="label", skip_bad_samples=True)
    assert [(s.prompt, s.label) for s in ds.samples()] == [("ok", "1"), ("fine", "3")]


def test_json_nested_too_deeply_is_a_bad_row(tmp_path):
    """json.loads raises RecursionError (not a JSONDecodeError) on deep nesting."""
    deep = '{"input": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = _jsonl(tmp_path / "d.jsonl", [ROWS[0], deep])
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: invalid JSON: nested too deeply"):
        PromptDataset(path, label_key="label")
    assert len(PromptDataset(path, label_key="label", skip_bad_samples=True)) == 1
