#!/usr/bin/env bash
# The seed survey's first experiments (arXiv 2501.13787), answered on the four shared CL tasks with
# the bundled all-MiniLM-L6-v2:
#   1. every module kind (and a hybrid slot) against a linear probe: accuracy, trainable
#      parameters, training cost and time (benchmarks/module_kinds.py);
#   2. inference latency of frozen vs merged LoRA vs routed LoRA vs adapters vs prompts
#      (benchmarks/inference_latency.py);
#   3. LoRA on the query projections only vs the values only vs both vs every linear layer,
#      chosen on a dev split (compare --sweep lora.targets).
#
#   bash benchmarks/survey.sh [OUT] [CL_DATA]
set -euo pipefail
out=${1:-runs/survey}
cl=${2:-../shared/data/cl_benchmark}
mkdir -p "$out"
python benchmarks/module_kinds.py --data-root "$cl" --max-length 64 | tee "$out/module_kinds.md"
python benchmarks/inference_latency.py | tee "$out/inference_latency.md"
continual-peft compare --stream streams/cl_benchmark.toml --data-root "$cl" \
    --strategies strategies/per_task_lora.toml \
    --sweep lora.targets=query,value,query+value,all-linear \
    --max-train 200 --max-test 200 --epochs 2 --max-length 64 --out "$out/lora_targets"
