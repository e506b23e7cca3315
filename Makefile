# make demo   - set up, then run tierd on its defaults with real model processes against it
# make check  - set up, then lint, type-check and run the tests (what CI runs)
# make chaos  - the standing chaos and fuzz suite (tests/chaos; docs/reliability.md); its budget:
#               CHAOS_EXAMPLES per request type, CHAOS_KILLS kill -9s, CHAOS_HOSTILE_SECONDS
#               (make chaos-ci: the bounded form CI runs after make check, under 2 minutes here)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo check test lint chaos chaos-ci bench lock check-upstream clean

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

CHAOS_EXAMPLES ?= 500
CHAOS_KILLS ?= 25
CHAOS_HOSTILE_SECONDS ?= 45
chaos: setup
	CHAOS_EXAMPLES=$(CHAOS_EXAMPLES) CHAOS_KILLS=$(CHAOS_KILLS) CHAOS_HOSTILE_SECONDS=$(CHAOS_HOSTILE_SECONDS) \
		$(PY) -m pytest -m chaos tests/chaos

chaos-ci:
	$(MAKE) chaos CHAOS_EXAMPLES=60 CHAOS_KILLS=5 CHAOS_HOSTILE_SECONDS=15

bench: setup
	$(PY) bench/bench_core.py
	$(PY) bench/bench_alloc.py
	$(PY) bench/bench_disk.py
	$(PY) bench/bench_codecs.py
	$(PY) bench/bench_metrics.py
	mkdir -p bench/results
	$(PY) bench/record_qwen3vl_trace.py --out bench/results/qwen3vl.trace.jsonl
	$(PY) bench/bench_predict.py --trace bench/results/qwen3vl.trace.jsonl
	$(PY) bench/bench_qwen3vl.py --json bench/results/qwen3vl.json
	$(PY) bench/bench_kvcache.py --json bench/results/kvcache.json

# the model integration's tests against the newest transformers 5.x (not the locked one), in a venv
# of its own: run it before `make lock` to see whether a new release breaks us
check-upstream:
	VENV=.venv-upstream bash scripts/setup.sh
	.venv-upstream/bin/python -m pip install --quiet --upgrade "transformers>=5,<6"
	.venv-upstream/bin/python -m pip freeze --all | grep -iE '^transformers=='
	.venv-upstream/bin/python -m pytest -q tests/test_integration_kv.py tests/test_integration_vision.py tests/test_integration_weights.py

# refresh requirements.lock on purpose (commit it alone: its CI run shows the new versions pass)
lock:
	bash scripts/lock.sh

clean:
	rm -rf $(VENV) .venv-upstream .pytest_cache .mypy_cache .ruff_cache
