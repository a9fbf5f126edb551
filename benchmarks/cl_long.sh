#!/usr/bin/env bash
# Every shipped strategy on the long-sequence CL_Benchmark (streams/cl_long.toml), orders 4-6,
# at the spec's CPU budget, with the bundled all-MiniLM-L6-v2: the README's results table.
#
#   bash benchmarks/cl_long.sh [DATA_ROOT] [OUT]
#
# DATA_ROOT: the CL_Benchmark folder (default: ../shared/data/CL_Benchmark, which lacks yahoo,
# so yahoo is excluded; with the full folder drop --exclude). OUT: where the two comparisons go
# (default runs/cl_long). Every strategy that takes a router routes with the Mahalanobis router
# (task-agnostic inference); olora sums every slot, as in its paper, so it takes none and runs
# in a second comparison with the same stream, budget, orders and seed.
set -euo pipefail
root=${1:-../shared/data/CL_Benchmark}
out=${2:-runs/cl_long}
common=(streams/cl_long.toml --data-root "$root" --exclude yahoo --budget cpu --max-length 64
        --order order4,order5,order6)
continual-peft compare "${common[@]}" --strategies per_task,seq,replay,ewc,joint,l2p \
    --router mahalanobis --out "$out/routed"
continual-peft compare "${common[@]}" --strategies olora --out "$out/olora"
