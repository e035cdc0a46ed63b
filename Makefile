# Two commands set everything up on a fresh machine:
#   make demo   - venv, install, fetch the corpus, train the demo model, evaluate, sample
#   make test   - venv, install (with test extras), run the test suite
#   make serve  - serve the demo checkpoint over the OpenAI API (after make demo)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The pinned CPU wheel first: a bare `torch` would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv install install-test test demo serve clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-serve: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[serve]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Two workers, a test file each at a time (module fixtures are built once): every test runs its
# model and subprocesses on one thread, so a second core halves the suite (6 min against 12.5).
test: install-test
	$(PY) -m pytest -n 2 --dist loadfile

demo: install
	rm -rf runs/demo
	OMP_WAIT_POLICY=PASSIVE $(PY) -m andromeda train --preset demo --out runs/demo --time-budget $${DEMO_SECONDS:-480} \
		--batch-size 16 --seq-len 128 --lr 3e-3 --warmup-steps 50 --qk-scale-lr-mult 30 --bf16 --eval-every 250
	OMP_WAIT_POLICY=PASSIVE $(PY) -m andromeda eval --checkpoint runs/demo --seq-len 256 1024 --batch-size 16 --dtype bf16
	OMP_WAIT_POLICY=PASSIVE $(PY) -m andromeda generate --checkpoint runs/demo --prompt "ROMEO:" --max-new-tokens 300 \
		--temperature 0.8 --top-k 40 --seed 0

# The demo checkpoint over the OpenAI-compatible HTTP API (after `make demo`); SERVE_ARGS adds flags.
serve: $(VENV)/.installed-serve
	$(PY) -m andromeda serve --checkpoint runs/demo $(SERVE_ARGS)

clean:
	rm -rf $(VENV) runs
