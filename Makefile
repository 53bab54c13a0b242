# torch and torchvision as a pair that imports together (README, Install); another pair:
# make install TORCH="torch==... torchvision==...". A TORCH without torchvision (the small CPU
# build: make install TORCH=torch==2.13.0) installs the project without it.
DEFAULT_TORCH := torch==2.14.1 torchvision==0.29.1
PY := .venv/bin/python
STAMP := .venv/.installed
# Holds the TORCH the venv was built with: rewritten (so the install reruns) only when it changes.
# (Not .venv/.torch, which venvs made before the pair was the default hold: those get the pair.)
TORCH_USED := .venv/.torch-pair
# Once chosen, a TORCH stays: `make test` after `make install TORCH=...` keeps that venv.
ifndef TORCH
TORCH := $(or $(shell cat $(TORCH_USED) 2>/dev/null),$(DEFAULT_TORCH))
endif

.DEFAULT_GOAL := help
.PHONY: help install data train sweep eval report bench test lint format sync clean clean-logs FORCE

help: ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-11s\033[0m %s\n", $$1, $$2}'
	@echo "  Then \`. .venv/bin/activate\` to run python train.py ... yourself (README.md)."

$(TORCH_USED): FORCE
	@mkdir -p .venv
	@[ "$$(cat $@ 2>/dev/null)" = '$(TORCH)' ] || echo '$(TORCH)' > $@

$(STAMP): pyproject.toml $(TORCH_USED)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
ifneq ($(findstring torchvision,$(TORCH)),)
	$(PY) -m pip install -q -e '.[dev,search]'
else
	$(PY) -m pip uninstall -qq -y torchvision
	$(PY) scripts/requirements.py --extra dev --extra search --without torchvision > .venv/requirements.txt
	$(PY) -m pip install -q -r .venv/requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@echo 'torchvision left out (TORCH names none): data=mnist, fashion_mnist, synthetic and regression work, the torchvision data sets (kmnist, emnist, qmnist, cifar10, cifar100, svhn, fakedata) end with an error; for them: make install TORCH="$(DEFAULT_TORCH)"'
endif
	touch $(STAMP)

install: $(STAMP) ## create .venv: torch first (make variable TORCH), then the project

data: $(STAMP) ## fetch the data set into data/ (default MNIST, MD5-checked; ARGS=data=cifar10...)
	$(PY) -m actlab.data $(ARGS)

train: $(STAMP) ## one training run with the default config (ARGS="..." adds overrides)
	$(PY) train.py $(ARGS)

sweep: $(STAMP) ## the main job: relu vs leaky vs none, packed, then the table (PACK=0: a job each)
	$(PY) train.py -m $(if $(filter 0,$(PACK)),hydra/sweeper=basic) model.act=relu,leaky,none $(ARGS)

eval: $(STAMP) ## test a checkpoint with its run's config (CKPT=<run>/checkpoints/last.ckpt)
	$(PY) eval.py ckpt_path="$(CKPT)" $(ARGS)

report: $(STAMP) ## tables and plots of the newest sweep (SWEEP=logs/multiruns/... to choose)
	$(PY) -m actlab.report $(SWEEP)

bench: $(STAMP) ## time an epoch vs plain PyTorch, start-up, memory (ARGS="--rounds 5"...)
	$(PY) -m benchmarks.bench $(ARGS)

# Test files spread over this many pytest workers (pytest-xdist); TEST_WORKERS=0 runs them in
# this process, one after another. The 25 slowest tests are listed at the end, to keep the suite
# within its time.
TEST_WORKERS ?= 3
test: $(STAMP) ## run the test suite (TEST_WORKERS=0: in one process; ARGS="-k ..." picks tests)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=25 $(ARGS)

lint: $(STAMP) ## ruff check and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP) ## ruff fix and format
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

sync: $(STAMP) ## upload the offline W&B runs under logs/ (DIR=... elsewhere; needs a W&B key)
	@runs=$$(find $(or $(DIR),logs) -type d -name 'offline-run-*'); \
	if [ -z "$$runs" ]; then echo "no offline W&B runs under $(or $(DIR),logs)/"; else .venv/bin/wandb sync $$runs; fi

clean: ## remove the venv and caches (keeps data/ and logs/)
	rm -rf .venv .pytest_cache .ruff_cache src/*.egg-info

clean-logs: ## delete all runs under logs/
	find logs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
