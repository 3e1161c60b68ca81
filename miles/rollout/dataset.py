"""Prompt datasets: jsonl or parquet rows -> :class:`~miles.types.Sample` prompts, epoch by epoch.

Row keys are set by ``--input-key/--label-key/--metadata-key/--tool-key`` (examples in
docs/rewards_and_data.md):
- input: a string, or a list of chat messages (``{"role": str, "content": ...}``). With
  ``apply_chat_template`` the tokenizer's chat template renders it (a string becomes one user
  message), with ``add_generation_prompt=True`` and ``tools`` from the tool key, plus
  ``apply_chat_template_kwargs``; without it the input must be a string, used as is.
- label: any JSON value (a string, a number, ``{"target", "numbers"}`` for countdown...);
  required in every row when a label key is set.
- metadata: an object (or a string holding a JSON object); optional. tools: a list; optional,
  also copied to ``metadata["tools"]`` for multi-turn generate functions.

``prompt_ids`` = ``tokenizer.encode(prompt, add_special_tokens=False)`` (the chat template
already holds the special tokens). Rows whose prompt has more than ``max_prompt_len`` tokens
are dropped and counted (:attr:`PromptDataset.num_too_long`).

A malformed row raises :class:`DatasetError` naming the file and the 1-based line (jsonl) or
row (parquet); with ``skip_bad_samples`` it is counted, summarised in one warning, skipped. Text
must be UTF-8 (a UTF-8 byte-order mark at the start of a jsonl file is accepted): a line, or a
parquet string value, that is not is such a malformed row, and so is a prompt holding a lone
surrogate (a JSON ``\\ud800`` escape), which no tokenizer can encode.

Order: file order, or with ``shuffle`` the permutation of ``random.Random(seed + epoch)``
(slime's rule). :meth:`PromptDataset.state_dict` holds (epoch, position, next group index).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from miles.config import RolloutConfig
from miles.types import Sample

__all__ = ["DatasetError", "PromptDataset", "TokenizerLike", "load_eval_datasets"]

logger = logging.getLogger(__name__)


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer the dataset uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class DatasetError(ValueError):
    """A prompt file is missing, unreadable, or has a malformed row (file and line named)."""


@dataclass(frozen=True)
class _Record:  # one usable row, parsed once at load time
    prompt: str
    prompt_ids: tuple[int, ...]
    label: Any
    metadata: Mapping[str, Any]


class PromptDataset:
    """The prompts of one file, served in (shuffled) epochs by :meth:`next_batch`."""

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer: TokenizerLike | None = None,
        input_key: str = "input",
        label_key: str | None = None,
        metadata_key: str = "metadata",
        tool_key: str = "tools",
        apply_chat_template: bool = False,
        apply_chat_template_kwargs: Mapping[str, Any] | None = None,
        max_prompt_len: int | None = None,
        shuffle: bool = False,
        seed: int = 42,
        num_epoch: int | None = None,
        skip_bad_samples: bool = False,
    ) -> None:
        if (apply_chat_template or max_prompt_len is not None) and tokenizer is None:
            raise ValueError("a tokenizer is needed for apply_chat_template and max_prompt_len")
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.input_key, self.label_key = input_key, label_key
        self.metadata_key, self.tool_key = metadata_key, tool_key
        self.apply_chat_template = apply_chat_template
        self.chat_template_kwargs = dict(apply_chat_template_kwargs or {})
        self.max_prompt_len = max_prompt_len
        self.shuffle, self.seed, self.num_epoch = shuffle, seed, num_epoch
        self.num_too_long = 0
        self.bad_rows: list[str] = []  # messages of the rows skipped by skip_bad_samples
        self._records: list[_Record] = []
        for where, row in _read_rows(self.path):
            try:
                record = self._parse(where, row)
            except DatasetError as e:
                if not skip_bad_samples:
                    raise
                self.bad_rows.append(str(e))
                continue
            if record is not None:
                self._records.append(record)
        if self.bad_rows:
            logger.warning(
                "%s: skipped %d malformed row(s) (--skip-bad-samples); first: %s",
                self.path,
                len(self.bad_rows),
                self.bad_rows[0],
            )
        if self.num_too_long:
            logger.warning(
                "%s: dropped %d prompt(s) longer than %d tokens", self.path, self.num_too_long, max_prompt_len
            )
        if not self._records:
            raise DatasetError(
                f"{self.path}: no usable prompts ({self.num_too_long} too long, {len(self.bad_rows)} malformed)"
            )
        self._epoch, self._position, self._next_group = 0, 0, 0
        self._order = self._make_order(0)

    @classmethod
    def from_config(cls, config: RolloutConfig, tokenizer: TokenizerLike | None) -> PromptDataset:
        """The training prompts of ``config`` (``--prompt-data`` and the data flags)."""
        if not config.prompt_data:
            raise DatasetError("no prompt data: set --prompt-data (a .jsonl or .parquet file)")
        return cls(
            config.prompt_data,
            tokenizer=tokenizer,
            input_key=config.input_key,
            label_key=config.label_key,
            metadata_key=config.metadata_key,
            tool_key=config.tool_key,
            apply_chat_template=config.apply_chat_template,
            apply_chat_template_kwargs=config.apply_chat_template_kwargs,
            max_prompt_len=config.rollout_max_prompt_len,
            shuffle=config.rollout_shuffle,
            seed=config.rollout_seed,
            num_epoch=config.num_epoch,
            skip_bad_samples=config.skip_bad_samples,
        )

    # ------------------------------------------------------------------ parsing

    def _parse(self, where: str, row: Any) -> _Record | None:
        if isinstance(row, _BadRow):
            raise DatasetError(row.message)
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {_type_name(row)}")
        if self.input_key not in row:
            raise DatasetError(
                f"{where}: no key {self.input_key!r} (--input-key); the row has keys: {', '.join(map(repr, row)) or '(none)'}"
            )
        prompt = row[self.input_key]
        messages = _check_input(where, self.input_key, prompt)
        label = None
        if self.label_key is not None:
            if self.label_key not in row:
                raise DatasetError(
                    f"{where}: no key {self.label_key!r} (--label-key); the row has keys: {', '.join(map(repr, row)) or '(none)'}"
                )
            label = row[self.label_key]
        metadata = _check_metadata(where, self.metadata_key, row.get(self.metadata_key))
        tools = row.get(self.tool_key)
        if tools is not None and not isinstance(tools, list):
            raise DatasetError(f"{where}: {self.tool_key!r} must be a list of tools, got {_type_name(tools)}")
        if tools is not None:
            metadata.setdefault("tools", tools)

        if self.apply_chat_template:
            assert self.tokenizer is not None
            conversation = messages if messages is not None else [{"role": "user", "content": prompt}]
            kwargs = {"tokenize": False, "add_generation_prompt": True, **self.chat_template_kwargs}
            if tools is not None:
                kwargs["tools"] = tools
            try:
                text = self.tokenizer.apply_chat_template(conversation, **kwargs)
            except Exception as e:  # a template error is a problem of this row; say which
                raise DatasetError(f"{where}: the chat template failed: {type(e).__name__}: {e}") from e
            if not isinstance(text, str):
                raise DatasetError(f"{where}: the chat template returned {_type_name(text)}, not text")
        elif messages is not None:
            raise DatasetError(
                f"{where}: {self.input_key!r} is a list of messages; pass --apply-chat-template to render it"
            )
        else:
            text = prompt
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DatasetError(
                f"{where}: the prompt holds a lone surrogate {text[e.start]!r} (a \\u escape that is half "
                f"a character) at character {e.start}: not text a tokenizer can encode"
            ) from None

        ids: tuple[int, ...] = ()
        if self.tokenizer is not None:
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            if self.max_prompt_len is not None and len(ids) > self.max_prompt_len:
                self.num_too_long += 1
                return None
        return _Record(prompt=text, prompt_ids=ids, label=label, metadata=metadata)

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        return len(self._records)

    @property
    def longest_prompt_len(self) -> int:
        """The longest prompt, in tokens (sizes the engine's KV cache)."""
        return max(len(r.prompt_ids) for r in self._records)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Prompts already served in the current epoch."""
        return self._position

    @property
    def exhausted(self) -> bool:
        """True once ``num_epoch`` epochs have been served (never without ``num_epoch``)."""
        last = self.num_epoch is not None and self._epoch >= self.num_epoch - 1
        return last and self._position >= len(self._records)

    def _make_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._records)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Sample]:
        """The next ``n`` prompts as samples, crossing into the next epoch when needed.

        Each sample gets a new ``group_index`` (= ``index``), counted across the whole run.
        Fewer than ``n`` (possibly none) are returned only when the dataset is exhausted.
        """
        if n < 0:
            raise ValueError(f"batch size must be >= 0, got {n}")
        out: list[Sample] = []
        while len(out) < n and not self.exhausted:
            if self._position >= len(self._records):
                self._epoch += 1
                self._position = 0
                self._order = self._make_order(self._epoch)
            record = self._records[self._order[self._position]]
            self._position += 1
            out.append(self._sample(record, self._next_group))
            self._next_group += 1
        return out

    def samples(self) -> list[Sample]:
        """Every prompt once, in file order, indexed from 0 (evaluation); no iteration state."""
        return [self._sample(r, i) for i, r in enumerate(self._records)]

    @staticmethod
    def _sample(record: _Record, group_index: int) -> Sample:
        return Sample(
            prompt=record.prompt,
            prompt_ids=list(record.prompt_ids),
            label=record.label,
            metadata=dict(record.metadata),  # each sample may be annotated independently
            index=group_index,
            group_index=group_index,
        )

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Where iteration stands; JSON-serialisable. ``num_prompts`` guards against resuming
        with a different file (or different filters)."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "next_group_index": self._next_group,
            "num_prompts": len(self._records),
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where :meth:`state_dict` was taken; raises :class:`DatasetError` on a
        dataset of a different size or a malformed state."""
        try:
            epoch, position, group = (
                int(state["epoch"]),
                int(state["position"]),
                int(state["next_group_index"]),
            )
            num = int(state["num_prompts"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{self.path}: malformed dataset state {dict(state)!r}: {e}") from None
        if num != len(self._records):
            raise DatasetError(
                f"{self.path}: has {len(self._records)} usable prompts, the checkpoint was taken with {num}; "
                "resume with the same --prompt-data and data flags"
            )
        if epoch < 0 or not 0 <= position <= num or group < 0:
            raise DatasetError(f"{self.path}: dataset state out of range: {dict(state)!r}")
        self._epoch, self._position, self._next_group = epoch, position, group
        self._order = self._make_order(epoch)


def load_eval_datasets(
    pairs: Sequence[tuple[str, str]], config: RolloutConfig, tokenizer: TokenizerLike | None = None
) -> dict[str, PromptDataset]:
    """``--eval-prompt-data NAME PATH ...`` as datasets by name: file order, one epoch.

    Keys: ``--eval-input-key``/``--eval-label-key``, defaulting to the training keys; the
    chat template, ``--rollout-max-prompt-len`` and ``--skip-bad-samples`` apply as in training.
    """
    datasets: dict[str, PromptDataset] = {}
    for name, path in pairs:
        if name in datasets:
            raise DatasetError(
                f"eval dataset name {name!r} is given twice (--eval-prompt-data NAME PATH ...)"
            )
        datasets[name] = PromptDataset(
            path,
            tokenizer=tokenizer,
            input_key=config.eval_input_key or config.input_key,
            label_key=config.eval_label_key or config.label_key,
            metadata_key=config.metadata_key,
            tool_key=config.tool_key,
            apply_chat_template=config.apply_chat_template,
            apply_chat_template_kwargs=config.apply_chat_template_kwargs,
            max_prompt_len=config.rollout_max_prompt_len,
            num_epoch=1,
            skip_bad_samples=config.skip_bad_samples,
        )
    return datasets


# ---------------------------------------------------------------------- helpers


def _read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(``"file:line"`` or ``"file: row N"``, parsed row) for every non-blank row."""
    if not path.is_file():
        raise DatasetError(f"prompt data not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _jsonl_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise DatasetError(f"{path}: unsupported prompt file type {suffix!r}; use .jsonl or .parquet")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # Bytes, decoded line by line: a text-mode file raises a UnicodeDecodeError that names
    # neither the file nor the line, from whichever read buffer holds the bad byte.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _BadRow(f"{where}: not UTF-8 text: {_bad_bytes(e)}")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _BadRow(f"{where}: invalid JSON: {e.msg} (column {e.colno})")
            except RecursionError:
                yield where, _BadRow(f"{where}: invalid JSON: nested too deeply")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DatasetError(f"{path}: not a readable parquet file: {e}") from e
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:  # a string column holds bytes that are not UTF-8: find the rows
        rows = None
    for i in range(table.num_rows):
        where = f"{path}: row {i + 1}"
        if rows is not None:
            yield where, rows[i]
            continue
        row, bad = {}, []
        for name in table.column_names:
            try:
                row[name] = table.column(name)[i].as_py()
            except UnicodeDecodeError as e:
                bad.append(f"column {name!r} is not UTF-8 text: {_bad_bytes(e)}")
        yield where, _BadRow(f"{where}: {'; '.join(bad)}") if bad else row


def _bad_bytes(e: UnicodeDecodeError) -> str:
    return f"{e.reason}: {e.object[e.start : e.end]!r} at byte {e.start}"


class _BadRow:
    """A row that could not be read (not UTF-8, not JSON); reported by ``_parse``, so that
    ``skip_bad_samples`` covers it like any malformed row."""

    def __init__(self, message: str) -> None:
        self.message = message


def _check_input(where: str, key: str, value: Any) -> list[dict[str, Any]] | None:
    """None for a string prompt, the messages for a chat prompt; DatasetError otherwise."""
    if isinstance(value, str):
        return None
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise DatasetError(
                    f"{where}: {key!r} message {i} must be an object with 'role' and 'content', got {m!r:.100}"
                )
        return value
    raise DatasetError(
        f"{where}: {key!r} must be a string or a non-empty list of messages, got {_type_name(value)}"
    )


def _check_metadata(where: str, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):  # parquet files often store nested objects as JSON strings
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DatasetError(f"{where}: {key!r} is a string that is not JSON") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: {key!r} must be an object, got {_type_name(value)}")
    return dict(value)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
