# Two commands for a fresh machine: `make run` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install check-config bench bench-sections-cluster soak soak-bounds lock clean

UV     := $(BIN)/uv

# uv installs in seconds what pip takes half a minute for; it is bootstrapped with the venv's own pip, so a fresh
# machine needs nothing beyond Python. requirements.lock pins every package (all platforms) for repeatable installs.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check 'uv>=0.9,<1'
	$(UV) pip install --quiet --python $(BIN)/python -c requirements.lock -e '.[models,test]'
	touch $(STAMP)

install: $(STAMP)

## Start the agent with the default config (embedded scheduler on 127.0.0.1:8470, metrics on :9464).
run: $(STAMP)
	$(BIN)/node-agent run --config config/node-agent.yaml

## The whole test suite (real model, real processes, real HTTP on loopback; Prometheus where installed), on
## TEST_WORKERS pytest-xdist workers. The CI machine has 2 cores; 3 workers, because a quarter of the suite waits
## (stalled bodies, lease expiry, outages) rather than decodes: 2 kept the CPU 77 % busy, 3 keep it about 90 %
## (9 min 15 s -> 8 min 30 s for the same tests here). Tests sharing a module-scoped fixture stay on one worker, and the longest start
## first (tests/conftest.py). TEST_WORKERS=0 runs it in this process, serially.
TEST_WORKERS ?= 3
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=25

check-config: $(STAMP)
	$(BIN)/node-agent check-config --config config/node-agent.yaml

## Side-by-side benchmark against plain faster-whisper, and the scheduler under 200 fake nodes (several minutes;
## writes nothing unless asked). One or some sections: make bench SECTIONS=scheduler (or SECTIONS=overhead,long).
bench: $(STAMP)
	$(BIN)/python bench/run.py $(if $(SECTIONS),--only $(SECTIONS))

## Issue 24's scheduler-side figure: one hour of audio on 10 fake nodes x 2 slots (decode = a sleep of 0.05 x the
## audio), against the same recording on one slot, SQLite then PostgreSQL (about 8 minutes; bench/sections_cluster.py).
bench-sections-cluster: $(STAMP)
	$(BIN)/python bench/sections_cluster.py $(if $(MARKDOWN),--markdown $(MARKDOWN))

## 30-minute soak: 2 agents, worker kills, scheduler restarts; prints outcomes, latency, memory.
soak: $(STAMP)
	$(BIN)/python tests/soak.py --minutes 30

## Issue 22's bound cases looped for 10 minutes on each store (SQLite, PostgreSQL) against a standalone scheduler,
## fake nodes and an agent; prints peak RSS per process and each case's answers; fails on any unexpected one.
soak-bounds: $(STAMP)
	$(BIN)/python tests/bounds_soak.py --minutes 10

## Re-pin requirements.lock after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(UV) pip compile pyproject.toml --extra models --extra test --universal --python-version 3.11 \
		--no-header --quiet -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
