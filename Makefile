# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-ha lint install mosquitto bench soak clean

# PyTorch is most of the install. Without an NVIDIA GPU (no working nvidia-smi) its CPU
# build comes from TORCH_CPU_INDEX when that answers within 5 s, else the default wheels
# are taken. Sizes of .venv, see docs/getting-started.md: about 1.4 GB with the CPU build (estimated),
# 5.9 GB with the CUDA build (its nvidia-*, cuda-* and triton packages are 4.1 GB).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH := 'torch>=2.4'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing PyTorch with CUDA (about 5.9 GB in all)"; \
	  $(BIN)/pip install $(TORCH); \
	elif $(BIN)/python -c "import urllib.request; urllib.request.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null; then \
	  echo "no NVIDIA GPU: installing the CPU build of PyTorch from $(TORCH_CPU_INDEX)"; \
	  $(BIN)/pip install --index-url $(TORCH_CPU_INDEX) $(TORCH); \
	else \
	  echo "no NVIDIA GPU, but $(TORCH_CPU_INDEX) does not answer: installing PyTorch from the default index"; \
	  $(BIN)/pip install $(TORCH); \
	fi
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The worker with its bundled model and a broker on 127.0.0.1:1883: the one already there,
# else Mosquitto when installed, else amqtt in-process (see docs/getting-started.md).
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

# Opt-in: a real Home Assistant 2024.3 and Mosquitto check what the worker's MQTT discovery makes there
# (docs/home-assistant.md). The harness installs Home Assistant once into ~/.cache/emotion-ha-venv (about 2 min).
HA_TOOL ?= ../shared/tools/ha.py
test-ha: $(STAMP) mosquitto
	$(BIN)/python tests/ha/check_home_assistant.py --ha-tool $(HA_TOOL)

# Style: the same checks CI runs.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every figure of docs/benchmarks.md, printed and written as JSON into runs/bench/ (about 40 minutes
# on 2 cores); `python benchmarks/table.py runs/bench/*.json` renders them as its tables.
bench: $(STAMP)
	mkdir -p runs/bench
	$(BIN)/python benchmarks/backends.py --json runs/bench/backends.json
	$(BIN)/python benchmarks/pipeline.py --json runs/bench/pipeline.json
	$(BIN)/python benchmarks/pipeline.py --backend onnxruntime --json runs/bench/pipeline-int8.json
	$(BIN)/python benchmarks/pipeline.py --tta flip --fps 30 max --json runs/bench/pipeline-flip.json
	$(BIN)/python benchmarks/pipeline.py --weights resnet9 --tta flip --fps 10 30 max --json runs/bench/pipeline-full.json
	$(BIN)/python benchmarks/table.py runs/bench/backends.json runs/bench/pipeline.json runs/bench/pipeline-int8.json \
		runs/bench/pipeline-flip.json runs/bench/pipeline-full.json

# Ten minutes of good and bad frames and broker restarts; prints the worker's memory, threads and files.
soak: $(STAMP) mosquitto
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
