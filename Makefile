# Plain runner for quantlab. `make test` is what CI runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# the suite on every core (one compute thread per worker, tests/conftest.py); the vLLM cases share one worker
PYTEST := $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

.PHONY: install test test-fast demo toys toys-hard clean

$(BIN)/quantlab: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: with no torch installed a plain requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/quantlab

install: $(BIN)/quantlab

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

demo: install
	$(BIN)/quantlab quantize toy-llava --recipe recipes/luq.yaml --out runs/demo

# Rebuild the toy models from scratch (deterministic for a given --threads; default 2). The shipped copies were
# built with --threads 1 on a shared machine: 17 min (toy-llava), 32.5 min (toy-qwen2.5-vl); see their
# training.json. This target, measured alone on 2 cores: toy-qwen2.5-vl 25 min 3 s, test accuracy 0.950.
toys: install
	$(BIN)/python -m quantlab.toys.train toy-llava --out quantlab/assets/toy-llava
	$(BIN)/python -m quantlab.toys.train toy-qwen2.5-vl --out quantlab/assets/toy-qwen2.5-vl

# the hard test bed's LLaVA toy (docs/hard-testbed.md, run 13): about 43 minutes on two cores
toys-hard: install
	$(BIN)/python -m quantlab.toys.train toy-llava-hard --out quantlab/assets/toy-llava-hard --n-train 40000 \
		--bind-bins 6 --threads 2 --steps 1800 --batch-size 64 --lr 1e-3 --vision-warmup 600 --eval-every 300 \
		--bf16 --balanced-cells --late-weight 0.5 --late-from 700 --no-late-count --relation-attn-weight 1

clean:
	rm -rf $(VENV) .pytest_cache runs
