"""Token sampling with SGLang's sampling parameters, returning each token's log-probability.

Per row (request), in this order:

1. penalties on the fp32 logits: ``repetition_penalty`` over prompt and output tokens (positive
   logits divided by it, negative ones multiplied), ``frequency_penalty`` times each token's
   count in the output, ``presence_penalty`` for every token present in the output;
2. ``min_new_tokens``: until reached, EOS (unless ``ignore_eos``) and ``stop_token_ids`` get
   ``-inf``;
3. greedy (``temperature`` 0 or below ``GREEDY_TEMPERATURE``, where dividing by it would overflow
   the logits: see ``miles.types``): the argmax; its logprob is ``log_softmax`` of the logits
   after steps 1-2;
4. otherwise the logits are divided by ``temperature`` and the kept set is the intersection of
   top-k, top-p (smallest prefix of the sorted probabilities whose mass before a token is <= p)
   and min-p (probability >= ``min_p`` x the largest), all computed on the temperature-scaled
   distribution, as SGLang does. The token is drawn from the renormalised kept set and its
   logprob is ``log_softmax`` over that set: the distribution actually sampled from.

Seeding: a request with ``sampling_seed`` draws its noise from a counter-based hash of (a mix of
seed and index of the token in the output, vocabulary entry) (:func:`hashed_exponential`), so its
tokens depend on nothing else (not the batch, not preemption), and a whole batch of seeded rows
takes a few tensor ops (a generator per row and step cost host time per row and step, and the
RL rollout seeds every sample: docs/performance.md). Sampling is ``argmax(probs / E)`` with
``E ~ Exp(1)`` i.i.d. per vocabulary entry, which draws exactly from ``probs``. Rows are processed independently, so a row's result
never depends on the other rows of the batch.

Every log-probability returned is finite: temperatures that would overflow the division are
greedy, ``SamplingParams`` bounds the penalties to a range that cannot overflow, the engine
refuses a request whose ``min_new_tokens`` would ban every token, the noise ``E`` is floored
above zero (a zero made ``p / E`` a NaN that ``argmax`` picked: a token outside the distribution,
log-probability ``-inf``), and top-logprob lists leave out the tokens outside the sampled
distribution. No guard reads the device: each is an in-place tensor op or a check at admission.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from miles.engine.request import Request
from miles.kernels import batch_invariant
from miles.utils.transfer import HostCopy, to_device

_MASK64 = (1 << 64) - 1
# The smallest Exp(1) noise: about -log(1 - 2**-25), meant for the hash's largest uniform. A noise
# of 0 would make a score p / 0, NaN for a masked token; P(E < 2**-25) is about 2**-25 anyway.
_MIN_NOISE = 2.0**-25


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    # In true-on-policy mode through the same fixed-shape kernel as the trainer's log-probs
    # (miles.kernels.batch_invariant.logprobs_and_entropy): equal bits for equal logits.
    if batch_invariant.enabled():
        return batch_invariant.log_softmax(x[None])[0]
    return torch.log_softmax(x, dim=-1)


def seed_for(seed: int, index: int) -> int:
    """A 63-bit generator seed mixed from ``(seed, index)`` (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _to_signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (_to_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on signed integers)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


@functools.lru_cache(maxsize=8)
def _column_keys(vocab: int, device: torch.device) -> torch.Tensor:
    """``j * golden`` for every vocabulary entry ``j`` (int64, wrapping): the same every step."""
    return torch.arange(vocab, dtype=torch.int64, device=device) * _GOLDEN


def hashed_exponential(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise fp32 ``[B, vocab]``: entry ``(i, j)`` a function of ``(keys[i], j)`` only.

    ``keys`` int64 ``[B]`` (e.g. :func:`seed_for` values, on the noise's device). The splitmix64
    finaliser of ``key ^ (j * golden)`` (int64 arithmetic wraps, as the hash wants), its top 24
    bits as a uniform in (0, 1) and ``-log`` of it. Integer ops are exact on every device.

    In fp32 the largest uniform, ``(2**24 - 0.5) / 2**24``, rounds to 1 and its ``-log`` to 0
    (one entry in 2**24: a few a step at a 150k vocabulary); the noise is floored at the value
    meant, ``_MIN_NOISE``, so no score is ``p / 0`` (a NaN or infinity that ``argmax`` takes).
    """
    x = keys.to(torch.int64)[:, None] ^ _column_keys(vocab, keys.device)[None, :]
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    u = (_shift_right(x, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return torch.log(u).neg_().clamp_min_(_MIN_NOISE)


def _exponential_(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill ``out`` with Exp(1) noise from ``generator``, floored at ``_MIN_NOISE``: the CPU's
    ``exponential_`` may return an exact 0, and a masked token's ``0 / 0`` is a NaN that
    ``argmax`` takes as the largest score (a token outside the distribution, log-probability
    ``-inf``). Torch's CUDA kernel already keeps it off 0, so there the floor changes nothing."""
    out.exponential_(generator=generator)
    return out.clamp_min_(_MIN_NOISE)


def _finite_top(pairs: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Top-logprob entries of tokens the distribution can draw (a cut token's ``-inf`` is not JSON)."""
    return [(t, v) for t, v in pairs if v != -math.inf]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]
    # Per row: the ``top_logprobs_num`` most likely (token, logprob) of the sampled-from
    # distribution, best first (empty when not asked for).
    top_logprobs: list[list[tuple[int, float]]]


@dataclass
class PendingSample:
    """A batch's draw queued on the device. ``tokens`` int64 ``[B]`` (device): the sampled ids,
    usable as the next step's inputs before the host has them; ``copy``: host copy of the
    ``[B, 2 + 2k]`` columns (token, logprob, top-k values, top-k ids)."""

    tokens: torch.Tensor
    copy: HostCopy
    top_logprobs_nums: list[int]
    k: int

    def result(self) -> SamplerOutput:
        """Wait for the draw and unpack it (the step's one device-to-host transfer)."""
        rows = self.copy.wait().tolist()
        k = self.k
        out = SamplerOutput([], [], [])
        for row, n in zip(rows, self.top_logprobs_nums):
            out.token_ids.append(int(row[0]))
            out.logprobs.append(row[1])
            out.top_logprobs.append(
                _finite_top([(int(t), v) for v, t in zip(row[2 : 2 + n], row[2 + k : 2 + k + n])])
            )
        return out


class Sampler:
    """Samples one token per row of a ``[B, V]`` logits tensor for the matching requests.

    ``generator`` drives unseeded requests (their draws depend on the engine's history).
    """

    def __init__(self, eos_token_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self.generator = generator

    def process(self, logits: torch.Tensor, req: Request) -> tuple[torch.Tensor, bool]:
        """Log-probabilities ``[V]`` of the distribution to sample from, and whether it is greedy.

        Masked tokens have ``-inf``. For greedy rows this is the log-softmax of the penalised
        logits (the argmax is taken from it).
        """
        p = req.sampling_params
        x = logits.float().clone()
        vocab = x.shape[-1]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(req.all_token_ids, dtype=torch.long, device=x.device).unique()
            vals = x[seen]
            x[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and req.output_ids:
            out = torch.tensor(req.output_ids, dtype=torch.long, device=x.device)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(x.dtype)
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
        if len(req.output_ids) < p.min_new_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
            banned = [t for t in banned if 0 <= t < vocab]
            if banned:
                x[torch.tensor(banned, dtype=torch.long, device=x.device)] = float("-inf")
        if p.greedy:
            return _log_softmax(x), True
        x = x / p.temperature
        probs = torch.softmax(x, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = torch.zeros_like(sorted_probs, dtype=torch.bool)
        if p.top_k != -1 and p.top_k < vocab:
            drop[p.top_k :] = True
        if p.top_p < 1.0:
            drop |= (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > p.top_p
        if p.min_p > 0.0:
            drop |= sorted_probs < sorted_probs[0] * p.min_p
        drop[0] = False  # the most likely token always stays
        if bool(drop.any()):
            mask = torch.zeros_like(drop).scatter(0, order, drop)
            x = x.masked_fill(mask, float("-inf"))
        return _log_softmax(x), False

    def sample(
        self,
        logits: torch.Tensor,
        requests: Sequence[Request],
        top_logprobs_nums: Sequence[int] | None = None,
    ) -> SamplerOutput:
        """One token per row. ``logits`` fp32 ``[B, V]``, row ``i`` for ``requests[i]``.

        ``requests[i].output_ids`` must hold the tokens generated so far (penalties and the seed
        index use them).
        """
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits must be [{len(requests)}, V], got {tuple(logits.shape)}")
        counts = [len(r.output_ids) for r in requests]
        plain = self._plain_logprobs(logits, requests, counts)
        if plain is not None:
            return self._launch_rows(plain, requests, top_logprobs_nums, counts).result()
        out = SamplerOutput([], [], [])
        for i, req in enumerate(requests):
            logp, greedy = self.process(logits[i], req)
            if greedy:
                token = int(torch.argmax(logp))
            else:
                token = int(torch.argmax(logp.exp() / self._exponential(logp, req)))
            out.token_ids.append(token)
            out.logprobs.append(float(logp[token]))
            k = top_logprobs_nums[i] if top_logprobs_nums is not None else 0
            if k > 0:
                vals, ids = torch.topk(logp, min(k, logp.shape[-1]))
                out.top_logprobs.append(_finite_top(list(zip(ids.tolist(), vals.tolist()))))
            else:
                out.top_logprobs.append([])
        return out

    def sample_async(
        self,
        logits: torch.Tensor,
        requests: Sequence[Request],
        top_logprobs_nums: Sequence[int] | None = None,
        num_outputs: Sequence[int] | None = None,
    ) -> PendingSample:
        """:meth:`sample` without waiting for the device: the draw is queued and its result read
        with ``PendingSample.result()``. ``num_outputs[i]`` (default ``len(output_ids)``) is how
        many tokens request ``i`` has generated, counting tokens not yet appended (the seed
        index and ``min_new_tokens`` use it). Every row must be :meth:`batchable`."""
        counts = list(num_outputs) if num_outputs is not None else [len(r.output_ids) for r in requests]
        if logits.dim() != 2 or logits.shape[0] != len(requests) or len(counts) != len(requests):
            raise ValueError(
                f"logits must be [{len(requests)}, V] with a count per row, got {tuple(logits.shape)}"
            )
        logp = self._plain_logprobs(logits, requests, counts)
        if logp is None:
            raise ValueError("sample_async needs rows without penalties, EOS bans or top-k/top-p/min-p cuts")
        return self._launch_rows(logp, requests, top_logprobs_nums, counts)

    def _launch_rows(
        self,
        logp: torch.Tensor,
        requests: Sequence[Request],
        top_logprobs_nums: Sequence[int] | None,
        counts: Sequence[int],
    ) -> PendingSample:
        """The draw over ``[B, V]`` log-probs in whole-batch ops, its read-back queued (one host
        transfer a step, and on CUDA no wait until the result is read). Row for row the same draw
        as the per-row path: the argmax of ``p / Exp(1)`` noise (greedy rows: of ``logp``); a
        seeded row draws its noise from its own generator, the others share one draw."""
        bsz, vocab = logp.shape
        greedy = [r.sampling_params.greedy for r in requests]
        if all(greedy):
            scores = logp
        else:
            unseeded = [
                i for i, r in enumerate(requests) if not greedy[i] and r.sampling_params.sampling_seed is None
            ]
            noise = torch.ones_like(logp)
            seeded = [
                i
                for i, r in enumerate(requests)
                if not greedy[i] and r.sampling_params.sampling_seed is not None
            ]
            if seeded:
                keys = [
                    seed_for(int(requests[i].sampling_params.sampling_seed or 0), counts[i]) for i in seeded
                ]
                draws = hashed_exponential(to_device(keys, logp.device), vocab)
                if len(seeded) == bsz:
                    noise = draws
                else:
                    noise[to_device(seeded, logp.device)] = draws
            if unseeded:
                draw = torch.empty((len(unseeded), vocab), dtype=logp.dtype, device=logp.device)
                _exponential_(draw, self.generator)
                if len(unseeded) == bsz:
                    noise = draw
                else:
                    noise[to_device(unseeded, logp.device)] = draw
            scores = logp.exp() / noise
            if any(greedy):
                mask = to_device(greedy, logp.device, torch.bool)[:, None]
                scores = torch.where(mask, logp, scores)
        tokens = scores.argmax(dim=-1)
        columns = [tokens[:, None].double(), logp.gather(1, tokens[:, None]).double()]
        nums = list(top_logprobs_nums) if top_logprobs_nums is not None else [0] * bsz
        k = min(max(nums or [0]), vocab)
        if k > 0:
            vals, ids = torch.topk(logp, k, dim=-1)
            columns += [vals.double(), ids.double()]
        return PendingSample(tokens, HostCopy(torch.cat(columns, dim=1)), nums, k)

    @staticmethod
    def batchable(req: Request, num_output: int) -> bool:
        """Whether ``req``'s next token (its ``num_output``-th) samples in the whole-batch path: no
        penalty, no EOS ban (``min_new_tokens`` reached), no top-k/top-p/min-p cut."""
        p = req.sampling_params
        return not (
            p.repetition_penalty != 1.0
            or ((p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and num_output > 0)
            or num_output < p.min_new_tokens
            or (not p.greedy and (p.top_k != -1 or p.top_p < 1.0 or p.min_p > 0.0))
        )

    def _plain_logprobs(
        self, logits: torch.Tensor, requests: Sequence[Request], counts: Sequence[int]
    ) -> torch.Tensor | None:
        """``[B, V]`` log-probs in one batched op when no row needs penalties, an EOS ban or a
        top-k/top-p/min-p cut (the usual RL rollout), else ``None`` (rows go through
        :meth:`process`). Row for row the same ops as :meth:`process`: fp32, divide by the row's
        temperature (greedy rows: no division), ``log_softmax`` over the row; on a CPU the
        per-row path's sort of a vocabulary-wide row cost about as much as a decode step's
        attention (docs/performance.md)."""
        temps = []
        for req, count in zip(requests, counts):
            if not self.batchable(req, count):
                return None
            p = req.sampling_params
            temps.append(1.0 if p.greedy else p.temperature)
        x = logits.float()
        # Division by a Python scalar, as in process() and the trainer: CUDA turns a scalar
        # divisor into a multiply by its reciprocal, a tensor divisor into a true division.
        if len(set(temps)) == 1:
            x = x / temps[0] if temps[0] != 1.0 else x
        else:
            x = torch.stack([row / t for row, t in zip(x, temps)])
        if batch_invariant.enabled():
            return batch_invariant.log_softmax(x)
        return torch.log_softmax(x, dim=-1)

    def _exponential(self, like: torch.Tensor, req: Request, index: int | None = None) -> torch.Tensor:
        """Exp(1) noise for ``req``'s token number ``index`` (default: its next one)."""
        seed = req.sampling_params.sampling_seed
        if seed is not None:
            index = len(req.output_ids) if index is None else index
            key = torch.tensor([seed_for(seed, index)], device=like.device)
            return hashed_exponential(key, like.shape[-1])[0].to(like.dtype)
        return _exponential_(torch.empty_like(like), self.generator)
