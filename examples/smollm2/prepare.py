"""Data for the SmolLM2-135M-Instruct GRPO recipe (recipes/smollm2_grpo.yaml): addition word
problems with a verifiable integer answer.

SmolLM2-135M-Instruct answers some of these right from the start (reward above zero), so GRPO has a
signal from step one; the ``math`` reward accepts a bare final number or a ``\\boxed{}`` answer.

    python examples/smollm2/prepare.py --out runs/smollm2 --max-operand 20
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEMPLATES = (
    "What is {a} + {b}? Answer with just the number.",
    "Compute {a} plus {b}. Reply with only the result.",
    "Tom has {a} apples and gets {b} more. How many apples does he have? Answer with a number.",
)


def make_problems(n: int, max_operand: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        template = rng.choice(TEMPLATES)
        rows.append({"prompt": template.format(a=a, b=b), "label": str(a + b)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/smollm2")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-eval", type=int, default=100)
    p.add_argument("--max-operand", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for name, n in (("train", args.num_train), ("eval", args.num_eval)):
        rows = make_problems(n, args.max_operand, rng)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {out}/train.jsonl ({args.num_train}) and {out}/eval.jsonl ({args.num_eval})")


if __name__ == "__main__":
    main()
