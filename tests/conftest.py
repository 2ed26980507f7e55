"""Shared fixtures: tiny randomly initialised models of every supported family, built from
configs (no weights, no network)."""

import os

# One intra-op thread in this process and in every process a test starts (set before torch is
# imported: torch and its OpenMP pool read it then; subprocesses inherit it). The tiny models run
# fastest on one thread, and on a shared 2-core machine a second OpenMP thread that busy-waits for a
# descheduled one makes torch several times slower (test_decode.py: 65 s on one thread, 450 s on two).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, GPT2Config,
                          LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)

from eetune.model.backbone import adapter_for

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch first

V, H, L = 97, 32, 4
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(**COMMON)
    if family == "mistral":
        return MistralConfig(**COMMON, sliding_window=6)
    if family == "qwen2":
        return Qwen2Config(**COMMON)
    if family == "qwen3":
        return Qwen3Config(**COMMON, head_dim=8)
    if family == "gemma":
        return GemmaConfig(**COMMON, head_dim=8)
    if family == "gemma2":
        return Gemma2Config(**COMMON, head_dim=8, sliding_window=6, attn_implementation="eager")
    if family == "gemma3":
        return Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=6, sliding_window_pattern=2)
    if family == "gpt2":
        return GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=256, initializer_range=0.1,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2"]


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_backbone(family: str, seed: int = 0):
    bb = adapter_for(tiny_model(family, seed))
    bb.source, bb.revision, bb.model_path = f"tiny-{family}", None, None
    return bb


def tiny_gpt2_with_dropout(seed: int = 0):
    """A tiny GPT-2 that keeps GPT-2's default dropout (resid/embd/attn pdrop 0.1), which
    `tiny_config("gpt2")` sets to 0: heads copied from it (a `layer` exit copies a block, an
    `mlp` exit its MLP) have dropout, so their train/eval mode shows in what they compute."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=256, initializer_range=0.1,
                        bos_token_id=0, eos_token_id=0)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def gpt2_dropout_backbone():
    """The backbone of `tiny_gpt2_with_dropout` (frozen, eval mode)."""
    bb = adapter_for(tiny_gpt2_with_dropout())
    bb.source, bb.revision, bb.model_path = "tiny-gpt2-dropout", None, None
    return bb


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama saved as a Hugging Face directory (what `--model DIR` takes)."""
    model = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    return path


def peaky_backbone(family: str, seed: int = 0, scale: float = 6.0):
    """A tiny backbone whose LM head is scaled up so that its (and its copied exits')
    distributions are peaked: confident early exits and accepted drafts actually happen."""
    bb = tiny_backbone(family, seed)
    with torch.no_grad():
        bb.lm_head.weight.mul_(scale)
    return bb


def word_tokenizer(vocab_size: int = V):
    """A word-level tokenizer over the tiny vocabulary: 'w0' .. 'w95' and '[EOS]' = 96."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["[EOS]"] = vocab_size - 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[EOS]", pad_token="w0")


def save_peaky_model_dir(path):
    """A tiny Llama with a peaked LM head (confident tokens exist) saved as a Hugging Face
    directory with the word-level tokenizer; returns `path`."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def make_peaky_exits(root):
    """`save_peaky_model_dir` converted to `norm` exits after layers 1 and 3, with a plain text
    file of 600 words: (model dir, exits dir, text file)."""
    from eetune.cli import main

    src = save_peaky_model_dir(root / "tiny")
    out = root / "exits"
    assert main(["convert", "--model", str(src), "--exits", "1,3", "--arch", "norm", "--out", str(out)]) == 0
    text = root / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 96}" for i in range(600)))
    return src, out, text
