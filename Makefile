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
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,bench,eval]"
	touch $@

# Convert the embedded default (SmolLM2-135M-Instruct) with `layer` exits after layers 10 and 20 (sharing
# the frozen LM head), show each exit's held-out cross-entropy and agreement with the final layer
# (BoolQ dev), tune the heads for ~3 minutes of CPU on BoolQ training passages with the default recipe
# (distillation from the final layer; the best heads of 3 validations kept) and fit their gates,
# show them again with their exit profile, then decode one prompt in full and with self-speculation
# (identical text).
DEMO_TUNE ?= --steps 60 --seq-len 128 --batch-size 4 --lr 6e-3 --warmup 5 --val-blocks 4 --eval-every 20 --gates \
	--gate-tokens 4096
DEMO_PROMPT ?= Explain in two sentences why the sky is blue.
demo: setup
	$(EETUNE) convert --model smollm2-135m --exits 10,20 --arch layer --output-embedding shared --out $(DEMO)/exits-untuned
	@echo "== before tuning =="
	$(EETUNE) evaluate $(DEMO)/exits-untuned --data default-dev --max-blocks 8 --seq-len 256 --no-store
	rm -rf $(DEMO)/exits-tuned.train
	$(EETUNE) tune $(DEMO)/exits-untuned --data default --out $(DEMO)/exits-tuned $(DEMO_TUNE)
	@echo "== after tuning =="
	$(EETUNE) evaluate $(DEMO)/exits-tuned --data default-dev --max-blocks 8 --seq-len 256
	@echo "== decoding: full, then self-speculative (lossless: the same text) =="
	$(EETUNE) generate $(DEMO)/exits-tuned --chat --prompt "$(DEMO_PROMPT)" --mode full --max-new-tokens 48
	$(EETUNE) generate $(DEMO)/exits-tuned --chat --prompt "$(DEMO_PROMPT)" --mode self-spec --draft-exit auto \
		--draft-vocab 4096 --threshold 0.3 --max-new-tokens 48 --verbose

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
