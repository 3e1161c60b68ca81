"""--optimizer-cpu-offload: the CPU AdamW over fp32 masters equals the plain AdamW bit for bit (CPU),
checkpoints load across the two, FSDP2 shards stay local, and the device keeps no optimizer state
(CUDA)."""

from __future__ import annotations

import dataclasses
import gc
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from miles.models import CausalLM, ModelSpec
from miles.models.loading import build_model
from miles.train.checkpoint import load_checkpoint, save_checkpoint
from miles.train.critic import Critic, ValueModel
from miles.train.optim import CpuOffloadedOptimizer
from miles.train.packing import shard_for_rank
from miles.train.parallelize import parallelize
from miles.train.trainer import Trainer
from miles.types import TrainBatch
from tests.models.conftest import COMMON
from tests.spawn import exits_cleanly
from tests.train.helpers import inject_oom, make_batch, make_model, sections

CONFIG: dict[str, Any] = dict(
    lr=1e-2,
    lr_warmup_iters=2,
    lr_decay_style="cosine",
    lr_decay_iters=10,
    weight_decay=0.1,
    clip_grad=0.5,  # active: the norm is ~1
    use_dynamic_batch_size=True,
    max_tokens_per_gpu=24,
    use_tis=True,
)


def _batch(seed: int) -> TrainBatch:
    b = make_batch(seed=seed)
    return dataclasses.replace(b, returns=b.advantages * 0.5 + 0.1)


def _nan_batch() -> TrainBatch:
    b = _batch(9)
    return dataclasses.replace(b, advantages=torch.full_like(b.advantages, float("nan")))


def _trainer(
    offload: bool,
    *,
    seed: int = 0,
    critic: bool = False,
    model: CausalLM | None = None,
    device: str = "cpu",
) -> Trainer:
    model = make_model(seed=seed).to(device) if model is None else model
    c = None
    if critic:
        c = Critic(ValueModel.from_policy(model), *sections(lr=1e-2, optimizer_cpu_offload=offload), device)
    return Trainer(model, *sections(**CONFIG, optimizer_cpu_offload=offload), device, critic=c)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"policy.{n}": p.detach().cpu().clone() for n, p in trainer.model.named_parameters()}
    if trainer.critic is not None:
        out.update(
            {f"critic.{n}": p.detach().cpu().clone() for n, p in trainer.critic.model.named_parameters()}
        )
    return out


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_same_metrics(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for k in a:  # the same float bits (NaN where a skipped step reports one)
        assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), (k, a[k], b[k])


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    sd = optimizer.state_dict()
    return {f"{i}.{k}": v.detach().cpu().clone() for i, s in sd["state"].items() for k, v in s.items()}


def test_offloaded_step_equals_plain_adamw_bitwise() -> None:
    """Policy and critic, LR warm-up + cosine, active clipping, weight decay and a NaN-skipped
    step: the CPU masters path gives the plain AdamW's parameters, state and metrics, bit for bit."""
    plain, off = _trainer(False, critic=True), _trainer(True, critic=True)
    assert isinstance(off.optimizer, CpuOffloadedOptimizer) and off.critic is not None
    assert isinstance(off.critic.optimizer, CpuOffloadedOptimizer)
    assert not isinstance(plain.optimizer, CpuOffloadedOptimizer)
    for batch in (_batch(1), _nan_batch(), _batch(2)):
        _assert_same_metrics(off.train_step(batch), plain.train_step(batch))
    assert off.skipped_steps == plain.skipped_steps == 1
    assert off.scheduler.last_epoch == plain.scheduler.last_epoch == 2  # the NaN step did not count
    _assert_bitwise(_params(off), _params(plain))
    _assert_bitwise(_optimizer_state(off.optimizer), _optimizer_state(plain.optimizer))
    _assert_bitwise(_optimizer_state(off.critic.optimizer), _optimizer_state(plain.critic.optimizer))
    # The masters are separate CPU memory, not the parameters; gradients were released.
    for p in off.model.parameters():
        slot = off.optimizer._slots[p]
        assert slot.master.data_ptr() != p.data_ptr() and torch.equal(slot.master, p.detach())
        assert p.grad is None and all(v.device.type == "cpu" for v in off.optimizer.state[p].values())


def test_oom_split_retry_with_offload() -> None:
    """An OOM split inside the step leaves the offloaded update equal to the plain one's."""
    results = []
    for offload in (False, True):
        trainer = _trainer(offload)
        inject_oom(trainer, "backward", max_tokens=20)
        metrics = trainer.train_step(_batch(1))
        assert metrics["train/oom_retries"] >= 1 and metrics["train/skipped_steps"] == 0
        results.append((metrics, _params(trainer)))
    _assert_same_metrics(results[0][0], results[1][0])
    _assert_bitwise(results[0][1], results[1][1])


def test_sleep_wake_leaves_offloaded_state_in_place() -> None:
    want = _trainer(True)
    want.train_step(_batch(1))
    want_metrics = want.train_step(_batch(2))

    trainer = _trainer(True)
    trainer.train_step(_batch(1))
    ptrs = {k: v.data_ptr() for s in trainer.optimizer.state.values() for k, v in s.items()}
    trainer.sleep()
    trainer.wake_up()
    assert {k: v.data_ptr() for s in trainer.optimizer.state.values() for k, v in s.items()} == ptrs
    _assert_same_metrics(trainer.train_step(_batch(2)), want_metrics)
    _assert_bitwise(_params(trainer), _params(want))


@pytest.mark.parametrize(
    ("save_offload", "load_offload", "critic"),
    [(True, False, False), (False, True, False), (True, True, True)],
    ids=["offload->plain", "plain->offload", "offload->offload+critic"],
)
def test_checkpoint_loads_across_offload_modes(
    tmp_path: Path, save_offload: bool, load_offload: bool, critic: bool
) -> None:
    trainer = _trainer(save_offload, critic=critic)
    for step in (1, 2):
        trainer.train_step(_batch(step))
    save_checkpoint(tmp_path, trainer, 2)
    saved_state = _optimizer_state(trainer.optimizer)
    want = trainer.train_step(_batch(3))

    fresh = _trainer(load_offload, seed=7, critic=critic)  # other weights: all must come from disk
    load_checkpoint(tmp_path, fresh)
    _assert_bitwise(_optimizer_state(fresh.optimizer), saved_state)
    # The loading run's AdamW implementation, not the checkpoint's.
    assert isinstance(fresh.optimizer, CpuOffloadedOptimizer) == load_offload
    _assert_same_metrics(fresh.train_step(_batch(3)), want)
    _assert_bitwise(_params(fresh), _params(trainer))


def test_low_precision_params_keep_fp32_masters(tmp_path: Path) -> None:
    """bf16 parameters: the masters are fp32 and saved with the checkpoint; a resume restores
    them (the next step is bit-identical); a run without offload loads the same checkpoint."""
    trainer = _trainer(True, model=make_model().to(torch.bfloat16))
    trainer.train_step(_batch(1))
    opt = trainer.optimizer
    assert isinstance(opt, CpuOffloadedOptimizer) and opt.has_separate_masters
    slots = [opt._slots[p] for p in trainer.model.parameters()]
    assert all(s.master.dtype == torch.float32 and s.param.dtype == torch.bfloat16 for s in slots)
    assert all(torch.equal(s.master.to(torch.bfloat16), s.param.detach()) for s in slots)
    # The masters hold what bf16 rounds away: the parameters alone could not restore them.
    assert any(not torch.equal(s.master, s.param.detach().float()) for s in slots)
    assert all(v.dtype == torch.float32 for st in opt.state.values() for k, v in st.items() if k != "step")

    path = save_checkpoint(tmp_path, trainer, 1)
    keys = dcp.FileSystemReader(path / "dcp").read_metadata().state_dict_metadata
    assert "policy.master.model.embed_tokens.weight" in keys
    want = trainer.train_step(_batch(2))

    fresh = _trainer(True, seed=7, model=make_model(seed=7).to(torch.bfloat16))
    load_checkpoint(tmp_path, fresh)
    _assert_same_metrics(fresh.train_step(_batch(2)), want)
    _assert_bitwise(_params(fresh), _params(trainer))

    plain = _trainer(False, seed=7, model=make_model(seed=7).to(torch.bfloat16))
    load_checkpoint(tmp_path, plain)  # ignores the masters; bf16 AdamW state from the fp32 one
    saved = torch.load(path / "trainer_state.pt", weights_only=True)
    assert plain.scheduler.state_dict() == saved["schedulers"]["policy"]
    assert plain.train_step(_batch(2))["train/skipped_steps"] == 0


# --------------------------------------------------------------------------------------------
# Two FSDP2 ranks (gloo): each rank steps its own shard; checkpoints cross-load
# --------------------------------------------------------------------------------------------

WORLD = 2


@exits_cleanly
def _fsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, Any] = {}
        for name, offload, load_from in (
            ("plain", False, None),
            ("offload", True, None),
            ("offload_from_plain", True, "plain"),
            ("plain_from_offload", False, "offload"),
        ):
            model = parallelize(make_model(seed=0 if load_from is None else 5))
            trainer = Trainer(model, *sections(**CONFIG, optimizer_cpu_offload=offload))
            if load_from is None:
                trainer.train_step(shard_for_rank(_batch(1), rank, WORLD))
                save_checkpoint(Path(out_dir) / name, trainer, 1)
            else:
                load_checkpoint(Path(out_dir) / load_from, trainer)
            if isinstance(trainer.optimizer, CpuOffloadedOptimizer):  # masters: this rank's shard
                for p in model.parameters():
                    local = p.to_local()  # type: ignore[attr-defined]
                    master = trainer.optimizer._slots[p].master
                    assert master.shape == local.shape and master.numel() < p.numel()
                    assert torch.equal(master, local)
            metrics = trainer.train_step(shard_for_rank(_batch(2), rank, WORLD))
            params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
            results[name] = {"metrics": metrics, "params": params}
        if rank == 0:
            torch.save(results, Path(out_dir) / "result.pt")
    finally:
        # Every rank reaches this point before any tears gloo down (see test_checkpoint.py).
        dist.barrier()
        dist.destroy_process_group()


def test_fsdp2_two_ranks_offload_equals_plain_and_cross_loads(tmp_path: Path) -> None:
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "result.pt")
    want = results["plain"]
    for name in ("offload", "offload_from_plain", "plain_from_offload"):
        _assert_same_metrics(results[name]["metrics"], want["metrics"])
        _assert_bitwise(results[name]["params"], want["params"])


# --------------------------------------------------------------------------------------------
# CUDA (pytest -m gpu)
# --------------------------------------------------------------------------------------------


def _wider_model() -> CausalLM:
    """A Llama of ~13M parameters: its Adam state (~100 MB) dwarfs allocator rounding."""
    spec = ModelSpec.from_hf_config(
        {
            "architectures": ["LlamaForCausalLM"],
            **dict(COMMON, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, vocab_size=1024),
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
        }
    )
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def _device_bytes_held_by_training(offload: bool) -> tuple[int, int]:
    """(bytes ``memory_allocated`` grew by through a Trainer and two steps, parameter bytes)."""
    torch.manual_seed(0)
    model = _wider_model().cuda()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    trainer = _trainer(offload, model=model, device="cuda")
    for step in (1, 2):
        assert trainer.train_step(_batch(step))["train/skipped_steps"] == 0
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return held, param_bytes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_keeps_optimizer_state_off_the_device() -> None:
    plain, param_bytes = _device_bytes_held_by_training(offload=False)
    off, _ = _device_bytes_held_by_training(offload=True)
    # Plain fp32 AdamW keeps exp_avg + exp_avg_sq on the device: 2x the parameter bytes.
    assert plain >= 1.9 * param_bytes
    assert plain - off >= 1.5 * param_bytes, (plain, off, param_bytes)
    assert off <= 0.1 * param_bytes, (off, param_bytes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checkpoint_cross_load_keeps_each_runs_adamw(tmp_path: Path) -> None:
    """Fused CUDA AdamW -> offload -> fused again: the state survives both loads exactly, and each
    run keeps its own implementation (fused, step counters on the device / CPU AdamW)."""
    plain = _trainer(False, device="cuda")
    plain.train_step(_batch(1))
    save_checkpoint(tmp_path / "a", plain, 1)
    off = _trainer(True, seed=7, device="cuda")
    load_checkpoint(tmp_path / "a", off)
    _assert_bitwise(_optimizer_state(off.optimizer), _optimizer_state(plain.optimizer))
    _assert_bitwise(_params(off), _params(plain))
    assert all(v.device.type == "cpu" for s in off.optimizer.state.values() for v in s.values())
    assert off.train_step(_batch(2))["train/skipped_steps"] == 0
    save_checkpoint(tmp_path / "b", off, 2)

    again = _trainer(False, seed=3, device="cuda")
    load_checkpoint(tmp_path / "b", again)
    assert all(g["fused"] for g in again.optimizer.param_groups)
    _assert_bitwise(_optimizer_state(again.optimizer), _optimizer_state(off.optimizer))
    assert all(v.is_cuda for s in again.optimizer.state.values() for v in s.values())
    metrics = again.train_step(_batch(3))
    assert metrics["train/skipped_steps"] == 0 and math.isfinite(metrics["train/loss"])


def _cuda_fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    try:
        out = Path(out_dir)

        def trainer(offload: bool, seed: int) -> Trainer:
            model = parallelize(make_model(seed=seed).to(device), param_dtype=torch.bfloat16)
            return Trainer(model, *sections(**CONFIG, optimizer_cpu_offload=offload), device)

        def local_state(t: Trainer) -> dict[str, torch.Tensor]:
            sd = t.optimizer.state_dict()["state"]
            return {
                f"{i}.{k}": (v.to_local() if hasattr(v, "to_local") else v).detach().cpu().clone()
                for i, s in sd.items()
                for k, v in s.items()
            }

        def full_params(t: Trainer) -> dict[str, torch.Tensor]:
            return {n: p.full_tensor().detach().cpu() for n, p in t.model.named_parameters()}

        results: dict[str, Any] = {}
        a = trainer(True, 0)  # offloaded: state on CPU, DTensor views over a CUDA mesh
        a.train_step(shard_for_rank(_batch(1), rank, world))
        save_checkpoint(out / "off", a, 1)
        results["saved"] = local_state(a)
        results["a"] = (a.train_step(shard_for_rank(_batch(2), rank, world)), full_params(a))
        del a
        b = trainer(False, 5)  # fused CUDA AdamW loads the offloaded checkpoint
        load_checkpoint(out / "off", b)
        results["b_loaded"] = local_state(b)
        assert all(g["fused"] for g in b.optimizer.param_groups)
        save_checkpoint(out / "plain", b, 1)
        results["b"] = (b.train_step(shard_for_rank(_batch(2), rank, world)), full_params(b))
        del b
        c = trainer(True, 7)  # and back
        load_checkpoint(out / "plain", c)
        results["c_loaded"] = local_state(c)
        results["c"] = (c.train_step(shard_for_rank(_batch(2), rank, world)), full_params(c))
        torch.save(results, out / f"result{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fsdp2_offload_checkpoints_cross_load(tmp_path: Path) -> None:
    """FSDP2 (bf16 compute) on up to 2 GPUs: offloaded state saved through DCP loads into the fused
    CUDA AdamW and back, exactly; the next steps agree to rounding (CPU vs fused CUDA AdamW)."""
    world = min(2, torch.cuda.device_count())
    mp.spawn(_cuda_fsdp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        r = torch.load(tmp_path / f"result{rank}.pt")
        for k, v in r["saved"].items():
            assert torch.equal(r["b_loaded"][k].to(v.device), v), k
            assert torch.equal(r["c_loaded"][k], v), k
        (want, want_params) = r["a"]
        for name in ("b", "c"):
            metrics, params = r[name]
            assert metrics["train/skipped_steps"] == 0
            assert metrics["train/loss"] == pytest.approx(want["train/loss"], rel=1e-3, abs=1e-4)
            for n, p in params.items():
                torch.testing.assert_close(p, want_params[n], rtol=0, atol=1e-4, msg=n)
