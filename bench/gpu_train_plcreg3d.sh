#!/usr/bin/env bash
# PLCReg 3-D at the resolution users register brains at, on a lent GPU: the second device call
# after bench/gpu_check.sh (issue 18, item 2). Trains `regseg train plcreg3d --spacing 1.5` for
# --minutes (data and validation included) into --out: plcreg3d.pt, plcreg3d.json (validation
# Dice, folding, TRE on MNI152 seeds 20000..), the training curve, and train.log.
#
#   bash bench/gpu_train_plcreg3d.sh [--out DIR] [--minutes M] [--spacing MM] [--dry-run]
#
# nilearn (it ships the MNI152 template) and nibabel are not on the GPU image: carry their wheels
# in ./.whl (installed with --no-deps). --dry-run (no GPU needed, CI runs it) prints the plan and
# checks the command line, the model at that spacing and where the template would come from.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=out/gpu_plcreg3d
MINUTES=4
SPACING=1.5
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    --minutes) MINUTES="${2:?--minutes needs a number}"; shift ;;
    --spacing) SPACING="${2:?--spacing needs mm}"; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_train_plcreg3d.sh: unknown option $1 (use --out, --minutes, --spacing, --dry-run)" >&2
       exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
CMD=("$PY" -m regseg.train.plcreg 3d --out "$OUT" --spacing "$SPACING" --minutes "$MINUTES"
     --threads 8 --no-progress --checkpoint-every 0)
echo "PLCReg 3-D on the GPU: ${CMD[*]}"
if [ "$DRY" = 1 ]; then
  "${CMD[@]}" --help > /dev/null || exit 2  # argparse checks --spacing/--minutes first
  "$PY" - "$SPACING" <<'PYEOF' || exit 1
import sys
from regseg.errors import RegsegError
from regseg.models.plcreg import PLCReg, count_parameters
from regseg.sim import mni
from regseg.train.plcreg_mni import model_at_spacing
try:
    cfg = model_at_spacing(float(sys.argv[1]))
except (RegsegError, ValueError) as exc:
    sys.exit(f"dry run: --spacing {sys.argv[1]}: {exc}")
print(f"  model: working grid {' x '.join(map(str, cfg.size))} (K, J, I) at {sys.argv[1]} mm, "
      f"{count_parameters(PLCReg(cfg))} parameters")
try:
    print(f"  MNI152 template: {mni.mni_paths()['t1']}")
except RegsegError as exc:
    print(f"  MNI152 template: not here ({exc}); carry the nilearn wheel in ./.whl")
PYEOF
  echo "dry run: OK; nothing was trained"
  exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_train_plcreg3d.sh: CUDA is not available to $PY; use --dry-run here" >&2
  exit 2
fi
mkdir -p "$OUT"
LOG="$OUT/train.log"
: > "$LOG"
. bench/gpu_site.sh
gpu_site || { echo "gpu_train_plcreg3d.sh: see $LOG" >&2; exit 1; }
"${CMD[@]}" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
