"""Host time of one engine decode step: what the CPU spends per step while the GPU would run.

On a GPU the engine's decode step is one CUDA-graph replay plus the host's work around it
(scheduling, building the graph's inputs, sampling bookkeeping, outputs, detokenization). With
the overlapped schedule (on by default on CUDA) it runs while the GPU computes, so it shows
only where it exceeds the GPU's part; with the serial schedule it adds to every step. This measures that host part
alone, on any machine: a tiny model whose forward is never run (the decode graph's replay is
replaced by a no-op, so the logits are whatever the buffer holds), greedy sampling, the real
SmolLM2 tokenizer, ``--requests`` requests decoding together, timed after ``--warm-tokens``
tokens each.

Miles: requests added as the RL rollout adds them (``stream=False``: final output only, text
decoded at the end). Baseline, same run: streamed requests (a cumulative output and a full
detokenization per request per step, what every request cost before).

    python benchmarks/engine_host_overhead.py --requests 256 --warm-tokens 300
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_string, print_table, write_results

# The SmolLM2 tokenizer's ids below 512 are ordinary tokens; a 512-entry vocabulary keeps the
# (CPU) sampling ops negligible, so the figure is the host's Python work.
TINY: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True,
}  # fmt: skip


class _NoReplay:
    def replay(self) -> None:
        """The GPU's part of the step, left out: only the host's work is timed."""


def host_ms_per_step(args: argparse.Namespace, stream: bool) -> float:
    from miles.config import EngineConfig
    from miles.engine.cuda_graph import DecodeGraphs
    from miles.engine.engine import Engine
    from miles.models.loading import build_model, load_tokenizer
    from miles.models.spec import ModelSpec
    from miles.types import SamplingParams

    torch.manual_seed(0)
    model = build_model(ModelSpec.from_hf_config(TINY))
    blocks = args.requests * (args.max_prompt + args.warm_tokens + args.steps + 32) // 16
    engine = Engine(model, load_tokenizer("smollm2-135m-instruct"),
                    EngineConfig(page_size=16, max_running_requests=args.requests), num_blocks=blocks)  # fmt: skip
    graphs = DecodeGraphs(model, engine.kv_cache, args.requests, 4096 // 16, scratch_block=blocks - 1)
    graphs._capture = lambda bs: graphs._graphs.setdefault(bs, _NoReplay())  # type: ignore[method-assign,arg-type]
    engine.runner.graphs = graphs
    rng = random.Random(args.seed)
    # Greedy: the sampling noise over the vocabulary is device work on a GPU, and on this CPU its
    # draw would be a good part of the figure.
    params = SamplingParams(
        temperature=0.0, max_new_tokens=args.warm_tokens + args.steps + 8, ignore_eos=True
    )
    for _ in range(args.requests):
        prompt = [
            rng.randrange(TINY["vocab_size"])
            for _ in range(rng.randint(args.max_prompt // 3, args.max_prompt))
        ]
        engine.add_request(prompt, params, stream=stream)
    while any(r.num_computed_tokens < len(r.prompt_ids) for r in engine._requests.values()):
        engine.step()
    for _ in range(args.warm_tokens):
        engine.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    return (time.perf_counter() - start) / args.steps * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--warm-tokens", type=int, default=300, help="output tokens per request before timing")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-prompt", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if min(args.requests, args.warm_tokens, args.steps, args.max_prompt) < 1:
        p.error("--requests, --warm-tokens, --steps and --max-prompt must be >= 1")
    torch.set_num_threads(1)
    miles = {"host_ms_per_step": host_ms_per_step(args, stream=False)}
    base = {"name": "streamed requests (per-step outputs and detokenization)",
            "host_ms_per_step": host_ms_per_step(args, stream=True)}  # fmt: skip
    device = device_string("cpu")
    print(f"engine_host_overhead on {device}: {args.requests} requests at ~{args.warm_tokens} output tokens")
    print_table(["requests added as", "host ms / decode step"],
                [["final output only (the rollout)", miles["host_ms_per_step"]],
                 ["streamed", base["host_ms_per_step"]]])  # fmt: skip
    # Lower is better: the ratio compares steps per second.
    miles["steps_per_s"] = 1e3 / miles["host_ms_per_step"]
    base["steps_per_s"] = 1e3 / base["host_ms_per_step"]
    print(f"ratio: {miles['steps_per_s'] / base['steps_per_s']:.2f}x")
    if not args.no_write:
        config = {k: v for k, v in vars(args).items() if k != "no_write"}
        out = write_results("engine_host_overhead", device, config, miles, base, "steps_per_s",
                            packages=("transformers",))  # fmt: skip
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
