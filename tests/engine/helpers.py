"""Shared helpers of the engine tests."""

from __future__ import annotations

import torch


class CharTokenizer:
    """Token ``i`` decodes to one printable character (enough for stop strings)."""

    eos_token_id = None

    def decode(self, ids):
        return "".join(chr(33 + i % 90) for i in ids)


def random_prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    """Seeded random token ids (below 128, the tiny models' vocabulary), one prompt per length."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]
