"""``miles serve`` under a flood of requests: does ``/health`` still answer at once?

A real server process (a tiny random Llama with the SmolLM2 tokenizer; CPU is fine) gets
``--queued`` requests at once (default 1,000 then 5,000) while generation is paused, so all of
them end up in the engine's queue; a separate process polls ``/health`` every 50 ms while they
arrive (filling), while they all wait (held) and while the queue drains after
``/continue_generation`` (draining). Reported: ``/health`` latency p50/p99/max in each phase, and
the ``/generate`` latency p50/p99 of the flood from the resume to each answer. The baseline,
measured in the same run on the same server, is ``/health`` at idle; ``ratio`` = idle p99 / held
p99 with the largest queue (1 = no slower).

    python benchmarks/server_load.py                       # 1,000 and 5,000 queued, CPU
    python benchmarks/server_load.py --queued 200 --hold-s 1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_string, print_table, write_results


def _tiny_model(path: Path) -> None:
    """A 2-layer random Llama with SmolLM2's tokenizer (the HTTP tests' model)."""
    import torch
    import transformers

    from miles.models.loading import SMOLLM2_ALIAS, load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _poll(url: str, interval_s: float, stop: Any, out: Any) -> None:
    """Child process: GET /health every ``interval_s`` until ``stop``; send back latencies (s)."""
    import httpx

    latencies = []
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            t = time.perf_counter()
            client.get(f"{url}/health").raise_for_status()
            latencies.append(time.perf_counter() - t)
            time.sleep(interval_s)
    out.send(latencies)
    out.close()


class HealthPoller:
    """``/health`` polled from another process (this one's event loop is busy with the flood)."""

    def __init__(self, url: str, interval_s: float = 0.05) -> None:
        ctx = mp.get_context("spawn")
        self.recv, send = ctx.Pipe(duplex=False)
        self.stop_event = ctx.Event()
        self.proc = ctx.Process(target=_poll, args=(url, interval_s, self.stop_event, send))

    def start(self) -> HealthPoller:
        self.proc.start()
        return self

    def stop(self) -> list[float]:
        self.stop_event.set()
        values: list[float] = self.recv.recv()
        self.proc.join()
        return values


def _stats(prefix: str, values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        f"{prefix}_p50_ms": statistics.median(ms),
        f"{prefix}_p99_ms": _percentile(ms, 99),
        f"{prefix}_max_ms": max(ms),
        f"{prefix}_samples": float(len(ms)),
    }


async def _flood(url: str, n: int, hold_s: float, max_new_tokens: int) -> dict[str, float]:
    """``n`` requests sent at once to the paused server: ``/health`` while they arrive
    (filling), while they all wait (held) and once generation resumes (draining); ``/generate``
    latency from the resume to each answer."""
    import httpx

    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        (await client.post("/pause_generation", json={"mode": "in_place"})).raise_for_status()

        async def one(i: int) -> float:
            body = {"input_ids": [1 + i % 97, 2 + i % 89, 3, 4, 5, 6, 7, 8],
                    "sampling_params": {"max_new_tokens": max_new_tokens, "ignore_eos": True}}  # fmt: skip
            r = await client.post("/generate", json=body)
            r.raise_for_status()
            return time.perf_counter()

        filling = HealthPoller(url).start()
        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # until every request sits in the engine
            text = (await client.get("/metrics")).text
            queued = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith(("sglang:num_queue_reqs", "sglang:num_running_reqs")))  # fmt: skip
            if queued >= n:
                break
            await asyncio.sleep(0.2)
        else:
            raise TimeoutError(f"{n} requests not queued after 600 s")
        filling_latencies = await asyncio.to_thread(filling.stop)
        held = HealthPoller(url).start()
        await asyncio.sleep(hold_s)
        held_latencies = await asyncio.to_thread(held.stop)
        draining = HealthPoller(url).start()
        released = time.perf_counter()
        (await client.post("/continue_generation", json={})).raise_for_status()
        answered = await asyncio.gather(*tasks)
        draining_latencies = await asyncio.to_thread(draining.stop)
    return {
        "queued": float(n),
        **_stats("health_filling", filling_latencies),
        **_stats("health_held", held_latencies),
        **_stats("health_draining", draining_latencies),
        **_stats("generate", [t - released for t in answered]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queued", type=int, nargs="+", default=[1000, 5000], help="flood sizes")
    parser.add_argument(
        "--hold-s", type=float, default=5.0, help="seconds /health is polled with the queue held"
    )
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one socket per queued request, both sides
    need = 2 * max(args.queued) + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        _tiny_model(model)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        queue_room = max(args.queued)
        tokens = (8 + args.max_new_tokens + 8) * queue_room
        cmd = [sys.executable, "-m", "miles", "serve", "--hf-checkpoint", str(model), "--port", str(port),
               "--sglang-max-total-tokens", str(tokens), "--sglang-page-size", "8",
               "--sglang-max-running-requests", "256", "--sglang-max-queued-requests", str(queue_room),
               "--log-level", "warning"]  # fmt: skip
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            import httpx

            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((Path(tmp) / "server.log").read_text()[-3000:])
                time.sleep(0.2)
            poller = HealthPoller(url).start()
            time.sleep(args.hold_s)
            idle = poller.stop()
            rows, results = [], {}
            for n in args.queued:
                result = asyncio.run(_flood(url, n, args.hold_s, args.max_new_tokens))
                results[str(n)] = result
                rows.append([n, result["health_filling_p99_ms"], result["health_filling_max_ms"],
                             result["health_held_p50_ms"], result["health_held_p99_ms"], result["health_held_max_ms"],
                             result["health_draining_p99_ms"], result["health_draining_max_ms"],
                             result["generate_p50_ms"], result["generate_p99_ms"]])  # fmt: skip
        finally:
            server.terminate()
            server.wait(30)
            log.close()
    idle_stats = _stats("health_idle", idle)
    rows.insert(0, ["idle", "-", "-", idle_stats["health_idle_p50_ms"], idle_stats["health_idle_p99_ms"],
                    idle_stats["health_idle_max_ms"], "-", "-", "-", "-"])  # fmt: skip
    print("/health latency (ms) while the flood arrives (filling), waits (held) and is served (draining);")
    print("/generate latency (ms) from the resume of generation to each answer")
    print_table(["queued", "filling p99", "filling max", "held p50", "held p99", "held max", "draining p99",
                 "draining max", "generate p50", "generate p99"], rows)  # fmt: skip
    largest = results[str(max(args.queued))]
    miles = {"health_p99_hz": 1000 / largest["health_held_p99_ms"], "per_queue": results}
    baseline = {"health_p99_hz": 1000 / idle_stats["health_idle_p99_ms"], **idle_stats}
    if not args.no_write:
        path = write_results(
            "server_load",
            device_string("cpu"),
            {
                "queued": args.queued,
                "hold_s": args.hold_s,
                "max_new_tokens": args.max_new_tokens,
                "model": "tiny random Llama (2 layers, hidden 64), SmolLM2 tokenizer",
                "poll_interval_s": 0.05,
            },
            miles,
            baseline,
            "health_p99_hz",
            packages=("fastapi", "uvicorn", "httpx"),
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
