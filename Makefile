# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use and reuse it afterwards; the stamp is rebuilt only when the
# dependency list changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.viseg-installed
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=
# two pytest workers (pytest-xdist): the end-to-end tests spend much of their time starting processes and
# waiting on them, so two run side by side even on a 2-core CI machine. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2

.PHONY: demo test lint bench-fingerprint clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# torchvision arrives only through timm (dynamic-network-architectures' transformer models, unused by
	# viseg). PyPI's torchvision is built for CUDA torch; against the CPU torch it fails to import and
	# takes Lightning down with it (torchmetrics imports it when installed). Drop it when it is broken.
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -y -q torchvision
	touch $@

# The main job: 5 folds x 2 schedulers as Ray Tune trials on the built-in demo dataset, on a local Ray.
demo: $(STAMP)
	$(PY) -m viseg.sweep folds=0-4 lr_scheduler=step_lr,poly

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench-fingerprint: $(STAMP)
	bash bench/fingerprint_vs_nnunet.sh

clean-venv:
	rm -rf $(VENV)
