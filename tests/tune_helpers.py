"""Shared set-up for the tuning tests: a tiny Llama saved with a word-level tokenizer, a folder
of small documents over its vocabulary, and converted exits directories."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)}
    vocab["[EOS]"] = 96
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[EOS]")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} [EOS] {% endfor %}")
    tok.save_pretrained(path)


def make_docs(path: Path, n: int = 40, seed: int = 0) -> Path:
    """Documents with learnable structure: arithmetic word sequences."""
    r = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for d in range(n):
        a, step = r.randrange(96), r.choice([1, 3, 5])
        words = [f"w{(a + step * i) % 96}" for i in range(r.randrange(50, 150))]
        (path / f"{d:03d}.txt").write_text(" ".join(words))
    return path


def make_world(root: Path) -> dict:
    """A tiny model directory (with tokenizer), documents, and mlp / norm exits after layers 1 and 3."""
    from eetune.cli import main

    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer(model_dir)
    docs = make_docs(root / "docs")
    world = {"model": model_dir, "docs": docs}
    for arch in ("mlp", "norm"):
        out = root / f"exits-{arch}"
        assert main(["convert", "--model", str(model_dir), "--exits", "1,3", "--arch", arch, "--out", str(out)]) == 0
        world[arch] = out
    return world


def run_cli(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eetune.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, **kw)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and alike in every process) on one thread. Import it into a test
    module to apply it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def head_tensors(path):
    """The head tensors of an exits directory (not its gates or ranked vocabulary)."""
    return {k: v for k, v in load_file(str(path / "exit_heads.safetensors")).items()
            if not (k.startswith("gate.") or k == "vocab_by_frequency")}
