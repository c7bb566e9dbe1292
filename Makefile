# Set-up and everyday commands. Each target creates .venv and installs what it needs on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: demo test lint bench train phantom clean gpu-check gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# --no-cache-dir: pip's cache would hold a second copy of every wheel (torch alone ~200 MB);
	# a CI run failed once for want of disk (session 17's stop: "No space left on device")
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	# torch is pinned through constraints.txt (2.13.0, the CPU wheel here); elsewhere any recent torch works
	$(PY) -m pip install -q --no-cache-dir -c constraints.txt -e ".[dev,onnx,bench,registration]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/regseg-stream --demo --max-frames 200 --stats-json out/demo_stats.json

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/latency.py --json out/bench_latency.json
	$(PY) bench/engines.py --json out/bench_engines.json
	$(PY) bench/classical.py --json out/bench_classical.json

train: $(STAMP)
	$(VENV)/bin/regseg train alignsegnet --out runs/alignsegnet

phantom: $(STAMP)
	$(VENV)/bin/regseg phantom --out out/phantom --seed 0

# The GPU acceptance check (bench/gpu_check.sh): no venv, nothing installed from the network; on
# a machine without CUDA run `bash bench/gpu_check.sh --dry-run`.
gpu-check:
	bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

# The wheels the GPU image lacks, for Python 3.12, no dependencies (~17 MB): bench/gpu_check.sh and
# bench/gpu_train_plcreg3d.sh install them from ./.whl; carry .whl with the device call.
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --implementation cp \
	  -d .whl monai nibabel pyzmq pyigtl nilearn

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
