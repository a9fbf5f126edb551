#!/usr/bin/env bash
# The test command: the tests and the linter, then the Avalanche extra's tests in a second
# environment. Run from anywhere: `bash scripts/test.sh`. CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. The main environment: torch's CPU build named first (so pip does not resolve a CUDA build),
#    then the package with its test extra and the optional extras CI tests: quantization
#    (bitsandbytes runs on the CPU too) and serving.
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e ".[test,quant,serve]"

# 2. The test suite; the variables make the quantization and serving tests fail, not skip,
#    without their extras.
CONTINUAL_PEFT_REQUIRE_QUANT=1 CONTINUAL_PEFT_REQUIRE_SERVE=1 .venv/bin/python -m pytest

# 3. The linter and the formatter's check.
.venv/bin/ruff check .
.venv/bin/ruff format --check .

# 4. A second environment for the Avalanche extra (torch 2.14.1 + avalanche-lib, about 6 GB),
#    kept apart because avalanche-lib pins another torch.
python3 -m venv .venv-avalanche
.venv-avalanche/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv-avalanche/bin/pip install -q -e ".[test,avalanche]"

# 5. The Avalanche extra's tests; the variable makes them fail, not skip, without Avalanche.
CONTINUAL_PEFT_REQUIRE_AVALANCHE=1 .venv-avalanche/bin/python -m pytest tests/with_avalanche
