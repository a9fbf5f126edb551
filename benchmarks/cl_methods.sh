#!/usr/bin/env bash
# The field's methods side by side (InfLoRA, SD-LoRA, merging, route-or-merge) with every other
# shipped strategy, on the four CL tasks and on the long-sequence CL_Benchmark, with the bundled
# all-MiniLM-L6-v2: the README's "which method when" table.
#
#   bash benchmarks/cl_methods.sh [OUT] [CL_DATA] [LONG_DATA] [ORDERS]
#
# Two comparisons per stream and order, on the same stream, budget, order and seed: the routed
# group (per_task, seq, replay, ewc, joint, l2p, route_or_merge) with the Mahalanobis router;
# the summed or merged group (olora, inflora, sdlora, merge), which answer from all slots or one
# merged slot and take no router. route_or_merge keeps its spec's reject_rate (0.02): the rows
# the router turns away are answered through the merged slot.
set -euo pipefail
out=${1:-runs/cl_methods}
cl=${2:-../shared/data/cl_benchmark}
long=${3:-../shared/data/CL_Benchmark}
orders=${4:-order4}
routed=per_task,seq,replay,ewc,joint,l2p,strategies/route_or_merge_lora.toml
summed=olora,inflora,sdlora,merge
four=(streams/cl_benchmark.toml --data-root "$cl" --budget cpu --batch-size 16 --max-length 64)
continual-peft compare "${four[@]}" --strategies "$routed" --router mahalanobis \
    --out "$out/four/routed"
continual-peft compare "${four[@]}" --strategies "$summed" --out "$out/four/summed"
for order in $orders; do
    common=(streams/cl_long.toml --data-root "$long" --exclude yahoo --budget cpu
            --max-length 64 --batch-size 4 --order "$order")
    continual-peft compare "${common[@]}" --strategies "$routed" --router mahalanobis \
        --out "$out/long/$order/routed"
    continual-peft compare "${common[@]}" --strategies "$summed" --out "$out/long/$order/summed"
done
