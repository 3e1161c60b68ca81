"""No measured numbers in the comments and docstrings of ``miles/``: they go stale.

Figures live in ``benchmarks/results/`` and ``docs/performance.md``; a comment says why and
points there. The scanner reads comments with :mod:`tokenize` and docstrings (every string
statement) with :mod:`ast`, blanks out double-backtick literals (examples, code), and flags:

- a throughput or bandwidth figure (``7.3 GB/s``, ``185 tok/s``, ``732 TFLOP/s``);
- a speed-up (``3x faster``, ``11.7x slower``, ``a speed-up of 1.4x``) or a share of a
  reference (``95% of cuBLAS``);
- a sub-second time (``1.7 ms``, ``40 µs``) unless a configuration word (timeout, interval,
  every, default...) comes just before it;
- any figure (a number with a time, memory, ``%`` or ``x`` unit, a decimal, a ``1e-3``) in the
  same sentence as a measurement word or a device (measured, took, profiled, on an H100, a
  2-core CPU...); so ``600 s`` as a timeout or ``4096`` as a shape pass, ``took 0.46 s`` fails.

Not figures: a bound (``> 5%``), a setting (``r = 0.5``), a version (``torch 2.13``), a model
size (``0.6B``), a shape (``576 x 1536``) or a product (``6 x (active) parameters``).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "miles"

# A number that is not part of a word or another number, nor a bound ("> 5%").
_LEAD = r"(?<![\w.])(?<![<>≤≥])(?<![<>≤≥] )~?"
_NUM = _LEAD + r"\d+(?:[.,]\d+)*"
_TIME_UNIT = r"(?:ms|µs|us|ns|s|secs?|seconds?|min|minutes?|h|hours?)"
_SUBSECOND = re.compile(_NUM + r"\s?(?:ms|µs|us|ns|milliseconds?|microseconds?|nanoseconds?)\b")
_THROUGHPUT = re.compile(
    _NUM + r"\s?(?:[KMGT]i?B/s|[KMGT]?FLOP/s|[KMGT]?FLOPS|tok/s|tokens/s|samples/s|it/s|req/s)",
)
# A share of a reference: "95% of cuBLAS", "56% of the decode roofline".
_SHARE = re.compile(
    _NUM + r"\s?% of (?:the )?(?:\w+ )?(?:cuBLAS|cuDNN|peak|roofline|bandwidth|HBM|step|time)\b",
    re.IGNORECASE,
)
_SPEEDUP = re.compile(
    _NUM + r"\s?(?:x|×|times)\s+(?:faster|slower|quicker|the speed|speed-?up)\b"
    r"|\b(?:faster|slower|speed-?ups?)\b\W+(?:\w+\W+){0,4}?" + _NUM + r"\s?(?:x|×)(?!\w)",
    re.IGNORECASE,
)
# A figure: a number with a unit, a percentage or ratio, a decimal or a scientific number (not a
# plain integer, a model size like 0.6B, nor a version: see _VERSION_BEFORE).
_FIGURE = re.compile(
    _NUM + r"\s?(?:" + _TIME_UNIT + r"|[KMGT]i?B|%)(?![\w/])"
    r"|" + _NUM + r"\s?[x×](?![\w/]|\s*[\d(])"  # a ratio, not a shape (576 x 1536) or a product
    r"|" + _LEAD + r"\d+\.\d+(?![\w.])"
    r"|" + _LEAD + r"\d+(?:\.\d+)?e-?\d+\b",
)
_CONTEXT = re.compile(
    r"\b(?:measured|measuring|measurement|took|timed|profiled?|profiling|benchmarked)\b"
    r"|\bon (?:an? |the )?(?:H100|H200|A100|B200|GPU|CPU|host)\b"
    r"|\b\d+[- ](?:CPU[- ])?cores?\b|\b(?:faster|slower)\b"
    r"|\b(?:host|GPU|CPU|device|wall)[- ]time\b|\bof (?:a|the) (?:\w+ )?(?:step|rollout)\b",
    re.IGNORECASE,
)
# A configuration word right before a sub-second time: "every 50 ms", "timeout of 200 ms".
_CONFIG_BEFORE = re.compile(
    r"\b(?:timeouts?|intervals?|every|sleeps?|poll(?:s|ing)?|waits?|deadlines?|defaults?|limits?|at most"
    r"|up to|retry|retries|backoff)(?:\s+(?:of|is|=|to|for|by))?\s*[:=(]?\s*$",
    re.IGNORECASE,
)
# A setting written out: "r = 0.5".
_SETTING_BEFORE = re.compile(r"\b[A-Za-z_]\w*\s?=\s?$")
_VERSION_BEFORE = re.compile(
    r"\b(?:torch|pytorch|python|cuda|cudnn|nccl|triton|transformers|sglang|vllm|version|v)\s?$",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.;!?](?=\s|$)|\n\s*\n")
_CODE_LITERAL = re.compile(r"``.*?``", re.DOTALL)


def _sentences(text: str) -> Iterator[tuple[int, int]]:
    start = 0
    for m in _SENTENCE_END.finditer(text):
        yield start, m.end()
        start = m.end()
    yield start, len(text)


def measured_figures(text: str) -> list[tuple[int, str]]:
    """``(offset, excerpt)`` of every measured figure in ``text`` (one comment block or docstring)."""
    text = _CODE_LITERAL.sub(lambda m: " " * len(m.group()), text)
    hits: dict[int, str] = {}
    for pattern in (_THROUGHPUT, _SHARE, _SPEEDUP):
        for m in pattern.finditer(text):
            hits.setdefault(m.start(), m.group())
    for m in _SUBSECOND.finditer(text):
        if not _CONFIG_BEFORE.search(text[max(0, m.start() - 40) : m.start()]):
            hits.setdefault(m.start(), m.group())
    for start, end in _sentences(text):
        sentence = text[start:end]
        if not _CONTEXT.search(sentence):
            continue
        for m in _FIGURE.finditer(sentence):
            before = sentence[max(0, m.start() - 14) : m.start()]
            if not (_VERSION_BEFORE.search(before) or _SETTING_BEFORE.search(before)):
                hits.setdefault(start + m.start(), m.group())
    return sorted(hits.items())


def _texts(source: str) -> Iterator[tuple[int, str]]:
    """``(first line, text)`` of each comment block (consecutive comment lines) and docstring."""
    block: list[str] = []
    block_start = last = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.start[0]
        if block and line != last + 1:
            yield block_start, "\n".join(block)
            block = []
        if not block:
            block_start = line
        block.append(tok.string.lstrip("#"))
        last = line
    if block:
        yield block_start, "\n".join(block)
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            yield node.lineno, node.value.value


def scan(source: str, name: str) -> list[str]:
    """``name:line: excerpt`` for every measured figure in ``source``'s comments and docstrings."""
    found = []
    for line, text in _texts(source):
        for offset, excerpt in measured_figures(text):
            found.append(f"{name}:{line + text.count(chr(10), 0, offset)}: {excerpt!r}")
    return found


def test_scanner_flags_a_measured_figure() -> None:
    sample = '''
def f():
    """Built in numpy: a nested-list tensor of 256 tables took 1.7 ms a step on the host."""
    # Fused: 0.21 s on 2 CPU cores, ~3x faster than single-tensor.
    # A broadcast ran at 7.3 GB/s.
    x = 1  # measured max |dlogp| 2.6e-3 on an H100
    # The invariant GEMM runs at 732 TFLOP/s = 95% of cuBLAS.
'''
    found = scan(sample, "sample.py")
    assert any(f.startswith("sample.py:3:") and "1.7 ms" in f for f in found), found
    assert any(f.startswith("sample.py:4:") and "0.21 s" in f for f in found), found
    assert any(f.startswith("sample.py:4:") and "3x faster" in f for f in found), found
    assert any(f.startswith("sample.py:5:") and "GB/s" in f for f in found), found
    assert any(f.startswith("sample.py:6:") and "2.6e-3" in f for f in found), found
    assert any(f.startswith("sample.py:7:") and "95% of cuBLAS" in f for f in found), found


def test_scanner_passes_non_measured_numbers() -> None:
    sample = '''
"""Rollout progress, e.g. ``"rollout 3: 96/128 samples, 12.3 s, ETA 4.1 s"``."""

def f(timeout_s: float = 600.0):
    """Wait at most ``timeout_s`` seconds (default 600 s), polling every 50 ms; returns the
    seconds it took. The peak is measured: the best of a few square matmuls (4096 on CUDA,
    1024 on CPU). A profiled Qwen3-0.6B step on an H100 spent its idle time on the host."""
    # Equal (fp32: to ~1e-6) to the reference. A 150k vocabulary over 16k tokens is ~10 GB.
    # Block sizes per device: (256, 64, 128) on CUDA; torch.tensor(rewards).std() > 1e-6.
    # Probed once: torch 2.13 also runs it on CPU.
    # Flagged when other processes took > 5% of the machine; a shape of 576 x 1536 on the CPU.
    # MFU = 6 x (active) parameters x tokens / step time / peak measured with r = 0.5 on a GPU.
    return timeout_s  # every 30 s a line saying how many samples wait
'''
    assert scan(sample, "sample.py") == []


def test_no_measured_figures_in_miles_comments() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += scan(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, (
        "measured figures in comments or docstrings (move them to docs/performance.md or "
        "benchmarks/results/ and say why in words):\n" + "\n".join(found)
    )
