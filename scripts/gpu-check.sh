#!/usr/bin/env bash
# Check and time fastforeach's CUDA paths on a machine with an NVIDIA GPU, in one command (under 8 minutes).
#
#   pip install -e ".[test]"                 # once, as for the tests
#   bash scripts/gpu-check.sh [PREFIX]        # PREFIX defaults to bench-results/cuda
#
# 1. Prints the GPU, driver, CUDA, torch, Triton and fastai versions; fails at once, checking nothing, where
#    torch sees no CUDA device.
# 2. Runs every test marked `cuda` (oracle against fastai on CUDA with both pack thresholds, steps that never
#    wait for the GPU in sync-debug 'error' mode, bf16 with Kahan summation and stochastic rounding, gradient
#    release, fastai's to_fp16 / to_bf16 / to_pure_bf16 Learners, mixed devices) with
#    FASTFOREACH_REQUIRE_CUDA=1: a skip is a failure, and so is a fused step falling back to foreach.
#    Log: PREFIX-tests.txt.
# 3. Runs the benchmark on CUDA (fastai native, foreach, fused, torch's foreach and fused, the references;
#    step time, host time, kernels per step, peak memory): xresnet50 and the MLP in PREFIX.{json,txt,png,md},
#    the transformer in PREFIX-transformer.*, LAMB's first fused step, cold and warm, in PREFIX-compile.*.
# Exits non-zero if any part failed; every part runs even so.
#
# Environment: WHEELS=DIR installs the wheels in DIR first, without an index (a machine with no network);
# WORKERS (default 12) test processes; TEST_TIMEOUT and BENCH_TIMEOUT (seconds, default 150 and 200).
set -uo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-bench-results/cuda}
mkdir -p "$(dirname "$prefix")"
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastforeach-wheels \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/fastforeach-wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout, installed or not

echo "== versions"
python3 - <<'EOF' || exit 1
import platform, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu-check: torch sees no CUDA device (torch.cuda.is_available() is False): nothing was checked")
import fastai
try: import triton; triton_version = triton.__version__
except ImportError: triton_version = 'not installed'
free, total = torch.cuda.mem_get_info()
print(f"GPU {torch.cuda.get_device_name()} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}, "
      f"{total / 2**30:.0f} GiB), CUDA {torch.version.cuda}, torch {torch.__version__}, Triton {triton_version}, "
      f"fastai {fastai.__version__}, Python {platform.python_version()}")
EOF
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv || true

failed=0
echo "== CUDA tests"
FASTFOREACH_REQUIRE_CUDA=1 timeout "${TEST_TIMEOUT:-150}" python3 -m pytest tests -m cuda -n "${WORKERS:-12}" -q \
    -p no:cacheprovider -rfE 2>&1 | tee "$prefix-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { failed=1; echo "gpu-check: CUDA tests FAILED (or timed out)"; }

echo "== benchmark"
bench() {  # bench SECONDS ARGS...: one run of the benchmark on CUDA, stopped after SECONDS
    timeout "$1" python3 -m fastforeach.bench --device cuda "${@:2}" || \
        { failed=1; echo "gpu-check: fastforeach-bench ${*:2} FAILED (or timed out)"; }
}
bench "${BENCH_TIMEOUT:-200}" --models xresnet50 mlp --steps 20 --warmup 5 --check-steps 3 --out "$prefix"
bench 80 --models transformer --steps 20 --warmup 5 --check-steps 3 --out "$prefix-transformer"
# The first fused step in fresh processes, cold and warm compile cache (LAMB: two graphs and the pack's norms).
bench 150 --models mlp --optimizers Lamb --steps 2 --warmup 1 --check-steps 1 --compile-times --out "$prefix-compile"

[ "$failed" -eq 0 ] && echo "gpu-check: all passed" || echo "gpu-check: FAILED"
exit "$failed"
