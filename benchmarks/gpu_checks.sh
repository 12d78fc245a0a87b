#!/usr/bin/env bash
# The GPU checks that a session's device call owes (issue 5's memory and host-time rows, and the CuPy twins of code
# that CI runs on NumPy only), in one call of ~8 minutes that keeps what finished in $OUT:
#
#   device call, carry [".whl"]: bash benchmarks/gpu_checks.sh
#
# 1. the GPU tests of the latest additions (-k below; edit it to the session's), 2. local-search priors on the GPU
# against NumPy (benchmarks/priors.py --gpu), 3. live GPU memory of a local-search auto-refine at box 256 against
# the plan (memory_check.py; JSON and table in $OUT), 4. host and wall time of a local order-5 pool's passes
# (line_profile.py L5).  Each step gets what is left of the call's BUDGET_S (560) s; MEM_N (3000) particles in 3.
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( ${BUDGET_S:-560} - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py tests/test_sampling.py tests/test_plan.py \
    tests/test_ops.py -k "${GPU_TESTS:-resampling or coarser_optics or strict_lowres or solvent or fixed_pose or non_finite or dense_local or plan}" \
    2>&1 | tail -8
echo "tests done at $(( $(date +%s) - T0 )) s"
timeout 60 python3 benchmarks/priors.py --gpu --orders 4 5 6 2>&1 | tail -5
echo "priors done at $(( $(date +%s) - T0 )) s"
timeout $(( $(left) - 70 )) python3 benchmarks/memory_check.py --n ${MEM_N:-3000} --box 256 --apix 1 --pool 1000 --iters 2 \
    --healpix-order 4 --maxsig -1 --lines ${LINES:-20} --json "$OUT/mem256_o4.json" > "$OUT/mem256_o4.txt" 2>&1
echo "memory_check rc $?"
grep -v INFO "$OUT/mem256_o4.txt" | tail -n 72
echo "memory_check done at $(( $(date +%s) - T0 )) s"
timeout $(left) python3 benchmarks/line_profile.py --box 128 --apix 2 --n 1000 --order 5 --coarse 64 --current 96 \
    --local-sigma 1.25 --no-trace --repeat 3 --host-time 2>&1 | grep -v INFO | tail -25
echo "all done at $(( $(date +%s) - T0 )) s"
