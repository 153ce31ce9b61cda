# Two entry points for a fresh machine; each bootstraps .venv on first use.
#   make validate   the main job (see README)
#   make test       the test suite (CI runs this)
#   make lab        JupyterLab on notebooks/ with the fluxkit kernel
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fluxkit-installed
export HF_HUB_OFFLINE := 1

.PHONY: validate test lab clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: an unpinned resolve would fetch a multi-GB CUDA build from PyPI
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m ipykernel install --prefix $(VENV) --name fluxkit --display-name "fluxkit" >/dev/null
	touch $@

validate: $(STAMP)
	$(VENV)/bin/fluxkit validate

test: $(STAMP)
	$(VENV)/bin/pytest

# JupyterLab on the notebooks, with the `fluxkit` kernel registered for this environment
lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

clean:
	rm -rf $(VENV)
