# make setup : create .venv here and install the project with its test tools (idempotent)
# make train : setup, then train a small PixelCNN on MNIST in about 6 minutes on 2 CPU cores
# make test  : setup, then the whole test suite (CPU only; starts its own local Ray and S3 server): ~14 min on 2 cores
# make test-fast : setup, then the tests that start no Ray cluster and no job process (the inner loop)

VENV ?= .venv
PYTHON := $(VENV)/bin/python
# torchvision's MNIST root (MNIST/raw); elsewhere pass DATA_DIR=... and add --download via TRAIN_FLAGS
DATA_DIR ?= ../shared/data/mnist
TRAIN_FLAGS ?=

.PHONY: setup train test test-fast clean gpu-check

setup: $(VENV)/.installed

# constraints-cpu.txt pins the CPU builds of torch/torchvision for machines without a GPU.
$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -qq --upgrade pip
	$(PYTHON) -m pip install -qq -c constraints-cpu.txt -e '.[test]'
	touch $@

train: setup
	$(PYTHON) jobs/train.py --dataset mnist --data-dir $(DATA_DIR) \
		--hidden 32 --blocks 4 --subset 30000 --epochs 1 --batch-size 64 --lr 2e-3 \
		--storage runs --name make-train $(TRAIN_FLAGS)

test: setup
	$(PYTHON) -m pytest -q --basetemp=/tmp/pixelcnn-pytest-$$$$ $(PYTEST_FLAGS)

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow" --basetemp=/tmp/pixelcnn-pytest-$$$$ $(PYTEST_FLAGS)

# make gpu-check : the GPU acceptance run on one H100/H200, <= 8 minutes (docs/gpu.md); on a CPU:
#                   make gpu-check GPU_CHECK_FLAGS="--device cpu --quick"
gpu-check:
	$(if $(wildcard $(PYTHON)),$(PYTHON),python3) benchmarks/gpu_check.py $(GPU_CHECK_FLAGS)

clean:
	rm -rf runs out .pytest_cache
