# latentrt developer commands. Everything installs into $(VENV) from scratch.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.latentrt-installed
CORE   := $(VENV)/.latentrt-core-installed

.PHONY: install demo test test-all bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU wheel this machine carries; an unpinned torch would pull
# a multi-GB CUDA build. pyproject keeps a broad range for users.
# `make demo` needs the package alone; `make test` adds the dev extra (test references).
$(CORE): pyproject.toml Makefile | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e .
	touch $(CORE)

# tensorrt-stubs types the TensorRT code where TensorRT cannot be installed (no GPU): --no-deps, since
# it depends on tensorrt itself. tools/check_tensorrt_types.py patches a copy for mypy (tests run it).
$(STAMP): $(CORE)
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps 'k-diffusion==0.1.1.post1'
	$(PIP) install --no-deps 'tensorrt-stubs==10.13.0.35.1'
	touch $(STAMP)

install: $(STAMP)

demo: $(CORE)
	$(VENV)/bin/latentrt demo --out demo.png --grid demo-grid.png

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

bench: install
	$(PY) benchmarks/sampler_overhead.py
	cd benchmarks && ../$(PY) load_memory.py
	$(PY) benchmarks/service_throughput.py
	$(PY) benchmarks/ray_throughput.py
	cd benchmarks && ../$(PY) estimate_accuracy.py
	cd benchmarks && ../$(PY) unet_vs_diffusers.py --models demo --repeats 20
	cd benchmarks && ../$(PY) unet_vs_diffusers.py --models sd15 --repeats 3
	cd benchmarks && ../$(PY) unet_vs_diffusers.py --models sdxl --repeats 2
	cd benchmarks && ../$(PY) onnx_vs_torch.py
	cd benchmarks && ../$(PY) e2e_vs_diffusers.py
	cd benchmarks && ../$(PY) e2e_vs_diffusers.py --model sdxl --size 512 --steps 10

lint: install
	$(PY) -m ruff check latentrt tests examples benchmarks tools
	$(PY) -m ruff format --check latentrt tests examples benchmarks tools
	$(PY) -m mypy
	$(PY) tools/check_tensorrt_types.py

clean:
	rm -rf $(VENV) build *.egg-info demo.png demo-grid.png sampler-demo.png
