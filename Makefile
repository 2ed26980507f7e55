# Set-up is self-bootstrapping: a virtual environment with the pinned CPU torch and the package.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EETUNE := $(VENV)/bin/eetune
DEMO   ?= runs/demo

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

# Convert the embedded default (SmolLM2-135M-Instruct) with exits after layers 10 and 20 and
# show each exit's held-out cross-entropy and agreement with the final layer (BoolQ dev).
demo: setup
	$(EETUNE) convert --model smollm2-135m --exits 10,20 --out $(DEMO)/exits-untuned
	$(EETUNE) evaluate $(DEMO)/exits-untuned --data default-dev --max-blocks 16

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
