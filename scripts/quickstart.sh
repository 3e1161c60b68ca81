#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: the RL quick start.
#
#   1. examples/arith/prepare.py builds a character tokenizer, a tiny random Qwen3-MoE (~1.8M
#      parameters) and a synthetic arithmetic task with verifiable answers (runs/arith/);
#   2. a short SFT warm-up (recipes/arith_sft.yaml);
#   3. GRPO with an exact-match reward (recipes/arith_grpo.yaml).
# It prints held-out accuracy before, after SFT and after GRPO. About 5 minutes on 2 CPU cores.
# It deletes runs/arith first: `miles train` refuses a --run-dir that already holds a run.
# At the end it says how to put `miles` on your shell's PATH (source .venv/bin/activate).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
rm -rf runs/arith
python examples/arith/prepare.py --out runs/arith --max-operand 9
miles train --config recipes/arith_sft.yaml
miles train --config recipes/arith_grpo.yaml
python - <<'PY'
from miles.utils.metrics import read_metrics

sft, grpo = read_metrics("runs/arith/sft"), read_metrics("runs/arith/grpo")
acc = lambda rows: [r["eval/arith"] for r in rows if "eval/arith" in r]
rewards = [r["rollout/raw_reward"] for r in grpo if "rollout/raw_reward" in r]
print(f"held-out accuracy: random init {acc(sft)[0]:.3f} -> after SFT {acc(sft)[-1]:.3f} -> after GRPO {acc(grpo)[-1]:.3f}")
print(f"GRPO train reward: first step {rewards[0]:.3f} -> last step {rewards[-1]:.3f}")
print("metrics: runs/arith/sft/metrics.jsonl, runs/arith/grpo/metrics.jsonl")
PY
miles_activate_hint
