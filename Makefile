# The two commands a newcomer needs:  `make run`  and  `make test`  (each creates .venv if missing).
# GPU machines: install your CUDA build of torch into .venv first, then `make install TORCH=`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP   = $(VENV)/.installed

.PHONY: install run demo test test-slow bench gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(strip $(TORCH)),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) jobs/experiment.py

demo: $(STAMP)
	$(PY) -m tah.demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or gpu"

bench: $(STAMP)
	$(PY) bench/attention.py
	$(PY) bench/train_step.py
	$(PY) bench/label_throughput.py
	$(PY) bench/engine.py
	$(PY) bench/tah2_decode.py
	$(PY) bench/serve.py
	$(PY) bench/scale.py

gpu-check:  # on a CUDA machine: env, gpu tests, GPU benchmarks, one table (< 10 min); elsewhere a no-op
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) runs *.egg-info
