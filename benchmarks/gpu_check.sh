#!/usr/bin/env bash
# GPU check of hpseg in one run: machine, install, then benchmarks/gpu_benchmark.py (see its docstring).
#
#   bash benchmarks/gpu_check.sh [SECTIONS]      # in the repository root; SECTIONS: comma-separated,
#                                                # of env,pytest,cli,golden,loss,step (default: all)
#
# Environment: OUT (output folder; a temporary one if unset), PYTHON (default python3),
# GPU_CHECK_ARGS (extra arguments for gpu_benchmark.py, e.g. "--deadline 300"),
# GPU_CHECK_TIMEOUT (hard stop of gpu_benchmark.py in seconds, default 450).
# Without CUDA it runs a smoke test with tiny sizes (--smoke --device cpu) and skips pytest.
# Outputs in $OUT: gpu_log.txt (everything printed), gpu_results.json, pytest.txt, cli.txt.
set -u -o pipefail
cd "$(dirname "$0")/.."
SECTIONS=${1:-env,pytest,cli,golden,loss,step}
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

    local mode="--device cuda"
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        mode="--smoke --device cpu"
        echo "== no CUDA: smoke run with tiny sizes ($mode)"
    fi
    echo "== setup took $(( $(date +%s) - START )) s"
    # A hard stop well inside the device call's limit (the script's own deadline is 360 s; results are
    # saved after every section and every loss case, so a stop loses only the summary).
    local guard=""
    if command -v timeout >/dev/null; then guard="timeout -k 10 ${GPU_CHECK_TIMEOUT:-450}"; fi
    # shellcheck disable=SC2086  # guard, mode and GPU_CHECK_ARGS are word lists
    $guard "$PY" benchmarks/gpu_benchmark.py --sections "$SECTIONS" --out "$OUT" $mode ${GPU_CHECK_ARGS:-}
    local code=$?
    echo "== gpu_check.sh done in $(( $(date +%s) - START )) s (gpu_benchmark.py exit code $code); outputs in $OUT:"
    ls -l "$OUT"
    return $code
}

main 2>&1 | tee "$OUT/gpu_log.txt"
