#!/usr/bin/env bash
# The GPU checks of structkit, on a machine with one CUDA GPU (docs/gpu.md). Under 6 minutes on one GPU once
# the virtualenv exists; prints one PASS/FAIL line per check and exits non-zero if any check failed.
#
#   scripts/gpu_check.sh                 # from anywhere; runs in the repository root
#
# Checks:
#   setup       make setup (creates .venv on a fresh machine; a no-op when it is up to date)
#   cuda        torch sees a CUDA device (without one every other check is reported FAIL, not run)
#   tests       pytest -m cuda: the tests marked cuda (solver tests on cuda, digits end to end on cuda,
#               bf16 on cuda); FAIL if any of them was skipped for lack of CUDA
#   benchmark   benchmarks/solver_overhead.py --device cuda -> benchmarks/results/solver_overhead_cuda.json
#               (the line shows RAMDA's step-time ratio to AdamW per model; the issue's GPU target is <= 1.3x)
#   quickstart  structkit run configs/quickstart.yaml --set schedule.device=cuda into a temporary folder
#               (needs Fashion-MNIST: /usr/share/datasets/fashion-mnist, or FMNIST_ROOT=<folder with the .gz files>)
#
# Environment: TIMEOUT_TESTS, TIMEOUT_BENCH, TIMEOUT_QUICKSTART (seconds; defaults 140, 90, 110: at most
# about 6 minutes for the checks after setup),
# GPU_CHECK_LOGS (folder for the logs; default a new temporary folder), FMNIST_ROOT.
set -u
cd "$(dirname "$0")/.." || exit 2
PY=.venv/bin/python
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d -t structkit_gpu_check.XXXXXX)}
mkdir -p "$LOGS"
FAILED=0
START=$(date +%s)

line() {  # line STATUS NAME SECONDS DETAIL
    printf '%-4s %-10s %4ss  %s\n' "$1" "$2" "$3" "$4"
    [ "$1" = PASS ] || FAILED=1
}

tail_log() {  # the end of a failed check's log, indented
    echo "     log: $1"
    tail -n "${2:-15}" "$1" | sed 's/^/     | /'
}

# ---- setup
t0=$(date +%s)
if make setup >"$LOGS/setup.log" 2>&1 && [ -x "$PY" ]; then
    line PASS setup $(( $(date +%s) - t0 )) "virtualenv .venv ready"
else
    line FAIL setup $(( $(date +%s) - t0 )) "make setup failed"
    tail_log "$LOGS/setup.log"
    exit 1
fi

# ---- cuda
t0=$(date +%s)
if GPU=$("$PY" -c 'import torch; assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s), torch {torch.__version__}, CUDA {torch.version.cuda}")' 2>"$LOGS/cuda.log"); then
    line PASS cuda $(( $(date +%s) - t0 )) "$GPU"
    HAVE_CUDA=1
else
    line FAIL cuda $(( $(date +%s) - t0 )) "no usable CUDA device: $(tail -n 1 "$LOGS/cuda.log")"
    HAVE_CUDA=0
fi

# ---- tests marked cuda
t0=$(date +%s)
if [ $HAVE_CUDA = 0 ]; then
    line FAIL tests 0 "not run (no CUDA)"
else
    timeout "${TIMEOUT_TESTS:-140}" "$PY" -m pytest -q -p no:xdist -p no:cacheprovider -m cuda -rs tests \
        >"$LOGS/tests.log" 2>&1
    rc=$?
    summary=$(tail -n 1 "$LOGS/tests.log" | sed 's/=//g; s/^ *//; s/ *$//')
    if [ $rc -eq 0 ] && grep -q "passed" "$LOGS/tests.log" && ! grep -q "no CUDA device" "$LOGS/tests.log"; then
        line PASS tests $(( $(date +%s) - t0 )) "pytest -m cuda: $summary"
    else
        [ $rc -eq 124 ] && summary="timed out after ${TIMEOUT_TESTS:-140} s"
        line FAIL tests $(( $(date +%s) - t0 )) "pytest -m cuda (exit $rc): $summary"
        tail_log "$LOGS/tests.log" 25
    fi
fi

# ---- solver benchmark on cuda
t0=$(date +%s)
JSON=benchmarks/results/solver_overhead_cuda.json
if [ $HAVE_CUDA = 0 ]; then
    line FAIL benchmark 0 "not run (no CUDA)"
else
    rm -f "$JSON"
    timeout "${TIMEOUT_BENCH:-90}" "$PY" benchmarks/solver_overhead.py --device cuda --models resnet18 resnet50 \
        --json "$JSON" >"$LOGS/benchmark.log" 2>&1
    rc=$?
    detail=$("$PY" - "$JSON" 2>>"$LOGS/benchmark.log" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
rows = data.get("rows", data) if isinstance(data, dict) else data
rows = [r for r in rows if isinstance(r, dict) and r.get("what", "optimizer_step") == "optimizer_step"]
assert rows and all(str(r["device"]).startswith("cuda") for r in rows), "no cuda rows in the JSON"
ramda = [r for r in rows if r["solver"] == "ramda"]
parts = [f"{r['model']} {r['ratio']:.2f}x" for r in ramda]
met = all(r["ratio"] <= 1.3 for r in ramda)
print(f"RAMDA/AdamW step: {', '.join(parts) or 'no ramda rows'} (target <= 1.3x {'met' if met else 'MISSED'}); {len(rows)} rows")
EOF
)
    if [ $rc -eq 0 ] && [ -n "$detail" ]; then
        line PASS benchmark $(( $(date +%s) - t0 )) "$detail -> $JSON"
    else
        [ $rc -eq 124 ] && detail="timed out after ${TIMEOUT_BENCH:-90} s"
        line FAIL benchmark $(( $(date +%s) - t0 )) "solver_overhead.py --device cuda (exit $rc) ${detail:-}"
        tail_log "$LOGS/benchmark.log"
    fi
fi

# ---- quickstart on cuda
t0=$(date +%s)
OUT=$(mktemp -d -t structkit_quickstart_cuda.XXXXXX)
EXTRA=()
[ -n "${FMNIST_ROOT:-}" ] && EXTRA=("data.options.root=$FMNIST_ROOT")
if [ $HAVE_CUDA = 0 ]; then
    line FAIL quickstart 0 "not run (no CUDA)"
else
    timeout "${TIMEOUT_QUICKSTART:-110}" .venv/bin/structkit run configs/quickstart.yaml --out "$OUT/run" --quiet \
        --set schedule.device=cuda deploy.warmup=5 deploy.runs=20 ${EXTRA[@]+"${EXTRA[@]}"} >"$LOGS/quickstart.log" 2>&1
    rc=$?
    device=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["device"])' "$OUT/run/results/train.json" 2>/dev/null)
    if [ $rc -eq 0 ] && [ "${device#cuda}" != "$device" ] && [ -f "$OUT/run/report.json" ]; then
        line PASS quickstart $(( $(date +%s) - t0 )) "trained on $device: $(grep -m1 '^structkit: test accuracy' "$LOGS/quickstart.log" | cut -c 12- | sed 's/; report: .*//') ($OUT/run)"
    else
        [ $rc -eq 124 ] && device="timed out after ${TIMEOUT_QUICKSTART:-110} s"
        line FAIL quickstart $(( $(date +%s) - t0 )) "structkit run configs/quickstart.yaml --set schedule.device=cuda (exit $rc${device:+, $device})"
        tail_log "$LOGS/quickstart.log"
    fi
fi

echo "---- $([ $FAILED = 0 ] && echo 'all checks passed' || echo 'some checks FAILED') in $(( $(date +%s) - START )) s; logs in $LOGS"
exit $FAILED
