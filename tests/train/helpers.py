"""Shared helpers of the trainer tests: tiny models, packed batches, config sections, the
checkpoint tests' trainer, an injected out-of-memory error and the full-disk child process."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from miles.config import AlgoConfig, TrainConfig
from miles.models import CausalLM, ModelSpec
from miles.models.loading import CheckpointError, build_model
from miles.train.checkpoint import latest_step, load_checkpoint, save_checkpoint
from miles.train.critic import Critic, ValueModel
from miles.train.trainer import Trainer
from miles.types import TrainBatch
from tests.models.conftest import CASES

# ---- tiny models, batches and config sections (the trainer tests) ----------------------------

LENGTHS = (7, 12, 5, 9, 11, 6)


def make_model(case: str = "llama", seed: int = 0) -> CausalLM:
    """A tiny CausalLM from a tests/models case, with weights large enough to give real gradients."""
    prefix, kwargs = CASES[case]
    spec = ModelSpec.from_hf_config({"architectures": [f"{prefix}ForCausalLM"], **kwargs})
    model = build_model(spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def make_batch(
    lengths: Sequence[int] = LENGTHS, prompt_len: int = 3, vocab: int = 128, seed: int = 0
) -> TrainBatch:
    """Packed random sequences; the first ``prompt_len`` tokens of each are the prompt (mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    t = int(cu[-1])
    positions = torch.cat([torch.arange(n) for n in lengths])
    loss_mask = (positions >= prompt_len).float()
    adv_seq = torch.randn(b, generator=gen)
    advantages = torch.repeat_interleave(adv_seq, torch.tensor(lengths)) * loss_mask
    return TrainBatch(
        input_ids=torch.randint(0, vocab, (t,), generator=gen),
        positions=positions,
        cu_seqlens=cu,
        loss_mask=loss_mask,
        rollout_logprobs=-torch.rand(t, generator=gen) * 3 * loss_mask,
        advantages=advantages,
        rewards=adv_seq.clone(),
        response_lens=torch.tensor([n - prompt_len for n in lengths]),
        sample_indices=tuple(range(b)),
    )


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


_TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def sections(**settings: Any) -> tuple[TrainConfig, AlgoConfig]:
    """The ``TrainConfig`` and ``AlgoConfig`` of ``settings`` (each key goes to the section that has
    that field), over the base these trainer tests use: AdamW without weight decay and the
    token-mean loss (``--calculate-per-token-loss``)."""
    merged = {"weight_decay": 0.0, "calculate_per_token_loss": True, **settings}
    train = {k: v for k, v in merged.items() if k in _TRAIN_FIELDS}
    algo = {k: v for k, v in merged.items() if k not in _TRAIN_FIELDS}
    return TrainConfig(**train), AlgoConfig(**algo)


POLICY = dict(lr=1e-2, clip_grad=0.0, eps_clip=0.2, use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01)


# ---- the checkpoint tests' trainer -----------------------------------------------------------

CHECKPOINT_CONFIG: dict[str, Any] = dict(
    lr=1e-2,
    lr_warmup_iters=2,
    lr_decay_style="cosine",
    lr_decay_iters=10,
    weight_decay=0.1,
    clip_grad=0.5,
    use_dynamic_batch_size=True,
    max_tokens_per_gpu=24,
    use_tis=True,
)


def checkpoint_model(seed: int = 0) -> CausalLM:
    """make_model("llama") with ``model_type`` in its config, so that transformers reads the export."""
    prefix, kwargs = CASES["llama"]
    spec = ModelSpec.from_hf_config(
        {"architectures": [f"{prefix}ForCausalLM"], "model_type": "llama", **kwargs}
    )
    model = build_model(spec)
    model.load_state_dict(make_model("llama", seed=seed).state_dict())
    return model


def checkpoint_batch(step: int) -> TrainBatch:
    b = make_batch(seed=step)
    return dataclasses.replace(b, returns=b.advantages * 0.5 + 0.1)


def checkpoint_trainer(seed: int = 0, critic: bool = False) -> Trainer:
    model = checkpoint_model(seed)
    c = Critic(ValueModel.from_policy(model), *sections(lr=1e-2)) if critic else None
    return Trainer(model, *sections(**CHECKPOINT_CONFIG), critic=c)


def trainer_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"policy.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    if trainer.critic is not None:
        out.update({f"critic.{n}": p.detach().clone() for n, p in trainer.critic.model.named_parameters()})
    return out


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- out-of-memory injection ----------------------------------------------------------------


def inject_oom(trainer: Trainer, where: str, max_tokens: int, times: int = 1) -> list[int]:
    """Raise OutOfMemoryError in the forward (or backward) of the first ``times`` micro-batches
    with more than ``max_tokens`` tokens. Returns the list of micro-batch sizes seen."""
    seen: list[int] = []
    state = {"left": times, "tokens": 0}

    def maybe_raise(tokens: int) -> None:
        if tokens > max_tokens and state["left"] > 0:
            state["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    def forward_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        state["tokens"] = args[0].numel()
        seen.append(state["tokens"])
        if where == "forward":
            maybe_raise(state["tokens"])

    def backward_hook(module: torch.nn.Module, grad_output: Any) -> None:
        maybe_raise(state["tokens"])

    trainer.model.register_forward_pre_hook(forward_hook)
    if where == "backward":
        trainer.model.model.layers[0].register_full_backward_pre_hook(backward_hook)
    return seen


# ---- full disk (run in a subprocess by test_checkpoint_integrity) -----------------------------


def full_disk_child(directory: str) -> None:
    """In a mount namespace whose ``directory`` is a tmpfs with room for one checkpoint only."""
    root = Path(directory)
    trainer = checkpoint_trainer()
    trainer.train_step(checkpoint_batch(1))
    save_checkpoint(root, trainer, 1, {"pos": 1})
    want = trainer_params(trainer)
    trainer.train_step(checkpoint_batch(2))
    try:
        save_checkpoint(root, trainer, 2, {"pos": 2})
    except CheckpointError as e:
        shard = root / ".iter_0000002.tmp" / "dcp" / "__0_0.distcp"
        assert str(e).startswith(f"no space left on device while writing {shard}; step 2"), str(e)
    else:
        raise AssertionError("the second save fitted: the tmpfs is too large for this test")
    assert latest_step(root) == 1
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    fresh = checkpoint_trainer(seed=3)
    assert load_checkpoint(root, fresh) == {"pos": 1}
    assert_bitwise(trainer_params(fresh), want)
    print("FULL-DISK-OK")
