#!/usr/bin/env bash
# One GPU acceptance command: every GPU figure of the project in one short slot (<= 8 min on an
# H200), one JSON + a table of targets. Installs nothing heavy and needs no network: wheels the
# machine lacks (monai, nibabel, pyzmq, pyigtl) are taken from ./.whl when present, the project
# itself is installed with --no-deps over the torch already there.
#
#   bash bench/gpu_check.sh [--out DIR] [--data MNI_SET] [--dry-run]
#
# --dry-run (no GPU needed, CI runs it): prints the plan and checks every import path and
# command line the steps use that does not need CUDA, and the report on no results.
# --data: an MNI152 set written by `regseg mni --out DIR --pairs 4` (nilearn is not on the GPU
# machine: make it here and carry it); without it the 3-D registration step is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=out/gpu_check
DATA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    --data) DATA="${2:?--data needs a folder}"; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (use --out DIR, --data DIR, --dry-run)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$DATA" ] && [ ! -f "$DATA/pairs.csv" ]; then
  echo "gpu_check.sh: --data $DATA: no pairs.csv there; write one with \`regseg mni --out $DATA --pairs 4\`" >&2
  exit 2
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
# the benches' own JSON/PNG (all embedded in gpu_check.json); GPU_CHECK_RAW=/tmp/x keeps OUT to
# four files (the device tool returns at most 8)
RAW="${GPU_CHECK_RAW:-$OUT/raw}"
mkdir -p "$OUT" "$RAW"
: > "$OUT/steps.tsv"
LOG="$OUT/gpu_check.log"
: > "$LOG"

# the test files with gpu-marked tests (collecting the others would import packages the GPU
# machine lacks, e.g. SimpleITK)
GPU_FILES=$(grep -rl "mark.gpu" tests --include='*.py' | sort | tr '\n' ' ')
# name | timeout (s) | command. The timeouts add up to 490 s, inside the 8 minutes.
STEPS=(
  "env|20|$PY bench/gpu_env.py $RAW/env.json"
  "gpu_tests|100|$PY -m pytest -q -m gpu -p no:cacheprovider $GPU_FILES"
  "engines|140|$PY bench/engines.py --quick --device cuda --json $RAW/engines.json"
  "latency|140|$PY bench/latency.py --quick --device cuda --fps 500 --json $RAW/latency.json"
  "register_3d|90|$PY bench/batch.py --device cuda --ranks 1 --data ${DATA:-MISSING} --json $RAW/batch.json"
)

echo "GPU acceptance plan (results in $OUT: gpu_check.json, gpu_check.md, gpu_check.log):"
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$s"
  printf '  %-12s <= %3s s  %s\n' "$name" "$limit" "$cmd"
done
echo "  report       $PY bench/gpu_report.py $OUT --raw $RAW"

if [ "$DRY" = 1 ]; then
  echo "dry run: checking the import paths and command lines (no CUDA needed)"
  start=$(date +%s)
  "$PY" - <<'EOF' || exit 1
import contextlib, importlib, io, sys
sys.path.insert(0, "bench")
mods = ["regseg", "regseg.engines.base", "regseg.engines.registration", "regseg.engines.eager",
        "regseg.engines.compiled", "regseg.engines.onnxrt", "regseg.engines.tensorrt",
        "regseg.batch.cli", "regseg.batch.runner", "regseg.train.distributed",
        "regseg.stream.cli", "common", "engines", "latency", "batch", "gpu_report", "gpu_env"]
for m in mods:
    importlib.import_module(m)
for m in ("engines", "latency", "batch", "gpu_report", "gpu_env"):
    with contextlib.redirect_stdout(io.StringIO()) as text:
        try:
            sys.modules[m].main(["--help"])
        except SystemExit as exc:
            assert exc.code in (0, None), (m, exc.code)
    assert "usage" in text.getvalue(), m
print(f"  imports and --help: ok ({len(mods)} modules)")
EOF
  "$PY" -m pytest -q --collect-only -m gpu -p no:cacheprovider $GPU_FILES > "$LOG" 2>&1 \
    || { echo "dry run: collecting the gpu tests failed:"; tail -20 "$LOG"; exit 1; }
  echo "  gpu-marked tests collected: $(grep -c '::' "$LOG") in $(echo $GPU_FILES | wc -w) files"
  "$PY" bench/gpu_report.py "$OUT" --raw "$RAW" > /dev/null || { echo "dry run: the report failed"; exit 1; }
  grep -q unmeasured "$OUT/gpu_check.md" || { echo "dry run: report without 'unmeasured'"; exit 1; }
  echo "  report on no results: ok ($OUT/gpu_check.md says unmeasured)"
  echo "dry run: all import paths OK in $(( $(date +%s) - start )) s; nothing was measured"
  exit 0
fi

# --- the real run -------------------------------------------------------------------------
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: CUDA is not available to $PY; use --dry-run on a machine without a GPU" >&2
  exit 2
fi
. bench/gpu_site.sh  # the wheels the GPU image lacks (./.whl), then the project, --no-deps
gpu_site || { echo "gpu_check.sh: see $LOG" >&2; exit 1; }
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$s"
  if [ "$name" = register_3d ] && [ -z "$DATA" ]; then
    printf '%s\t%s\t%s\n' "$name" 125 0 >> "$OUT/steps.tsv"
    echo "== $name: skipped (no --data MNI152 set)" | tee -a "$LOG"
    continue
  fi
  echo "== $name (<= $limit s): $cmd" | tee -a "$LOG"
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" $cmd >> "$LOG" 2>&1
  rc=$?
  t1=$(date +%s)
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((t1 - t0))" >> "$OUT/steps.tsv"
  echo "   exit $rc after $((t1 - t0)) s" | tee -a "$LOG"
done
"$PY" bench/gpu_report.py "$OUT" --raw "$RAW"
