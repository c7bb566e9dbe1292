# Sourced by the GPU scripts (bench/gpu_check.sh, bench/gpu_train_plcreg3d.sh): the wheels the GPU
# image lacks, carried in ./.whl beside the tree, installed with --no-deps into a temporary target
# put on PYTHONPATH; then the project itself with --no-deps over the torch already there.
# Needs $PY (the interpreter) and $LOG (where pip writes); returns 1 when the project cannot be
# installed.
gpu_site() {
  if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/gpu_check_site .whl/*.whl >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/gpu_check_site
  fi
  if ! "$PY" -c "import regseg.models, regseg.engines" > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >> "$LOG" 2>&1 \
      || { echo "installing the project (--no-deps) failed; see $LOG" >&2; return 1; }
  fi
}
