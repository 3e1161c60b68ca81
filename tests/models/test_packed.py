"""Packed projections (``miles.models.layers.pack_projections``): the engine's q/k/v and gate/up
GEMMs merged, with the parameters left as views of the packed tensors."""

from __future__ import annotations

import pytest
import torch

from miles.config import EngineConfig
from miles.engine.engine import Engine
from miles.kernels.batch_invariant import batch_invariant
from miles.models.attention import VarlenContext
from miles.models.layers import Attention, SwiGLUMLP, pack_projections
from miles.models.loading import load_model
from tests.models.conftest import save_case
from tests.tolerance import assert_reduction_close, step_terms


def _model(tmp_path, name):
    save_case(name, tmp_path)
    return load_model(tmp_path)


def _forward(model, ids):
    ctx = VarlenContext.single(len(ids), ids.device)
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids)), ctx))


def _assert_close(got, want, model, ids, msg=""):
    """Packed and separate projections are GEMMs of other shapes: the same logits to rounding."""
    assert_reduction_close(got, want, step_terms(model.spec, len(ids), backward=False), msg)


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2_rope_yarn", "qwen3_moe"])
def test_packed_forward_equals_the_separate_projections(tmp_path, name):
    model = _model(tmp_path, name)
    ids = torch.randint(0, 100, (13,), generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _forward(model, ids)
    pack_projections(model)
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    assert attn and all(m.packed.weight is not None for m in attn)
    if name == "qwen2_rope_yarn":  # q/k/v biases are packed with their weights
        assert all(m.packed.bias is not None for m in attn)
    # Same names, same values; the parameters are views of the packed storage.
    packed_state = model.state_dict()
    assert packed_state.keys() == state.keys()
    assert all(torch.equal(packed_state[k], v) for k, v in state.items())
    for m in attn:
        assert m.q_proj.weight.untyped_storage().data_ptr() == m.packed.weight.untyped_storage().data_ptr()
    _assert_close(_forward(model, ids), ref, model, ids, "packed")
    # An in-place update of a parameter is seen by the packed GEMM.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Attention | SwiGLUMLP):
                for p in m.parameters(recurse=False):
                    p.mul_(1.5)
                for lin in [c for c in m.children() if isinstance(c, torch.nn.Linear)]:
                    lin.weight.mul_(0.5)
    updated = _forward(model, ids)
    pack_projections(model, on=False)
    _assert_close(updated, _forward(model, ids), model, ids, "updated")
    assert not torch.allclose(updated, ref)


def test_packed_path_is_skipped_when_stale_with_grad_or_deterministic(tmp_path):
    model = _model(tmp_path, "llama")
    pack_projections(model)
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    linears = (attn.q_proj, attn.k_proj, attn.v_proj)
    with torch.no_grad():
        assert attn.packed.weights(linears) is not None
    assert attn.packed.weights(linears) is None  # autograd on: the trainer's path
    with torch.no_grad(), batch_invariant():
        assert attn.packed.weights(linears) is None  # per-projection invariant kernels
    attn.k_proj.weight.data = attn.k_proj.weight.data.clone()  # e.g. a memory release/restore
    with torch.no_grad():
        assert attn.packed.weights(linears) is None
    ids = torch.arange(5)
    before = _forward(model, ids)  # still correct: the separate projections run
    pack_projections(model, on=False)
    # (Not bit for bit: the MLP's gate/up GEMM was still packed, a GEMM of another shape.)
    _assert_close(before, _forward(model, ids), model, ids, "stale")


def test_packing_twice_keeps_the_storage(tmp_path):
    """Two engines may share a model: the second's packing must not move what the first's CUDA
    graphs read (a GPU test caught tokens going wrong when it did)."""
    model = _model(tmp_path, "qwen3")
    pack_projections(model)
    first = [
        (m.packed.weight, m.q_proj.weight.data_ptr()) for m in model.modules() if isinstance(m, Attention)
    ]
    pack_projections(model)
    again = [
        (m.packed.weight, m.q_proj.weight.data_ptr()) for m in model.modules() if isinstance(m, Attention)
    ]
    assert all(a[0] is b[0] and a[1] == b[1] for a, b in zip(first, again))


def test_mixed_biases_are_refused(tmp_path):
    model = _model(tmp_path, "llama")
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    attn.q_proj.bias = torch.nn.Parameter(torch.zeros(attn.q_proj.weight.shape[0]))
    with pytest.raises(ValueError, match="only some have a bias"):
        attn.packed.pack((attn.q_proj, attn.k_proj, attn.v_proj))


def test_engine_packs_on_cuda_only(tmp_path):
    model = _model(tmp_path, "llama")
    Engine(model, config=EngineConfig(page_size=4), num_blocks=8)
    assert all(m.packed.weight is None for m in model.modules() if isinstance(m, Attention))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_release_frees_the_packed_copies_and_resume_repacks(tmp_path):
    save_case("qwen3", tmp_path)
    model = load_model(tmp_path, device="cuda")
    engine = Engine(model, num_blocks=64)
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    assert all(m.packed.weight is not None for m in attn)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    from miles.types import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    before = engine.generate(prompts, params)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    engine.release_memory_occupation(["weights"])
    assert all(m.packed.weight is None for m in attn)
    assert engine.last_memory_release["weights"] >= weight_bytes  # the packed copies went too
    engine.resume_memory_occupation(["weights"])
    assert all(m.packed.weight is not None for m in attn)
    after = engine.generate(prompts, params)
    assert [o.output_ids for o in after] == [o.output_ids for o in before]
    assert [o.output_logprobs for o in after] == [o.output_logprobs for o in before]
