# Two commands a fresh clone needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
TORCH := torch==2.13.0

.PHONY: demo test bench gpu-check venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) (first run only) ..."
	$(PY) -m pip install -qq --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -qq --disable-pip-version-check $(TORCH) -e '.[models,export,cpu,dev,bench]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wara demo

test: $(STAMP)
	$(PY) -m pytest

# Benchmarks (not tests): results to benchmarks/results/*.json, README section regenerated.
bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# On a machine with an NVIDIA GPU: the CUDA tests (pytest -m cuda) and the GPU benchmarks, to
# benchmarks/results/gpu/<device>/ (exits 2 at once where torch sees no CUDA device). It installs
# nothing (a GPU image has its own CUDA torch and no registry): it runs .venv's python where there
# is one, else GPU_PYTHON (default python3). Its base is a random one built on the spot, so no
# model package is needed there.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .wara-cache
