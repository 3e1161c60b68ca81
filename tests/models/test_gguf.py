"""GGUF reading: a tiny model written in llama.cpp's layout loads to the same weights as its HF twin.

The writer (``write_gguf``, tests/models/helpers.py) follows llama.cpp's converter conventions
(tensor names, stacked experts, and the q/k row permutation of ``llama`` models), so the reader's
inverse mapping is checked for real.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miles.models import UnsupportedModelError
from miles.models.loading import load_model
from tests.models.helpers import write_gguf

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("name, arch", [("llama", "llama"), ("qwen3", "qwen3"), ("qwen3_moe", "qwen3moe")])
def test_gguf_loads_the_same_weights(tiny_checkpoints, tmp_path, name, arch):
    _, path = tiny_checkpoints[name]
    hf_loaded = load_model(path)
    target = tmp_path / "model.gguf"
    write_gguf(hf_loaded, arch, target)
    from_gguf = load_model(target)
    assert from_gguf.spec.family == hf_loaded.spec.family
    assert from_gguf.spec.tie_word_embeddings == hf_loaded.spec.tie_word_embeddings
    for key, value in hf_loaded.state_dict().items():
        assert torch.equal(from_gguf.state_dict()[key], value), key
    # A directory holding one .gguf resolves to it.
    assert torch.equal(load_model(tmp_path).lm_head.weight, hf_loaded.lm_head.weight)


def test_unsupported_gguf_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        UnsupportedModelError, match="GGUF architecture 'gpt2' is not supported; supported: llama"
    ):
        load_model(tmp_path / "m.gguf")


def test_gguf_rope_freqs_is_named(tiny_checkpoints, tmp_path):
    model = load_model(tiny_checkpoints["llama"][1])
    target = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(target), "llama")
    w.add_block_count(model.spec.num_hidden_layers)
    w.add_embedding_length(model.spec.hidden_size)
    w.add_head_count(model.spec.num_attention_heads)
    w.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        load_model(target)
