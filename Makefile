# make demo   - set up, then run tierd on its defaults with real model processes against it
# make check  - set up, then lint, type-check and run the tests (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo check test lint bench lock clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml requirements.lock scripts/torch.pin scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(PY) examples/qwen3vl.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) scripts/import_graph.py --quiet

test: setup
	$(PY) -m pytest

check: lint test

bench: setup
	$(PY) bench/bench_core.py
	$(PY) bench/bench_alloc.py
	$(PY) bench/bench_disk.py
	$(PY) bench/bench_codecs.py
	mkdir -p bench/results
	$(PY) bench/record_qwen3vl_trace.py --out bench/results/qwen3vl.trace.jsonl
	$(PY) bench/bench_predict.py --trace bench/results/qwen3vl.trace.jsonl
	$(PY) bench/bench_qwen3vl.py --json bench/results/qwen3vl.json

# refresh requirements.lock on purpose (commit it alone: its CI run shows the new versions pass)
lock:
	bash scripts/lock.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
