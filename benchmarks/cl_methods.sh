#!/usr/bin/env bash
# The field's methods side by side (InfLoRA, SD-LoRA, merging, route-or-merge) with every other
# shipped strategy, on the four CL tasks and on the long-sequence CL_Benchmark, with the bundled
# all-MiniLM-L6-v2, at budgets a 2-core CPU runs: the README's "which method when" table.
#
#   bash benchmarks/cl_methods.sh [OUT] [CL_DATA] [LONG_DATA] [ORDERS]
#
# Two comparisons per stream and order, on the same stream, budget, order, seed and learning rate
# (1e-2 for every entry: few steps per task): the summed or merged group (olora, inflora, sdlora,
# merge), which answer from all slots or one merged slot and take no router; the routed group
# (per_task, joint, route_or_merge, seq, replay, ewc, l2p) with the Mahalanobis router.
# route_or_merge keeps its spec's reject_rate (0.02): the rows the router turns away are
# answered through the merged slot. Then the leave-one-task-out check of route_or_merge.
set -euo pipefail
out=${1:-runs/cl_methods}
cl=${2:-../shared/data/cl_benchmark}
long=${3:-../shared/data/CL_Benchmark}
orders=${4:-order4}
summed=olora,inflora,sdlora,merge
routed=per_task,joint,strategies/route_or_merge_lora.toml,seq,replay,ewc,l2p
four=(streams/cl_benchmark.toml --data-root "$cl" --budget cpu --batch-size 16 --max-length 48
      --lr 1e-2)
continual-peft compare "${four[@]}" --strategies "$summed" --out "$out/four/summed"
continual-peft compare "${four[@]}" --strategies "$routed" --router mahalanobis \
    --out "$out/four/routed"
python benchmarks/route_or_merge.py --data-root "$cl" --max-train 64 --max-test 64 --epochs 2 \
    --max-length 48 --lr 1e-2 | tee "$out/four/leave_one_out.md"
for order in $orders; do
    common=(streams/cl_long.toml --data-root "$long" --exclude yahoo --budget cpu
            --max-length 48 --batch-size 4 --lr 1e-2 --order "$order")
    continual-peft compare "${common[@]}" --strategies "$summed" --out "$out/long/$order/summed"
    continual-peft compare "${common[@]}" --strategies "$routed" --router mahalanobis \
        --out "$out/long/$order/routed"
done
