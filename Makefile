# Two entry points for a fresh machine; each bootstraps .venv with what its target needs on first use.
#   make validate   the main job (see README): the runtime and the lab
#   make test       lint and the test suite (CI runs this): every extra, the test tools
#   make lab        JupyterLab on notebooks/ with the fluxkit kernel
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: validate test lab clean

$(VENV)/.torch:
	python3 -m venv $(VENV)
	# torch first, pinned: an unpinned resolve would fetch a multi-GB CUDA build from PyPI
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	touch $@

$(VENV)/.lab: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e '.[lab]'
	$(PY) -m ipykernel install --prefix $(VENV) --name fluxkit --display-name "fluxkit" >/dev/null
	touch $@

$(VENV)/.test: $(VENV)/.lab pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@

validate: $(VENV)/.lab
	$(VENV)/bin/fluxkit validate

# pytest-xdist: a worker per core, each single-threaded (workers with two OpenMP threads each on 2 cores thrash)
test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n auto --dist loadfile

# JupyterLab on the notebooks, with the `fluxkit` kernel registered for this environment
lab: $(VENV)/.lab
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

clean:
	rm -rf $(VENV)
