#!/usr/bin/env bash
# Every shipped strategy on the long-sequence CL_Benchmark (streams/cl_long.toml) at the spec's
# CPU budget (32 training and 20 test examples per task, 2 epochs, batches of 4, inputs cut to
# 64 tokens), with the bundled all-MiniLM-L6-v2: the README's results table.
#
#   bash benchmarks/cl_long.sh [DATA_ROOT] [OUT] [ORDERS] [STRATEGIES]
#
# DATA_ROOT: the CL_Benchmark folder (default ../shared/data/CL_Benchmark, which lacks yahoo, so
# yahoo is excluded; with the full folder drop --exclude). OUT: where the comparisons go (default
# runs/cl_long), one folder per order. ORDERS: default "order4 order5 order6", one comparison
# each, so that every finished order is complete for every strategy. STRATEGIES: default all
# seven. Every strategy that takes a router routes with the Mahalanobis router (task-agnostic
# inference); olora sums every slot, as in its paper, so it takes none and runs in a second
# comparison with the same stream, budget, order and seed.
set -euo pipefail
root=${1:-../shared/data/CL_Benchmark}
out=${2:-runs/cl_long}
orders=${3:-order4 order5 order6}
strategies=${4:-per_task,seq,replay,ewc,joint,l2p,olora}
routed=$(echo "$strategies" | tr ',' '\n' | grep -v '^olora$' | paste -sd, -)
for order in $orders; do
    common=(streams/cl_long.toml --data-root "$root" --exclude yahoo --budget cpu
            --max-length 64 --batch-size 4 --order "$order")
    if [ -n "$routed" ]; then
        continual-peft compare "${common[@]}" --strategies "$routed" --router mahalanobis \
            --out "$out/$order/routed"
    fi
    if echo "$strategies" | tr ',' '\n' | grep -qx olora; then
        continual-peft compare "${common[@]}" --strategies olora --out "$out/$order/olora"
    fi
done
