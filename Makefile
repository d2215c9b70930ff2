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

# Debian's Mosquitto: the tests start their own broker on a free port. openssl makes the TLS tests' certificates.
mosquitto:
	@{ command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto; } && command -v openssl >/dev/null || { \
	  echo "installing mosquitto and openssl (Debian packages)"; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto openssl >/dev/null; }

test: $(STAMP) mosquitto
	$(BIN)/python -m pytest

# Style: the same checks CI runs.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline.py

# Ten minutes of good and bad frames and broker restarts; prints the worker's memory, threads and files.
soak: $(STAMP) mosquitto
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
