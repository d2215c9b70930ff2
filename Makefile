# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install mosquitto bench soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The worker with its bundled model and an in-process broker on 127.0.0.1:1883.
run: $(STAMP)
	$(BIN)/emotion-worker run --embedded-broker

# Debian's Mosquitto: the tests start their own broker on a free port.
mosquitto:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || { \
	  echo "installing mosquitto (Debian package)"; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto >/dev/null; }

test: $(STAMP) mosquitto
	$(BIN)/python -m pytest

# Style: the same checks CI runs.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every figure of docs/benchmarks.md, printed and written as JSON into runs/bench/ (about 30 minutes
# on 2 cores); `python benchmarks/table.py runs/bench/*.json` renders them as its tables.
bench: $(STAMP)
	mkdir -p runs/bench
	$(BIN)/python benchmarks/backends.py --json runs/bench/backends.json
	$(BIN)/python benchmarks/pipeline.py --json runs/bench/pipeline.json
	$(BIN)/python benchmarks/pipeline.py --weights resnet9 --fps 10 30 max --json runs/bench/pipeline-full.json
	$(BIN)/python benchmarks/table.py runs/bench/backends.json runs/bench/pipeline.json runs/bench/pipeline-full.json

# Ten minutes of good and bad frames and broker restarts; prints the worker's memory, threads and files.
soak: $(STAMP) mosquitto
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
