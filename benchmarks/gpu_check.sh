#!/usr/bin/env bash
# GPU check of hpseg in one run: machine, install, the test suite, then the check scripts
# (each documents itself): gpu_cli.py, gpu_golden.py, gpu_loss.py, gpu_step.py.
#
#   bash benchmarks/gpu_check.sh [SECTIONS]      # in the repository root; SECTIONS: comma-separated,
#                                                # of pytest,cli,golden,loss,step (default: all)
#
# Environment: OUT (output folder; a temporary one if unset), PYTHON (default python3),
# GPU_CHECK_ARGS (extra arguments for every check script, e.g. "--deadline 100"),
# LOSS_ARGS (extra arguments for gpu_loss.py, e.g. "--batches 16,32,64"),
# GPU_CHECK_TIMEOUT (hard stop of each script in seconds, default 240), PYTEST_TIMEOUT (default 150).
# Without CUDA the scripts run with tiny sizes (--smoke --device cpu) and pytest is skipped.
# Outputs in $OUT: gpu_log.txt (everything printed), pytest.txt, cli.txt, and one JSON per check.
set -u -o pipefail
cd "$(dirname "$0")/.."
SECTIONS=${1:-pytest,cli,golden,loss,step}
PY=${PYTHON:-python3}
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d /tmp/gpu_check_out.XXXXXX)
    echo "OUT is not set: writing to $OUT"
fi
mkdir -p "$OUT"
export OUT HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
START=$(date +%s)

main() {
    echo "== gpu_check.sh $(date '+%Y-%m-%d %H:%M:%S'), sections $SECTIONS, in $PWD"
    echo "== git: $(git log -1 --format='%h %s' 2>/dev/null || echo 'no git'); changed: $(git status --porcelain 2>/dev/null | wc -l) files"
    echo "== nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    echo "== CPUs: $(nproc), memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}'), /dev/shm: $(df -h /dev/shm 2>/dev/null | awk 'NR==2 {print $2 " (" $4 " free)"}')"
    echo "== python: $(command -v "$PY")"
    if ! "$PY" -c 'import sys, torch, timm; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "available", torch.cuda.is_available(), "| timm", timm.__version__); import importlib.util as u; t = u.find_spec("triton"); print("triton", __import__("triton").__version__ if t else "not installed")'; then
        echo "FATAL: $PY cannot import torch and timm (set PYTHON=...)"
        return 2
    fi

    # The package: already importable from this checkout, else an offline editable install, else src/ on PYTHONPATH.
    local from_here='import hpseg, pathlib, sys; sys.exit(0 if pathlib.Path(hpseg.__file__).resolve().parent == pathlib.Path("src/hpseg").resolve() else 1)'
    if "$PY" -c "$from_here" 2>/dev/null; then
        echo "== hpseg: already importable from this checkout"
    elif "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -5 && "$PY" -c "$from_here" 2>/dev/null; then
        echo "== hpseg: installed (pip install --no-deps --no-build-isolation --no-index -e .)"
    else
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
        echo "== hpseg: pip install failed; using PYTHONPATH=$PYTHONPATH"
    fi
    "$PY" -m hpseg --version || echo "WARNING: python -m hpseg --version failed"
    if command -v hpseg >/dev/null; then echo "== console script: $(command -v hpseg) -> $(hpseg --version 2>&1)"; fi

    local mode="--device cuda" cuda=1
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        mode="--smoke --device cpu" cuda=0
        echo "== no CUDA: tiny sizes ($mode), no pytest"
    fi
    echo "== setup took $(( $(date +%s) - START )) s"
    local guard="" failed=""
    if command -v timeout >/dev/null; then guard="timeout -k 10 ${GPU_CHECK_TIMEOUT:-240}"; fi
    for section in ${SECTIONS//,/ }; do
        echo; echo "========== $section ($(( $(date +%s) - START )) s into the run) =========="
        case $section in
            pytest)
                if [ "$cuda" = 0 ]; then echo "pytest: not run without CUDA"; continue; fi
                run_pytest || failed="$failed pytest" ;;
            cli|golden|loss|step)
                local extra=""
                if [ "$section" = loss ]; then extra=${LOSS_ARGS:-}; fi
                # shellcheck disable=SC2086  # guard, mode and the ARGS are word lists
                $guard "$PY" "benchmarks/gpu_$section.py" --out "$OUT" $mode ${GPU_CHECK_ARGS:-} $extra \
                    || failed="$failed $section" ;;
            *) echo "unknown section $section (known: pytest,cli,golden,loss,step)"; failed="$failed $section" ;;
        esac
    done
    echo "== gpu_check.sh done in $(( $(date +%s) - START )) s; failed:${failed:- none}; outputs in $OUT:"
    ls -l "$OUT"
    [ -z "$failed" ]
}

run_pytest() {
    # The property tests of tests/test_metrics.py need hypothesis; where it is missing that file is
    # left out (said here and in pytest.txt), not replaced by a stand-in package.
    local ignore=""
    if ! "$PY" -c 'import hypothesis' 2>/dev/null; then
        ignore="--ignore=tests/test_metrics.py"
        echo "note: hypothesis is not installed: tests/test_metrics.py is not run"
    fi
    local command="timeout -k 10 ${PYTEST_TIMEOUT:-150} $PY -m pytest -n 8 -rs -p no:cacheprovider --durations=10 $ignore"
    echo "\$ $command  (output in $OUT/pytest.txt)"
    # shellcheck disable=SC2086
    { echo "\$ $command"; $command; } > "$OUT/pytest.txt" 2>&1
    local code=$?
    tail -15 "$OUT/pytest.txt"
    return $code
}

main 2>&1 | tee "$OUT/gpu_log.txt"
