#!/usr/bin/env bash
# dev_refine and dev_class end to end on the lent GPU in one device call (issues 3 and 5), outputs packed for
# benchmarks/compare_relion.py and benchmarks/class_trajectory.py on this machine.
#
#   bash benchmarks/dev_sets_gpu.sh --prepare        # here: copies the two sets into .devdata_sets/ (ignored, 44 MB)
#   device call, carry [".whl", ".devdata_sets"]:
#     <wheel prefix of ../shared/device/README.md> bash benchmarks/dev_sets_gpu.sh [refine|class|both] [extra flags]
#
# Each run's log, STAR files and final maps come back in $OUT/<set>$RUN_TAG.tgz; extra flags (e.g. --coarse_precision
# float64, --random_seed 2) go to both runs. RUN_TAG=_s2 names a second run of a set (several may run at once on one
# GPU: the sets are small); SKIP_TESTS=1 leaves out the GPU tests. The flags are compare_relion.py's REFINE_FLAGS / CLASS_FLAGS (the seed paper's).
# Times (H100, a795b80's tree): dev_refine 139 s, dev_class 25 iterations 143 s; the GPU tests ~40 s.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.devdata_sets
if [ "${1:-}" = "--prepare" ]; then
    for s in dev_refine dev_class; do
        mkdir -p "$D/$s"
        cp ../shared/data/$s/{particles.star,particles.mrcs,ini_lp60.mrc} "$D/$s/"
    done
    du -sh "$D"
    exit 0
fi
what=${1:-both}
shift || true
OUT=${OUT:-/tmp/dev_sets_out}
W=/tmp/dev_sets; mkdir -p "$W" "$OUT"
flags() { python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import compare_relion as c; print(c.$1)"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# a fresh machine's first matplotlib import scans its fonts (~30 s, once per machine): not part of a run's time
python3 -c "import matplotlib.font_manager" 2>/dev/null || true
git log --oneline -1 2>/dev/null || true
run() {  # run <set> <command> <FLAGS name>
    local set=$1 cmd=$2 fl s; fl=$(flags "$3"); s=$1${RUN_TAG:-}
    mkdir -p "$W/$s"
    local t0=$SECONDS
    # shellcheck disable=SC2086
    python3 -m gerelion_dask.cli "$cmd" --i "$D/$set/particles.star" --o "$W/$s/run" --ref "$D/$set/ini_lp60.mrc" \
        $fl --device gpu --in-process --pool 250 --overwrite "${@:4}" > "$W/$s/log" 2>&1 || echo "$s: rc=$?"
    echo "$s: $((SECONDS - t0)) s" | tee -a "$W/$s/log"
    grep -E "iteration|done" "$W/$s/log" | tail -3
    # STAR files of every iteration; maps of the last iteration and the final ones only
    (cd "$W/$s" && last=$(ls run_it*_class001.mrc 2>/dev/null | sort | tail -1) &&
        tar czf "$OUT/$s.tgz" log run_*.star run_progress.jsonl ${last%_class001.mrc}_class*.mrc \
            $(ls run_class*.mrc run_half*_unfil.mrc 2>/dev/null) || echo "$s: nothing to pack")
}
[ -n "${SKIP_TESTS:-}" ] ||
    python3 -m pytest -q -m gpu tests/test_engine.py tests/test_ops.py tests/test_plan.py tests/test_accuracy.py -p no:cacheprovider 2>&1 | tail -1
if [ "$what" = refine ] || [ "$what" = both ]; then run dev_refine refine REFINE_FLAGS "$@"; fi
if [ "$what" = class ] || [ "$what" = both ]; then run dev_class classify CLASS_FLAGS "$@"; fi
ls -la "$OUT"
