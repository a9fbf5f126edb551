#!/bin/bash
# The device and precision checks for a session that is lent a GPU, as ONE prepared call.
#
# On the CPU machine, from the project's root, with the project's venv built:
#   bash ../shared/tools/gpu/prepare.sh            # .gpu-tools/ with the harness and MiniLM
#   bash benchmarks/gpu_device_steps.sh --prepare  # + the CL benchmark data, + these steps
# then one `run` call: command `bash .gpu-tools/device.sh`, carry [".gpu-tools"], timeout ~540 s.
# Write what it printed into benchmarks/RESULTS.md with the date and the GPU.
set -euo pipefail
if [ "${1:-}" = "--prepare" ]; then
    rm -rf .gpu-tools/cl_benchmark && mkdir -p .gpu-tools/cl_benchmark
    for task in agnews amazon dbpedia yelp; do  # the test splits and labels, and 2,000 train rows
        mkdir -p ".gpu-tools/cl_benchmark/$task"
        cp "../shared/data/cl_benchmark/$task/labels.json" ../shared/data/cl_benchmark/$task/test.jsonl \
            ".gpu-tools/cl_benchmark/$task/"
        head -n 2000 "../shared/data/cl_benchmark/$task/train.jsonl" > ".gpu-tools/cl_benchmark/$task/train.jsonl"
    done
    # device.sh's STEPS become the three checks below
    python3 - <<'PY'
from pathlib import Path

path = Path(".gpu-tools/device.sh")
text = path.read_text()
head = text.split("# ---- STEPS ----")[0]
path.write_text(head + "# ---- STEPS ----\nbash benchmarks/gpu_device_steps.sh\n")
PY
    du -sh .gpu-tools
    exit 0
fi
# ---- on the GPU machine (called by .gpu-tools/device.sh, which sets $D, $OUT and PATH) ----
set +e
echo "== benchmarks/gpu.py (routed forward, training vs peft, end-to-end run)"
timeout 300 python3 benchmarks/gpu.py --run-demo streams/cl_benchmark.toml \
    --data-root .gpu-tools/cl_benchmark --demo-out "$D/cl" \
    --demo-args --max-train 500 --max-test 500 --router mahalanobis 2>&1 \
    | grep -v Warning | tee "$OUT/gpu.jsonl"
echo "== the suite on CUDA"
CONTINUAL_PEFT_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -x -n 6 -p no:cacheprovider \
    --ignore tests/with_avalanche 2>&1 | tail -40 | tee "$OUT/tests.txt"
echo "== the demo on CUDA"
( time timeout 60 continual-peft run --out "$D/demo" ) 2>&1 | tail -30 | tee "$OUT/demo.txt"
