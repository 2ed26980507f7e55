"""`eetune plan`: parameter counts equal what eetune builds, the predicted peak of a tiny tune run
matches its measured peak RSS (chunked exit losses and whole logits), Llama-2 shapes plan as
published, and bad input gives one line with exit code 2."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import tiny_backbone, tiny_config
from eetune.cli import main
from eetune.errors import EETuneError
from eetune.model.early_exit import EarlyExitModel
from eetune.measure.plan import GIB, MIB, SMOLLM2_135M, format_plan, model_shape, plan, plan_memory, read_config

LLAMA2 = {  # the published shapes of Llama 2 (config.json of meta-llama/Llama-2-*-hf), and their sizes
    "7b": ({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}, 6_738_415_616),
    "13b": ({"model_type": "llama", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
             "num_key_value_heads": 40, "intermediate_size": 13824, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}, 13_015_864_320),
    "70b": ({"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}, 68_976_648_192),
}


def write_config(path, config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


# --- (a) counts equal what eetune builds ------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("arch", ["embedding", "norm", "mlp", "layer"])
@pytest.mark.parametrize("emb", ["copy", "shared"])
def test_counts_match_convert(family, arch, emb):
    if arch == "embedding" and emb == "shared":
        with pytest.raises(EETuneError, match="no trainable parameters"):
            model_shape(tiny_config(family).to_dict(), (1, 3), arch, emb)
        return
    shape = model_shape(tiny_config(family).to_dict(), (1, 3), arch, emb)
    bb = tiny_backbone(family)
    model = EarlyExitModel.convert(bb, (1, 3), arch=arch, output_embedding=emb)
    counts = model.parameter_counts()
    assert shape.backbone_params == counts["frozen_backbone"]
    assert shape.head_params == counts["per_exit"]
    assert shape.head_total == counts["trainable"]
    assert shape.layer_params == tuple(sum(p.numel() for p in layer.parameters()) for layer in bb.layers)
    assert shape.tied == (bb.lm_head.weight is bb.model.get_input_embeddings().weight)
    assert shape.head_largest == max(p.numel() for p in model.heads.parameters())


def test_default_model_config_is_the_known_shape(tmp_path, monkeypatch):
    """'smollm2-135m' reads the cached converted config, or (nothing cached) the embedded shape; both
    describe SmolLM2-135M's 134,515,008 parameters. Nothing is downloaded."""
    monkeypatch.setenv("EETUNE_CACHE", str(tmp_path / "empty-cache"))
    config, _ = read_config("smollm2-135m")
    assert config == SMOLLM2_135M
    assert model_shape(config, (10, 20)).backbone_params == 134_515_008
    monkeypatch.delenv("EETUNE_CACHE")
    cached, _ = read_config("smollm2-135m")
    assert model_shape(cached, (10, 20)).backbone_params == 134_515_008
    assert not (tmp_path / "empty-cache").exists()


# --- (b) predicted peak vs a measured tune run ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tune_setup(tmp_path_factory):
    """A tiny random Llama whose vocabulary-sized buffers are tens of MiB (hidden 384, vocab
    40000: a 256-token chunk's fp32 buffer is 39 MiB, above the 32 MiB from which glibc always
    maps large allocations, so freed buffers leave the RSS as they would a GPU's allocated bytes),
    its documents and a norm exit after layer 2."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tune_helpers import make_docs, make_tokenizer

    tmp_path = tmp_path_factory.mktemp("plan-tiny")
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=40000, hidden_size=384, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512)).save_pretrained(model_dir)
    make_tokenizer(model_dir)
    docs = make_docs(tmp_path / "docs")
    exits = tmp_path / "exits"
    assert main(["convert", "--model", str(model_dir), "--exits", "2", "--arch", "norm", "--out", str(exits)]) == 0
    return tmp_path, model_dir, docs, exits


@pytest.mark.parametrize("chunk", [256, 0], ids=["chunked", "whole-logits"])
def test_predicted_peak_matches_measured_tune(tiny_tune_setup, chunk):
    """Peak RSS of a tune run (batch 4 x 128, --distill 0) above the process's baseline after
    imports, in a fresh process, within 15% of the plan (steady state: the load of this small
    model peaks lower), with the default chunked exit losses and with whole logits. The process
    is forked from a server that did the imports once (tests/forked.py: `forked.tune_peak_rss`
    measures after its own imports and warm-up, as a `python -c` process would; the peaks agree
    within 2%)."""
    import forked

    tmp_path, model_dir, docs, exits = tiny_tune_setup
    settings = {"docs": str(docs), "exits": str(exits), "out": str(tmp_path / f"out-{chunk}"), "batch": 4,
                "seq": 128, "distill": 0.0, "chunk": chunk}
    result = tmp_path / f"peak-{chunk}.json"
    assert forked.run(forked.tune_peak_rss, settings, str(result), timeout=180) == 0
    got = json.loads(result.read_text())
    assert "peak" in got, got.get("error")
    measured = got["peak"]
    predicted = plan(str(model_dir), "2", distill=0.0, batch_size=4, seq_len=128, loss_chunk=chunk)
    assert predicted.loss_chunk == chunk and predicted.activation_peak_phase == "loss"
    assert predicted.load_peak_bytes < predicted.peak_bytes  # the step, not the load, is what is compared
    assert abs(predicted.peak_bytes - measured) / measured < 0.15, (predicted.peak_bytes, measured,
                                                                    predicted.parts)
    # what the loss phase holds (vocabulary-sized buffers, and the chunked path's saved weight
    # gradient) is a large share of it, so the comparison tests them
    loss = predicted.activation_phases["loss"]
    assert loss > 0.3 * measured
    V, H = 40000, 384
    if chunk:  # three fp32 256 x V chunk buffers, the exit's weight gradient (accumulated in place), little else
        assert 3 * 256 * V * 4 + V * H * 4 < loss < 3 * 256 * V * 4 + V * H * 4 + 8 * MIB
    else:  # the exit's logits, their shifted copy and their log-softmax: (4, 128, V) each, and little else
        assert 3 * 4 * 128 * V * 4 - 4 * V * 4 * 2 < loss < 3 * 4 * 128 * V * 4 + 8 * MIB


def test_loss_chunk_against_whole_logits():
    """Chunking replaces the (tokens x vocab) buffers by a chunk's: at the default batch the
    loss needs a fraction of the whole-logit path's memory, the more so with distillation; the
    chunk size is bounded by the tokens of a batch; a negative chunk is refused."""
    shape = model_shape(SMOLLM2_135M, (10, 20), "norm", "shared")
    for alpha in (0.0, 1.0):
        whole = plan_memory(shape, distill=alpha, batch_size=8, seq_len=512, loss_chunk=0)
        chunked = plan_memory(shape, distill=alpha, batch_size=8, seq_len=512)
        assert chunked.loss_chunk == 256 and whole.loss_chunk == 0
        assert chunked.parts["activations"] < whole.parts["activations"] / 5
        assert chunked.peak_bytes < whole.peak_bytes
    V = 49152
    a = plan_memory(shape, distill=0.0, batch_size=8, seq_len=512)
    b = plan_memory(shape, distill=0.0, batch_size=8, seq_len=512, loss_chunk=512)
    assert b.activation_phases["loss"] - a.activation_phases["loss"] == 3 * 256 * V * 4  # three chunk buffers
    big = plan_memory(shape, distill=0.0, batch_size=1, seq_len=64, loss_chunk=10 ** 6)
    assert big.activation_phases == plan_memory(shape, distill=0.0, batch_size=1, seq_len=64,
                                                loss_chunk=63).activation_phases  # one chunk holds every token
    d1 = plan_memory(shape, distill=1.0, batch_size=8, seq_len=512)
    assert d1.activation_phases["loss"] > a.activation_phases["loss"] + 5 * 256 * V * 4  # eight buffers, not three
    with pytest.raises(EETuneError, match="--loss-chunk"):
        plan_memory(shape, distill=0.0, loss_chunk=-1)


# --- (c) Llama 2 shapes -----------------------------------------------------------------------
@pytest.mark.parametrize("size", list(LLAMA2))
def test_llama2_parameter_counts(size):
    config, published = LLAMA2[size]
    shape = model_shape(config, (config["num_hidden_layers"] // 4,), "norm", "copy")
    assert shape.backbone_params == published
    H, V = config["hidden_size"], config["vocab_size"]
    assert shape.head_total == V * H + H  # an own output embedding and a copy of the final norm


def test_llama2_70b_one_exit_four_ranks_bf16(tmp_path):
    config, _ = LLAMA2["70b"]
    model = write_config(tmp_path / "llama-2-70b", config)
    p = plan(str(model), "20", dtype="bf16", distill=0.0, ranks=4, mem_per_rank_gib=80)
    shape = model_shape(config, (20,))
    layers_all = sum(shape.layer_params)
    H, V = 8192, 32000
    assert p.trunk_layers == 20
    assert p.parameters["trunk_layers_held"] == layers_all * 20 // 80  # every layer the same size
    assert p.parts["trunk layers"] == math.ceil(layers_all * 20 / 80 / 4) * 2  # sharded over 4 ranks, bf16
    assert p.parameters["embeddings"] == V * H and p.parameters["lm_head"] == V * H
    assert p.parts["embeddings, final norm, LM head"] == (2 * V * H + H) * 2 + shape.buffer_bytes  # replicated
    heads = V * H + H
    assert p.parts["head parameters"] == math.ceil(heads / 4) * 4
    assert p.parts["AdamW moments"] == 2 * math.ceil(heads / 4) * 4
    assert p.peak_bytes == sum(p.parts.values())
    assert p.fits and p.min_ranks == 1  # 20 layers of 70B in bf16 (32 GiB) fit one 80 GiB GPU
    # chunked exit losses (tune's default): the peak is in the loss, whose largest buffers are not the chunks
    # (256 x 32000 fp32, 31 MiB) but the exit's own output-weight gradient, saved for backward, and the product
    # each chunk adds into it: 2 x 32000 x 8192 fp32 (gathered under FSDP), plus the (tokens x hidden) rows
    assert p.loss_chunk == 256 and p.activation_peak_phase == "loss"
    assert 2 * V * H * 4 < p.activation_phases["loss"] < 2 * V * H * 4 + 1.5 * GIB
    # partial loading reads layers 1-20 only (the paper's 70B-on-4-GPUs setup): the load fits too
    assert p.load_peak_bytes == (layers_all * 20 // 80 + 2 * V * H + H) * 2 + shape.buffer_bytes + heads * (2 + 4) \
        + V * H * 4 and p.load_fits
    # distillation (tune's default) holds the whole trunk: 4x the layer bytes
    q = plan(str(model), "20", dtype="bf16", ranks=4)
    assert q.distill == 1.0 and q.trunk_layers == 80
    assert q.parts["trunk layers"] == math.ceil(layers_all / 4) * 2
    assert q.parts["activations"] > p.parts["activations"]
    assert q.load_peak_bytes > 128 * GIB  # and loads the whole model


def test_ranks_suggestion_is_the_smallest_that_fits(tmp_path):
    config, _ = LLAMA2["13b"]
    model = write_config(tmp_path / "llama-2-13b", config)
    p = plan(str(model), "40", dtype="bf16", distill=1.0, batch_size=1, seq_len=512, mem_per_rank_gib=12)
    assert not p.fits and p.min_ranks > 2  # the whole 13B trunk in bf16 is 24 GiB

    def peak(n):
        return plan(str(model), "40", dtype="bf16", distill=1.0, batch_size=1, seq_len=512, ranks=n).peak_bytes
    assert peak(p.min_ranks) <= 12 * GIB < peak(p.min_ranks - 1)
    assert plan(str(model), "40", dtype="bf16", distill=1.0, batch_size=1, seq_len=512, ranks=p.min_ranks,
                mem_per_rank_gib=12).fits


def test_decode_kv_cache(tmp_path):
    config, _ = LLAMA2["7b"]
    model = write_config(tmp_path / "llama-2-7b", config)
    p = plan(str(model), "8,16", mode="decode", dtype="bf16", batch_size=2, prompt_len=1000, max_new_tokens=200)
    slots = 1280  # prompt + new + self-spec slack = 1212, + 64 (padded block) rounded up to a multiple of 256
    assert p.parts["KV cache"] == 32 * 2 * 2 * slots * 32 * 128 * 2
    assert p.trunk_layers == 32 and p.parts["head gradients"] == 0 and p.parts["AdamW moments"] == 0
    assert p.parts["head parameters"] == 2 * (32000 * 4096 + 4096) * 2  # heads in the backbone dtype
    layer = plan(str(model), "8,16", mode="decode", arch="layer", batch_size=2, prompt_len=1000, max_new_tokens=200)
    assert layer.parts["KV cache"] == 34 * 2 * 2 * slots * 32 * 128 * 4  # a `layer` exit has its own cache


def test_cli_text_and_json(tmp_path, capsys):
    model = write_config(tmp_path / "llama-2-70b", LLAMA2["70b"][0])
    assert main(["plan", str(model), "--exits", "20", "--ranks", "4", "--dtype", "bf16", "--distill", "0",
                 "--mem-per-rank", "80"]) == 0
    out = capsys.readouterr().out
    assert "trunk: layers 1-20 of 80 (bf16, 1/4 each)" in out and "fits in 80.00 GiB per rank" in out
    assert "loss chunk 256" in out and "peak phase: loss" in out
    assert main(["plan", str(model / "config.json"), "--exits", "0.25", "--json"]) == 0  # the file itself too
    d = json.loads(capsys.readouterr().out)
    assert d["exit_layers"] == [20] and d["peak_bytes"] == sum(d["parts"].values()) and d["fits"] is None
    assert d["loss_chunk"] == 256
    assert main(["plan", str(model), "--exits", "20", "--loss-chunk", "0", "--json"]) == 0  # whole logits
    whole = json.loads(capsys.readouterr().out)
    assert whole["loss_chunk"] == 0 and whole["activation_phases"] != d["activation_phases"]


# --- (d) bad input: one line, exit code 2 -----------------------------------------------------
def bad_cases(tmp_path):
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "config.json").write_text("{not json")
    write_config(tmp_path / "list", [1, 2])
    no_hidden = dict(LLAMA2["7b"][0])
    del no_hidden["hidden_size"]
    write_config(tmp_path / "nohidden", no_hidden)
    write_config(tmp_path / "bert", {"model_type": "bert", "hidden_size": 8})
    write_config(tmp_path / "untyped", {"hidden_size": 8})
    write_config(tmp_path / "zero", {**LLAMA2["7b"][0], "num_hidden_layers": 0})
    seven = write_config(tmp_path / "seven", LLAMA2["7b"][0])
    return [
        ([str(tmp_path / "missing"), "--exits", "2"], "not found"),
        ([str(tmp_path / "empty-dir-x.gguf"), "--exits", "2"], ".gguf"),
        ([str(tmp_path / "notjson"), "--exits", "2"], "not valid JSON"),
        ([str(tmp_path / "list"), "--exits", "2"], "not a model config"),
        ([str(tmp_path / "nohidden"), "--exits", "2"], "lacks hidden_size"),
        ([str(tmp_path / "bert"), "--exits", "2"], "unsupported architecture"),
        ([str(tmp_path / "untyped"), "--exits", "2"], "no model_type"),
        ([str(tmp_path / "zero"), "--exits", "2"], "not a positive integer"),
        ([str(seven), "--exits", "40"], "beyond the model's depth"),
        ([str(seven), "--exits", "2", "--mode", "decode", "--ranks", "2"], "one process"),
        ([str(seven), "--exits", "2", "--distill", "2"], "outside [0, 1]"),
        ([str(seven), "--exits", "2", "--mem-per-rank", "nan"], "positive number of GiB"),
        ([str(seven), "--exits", "2", "--batch-size", "0"], "at least 1"),
        ([str(seven), "--exits", "2", "--loss-chunk", "-1"], "--loss-chunk -1"),
        ([str(seven), "--exits", "2", "--mem-per-rank", "1"], "any number of ranks"),
        ([str(seven), "--exits", "2", "--mode", "decode", "--mem-per-rank", "1"], "one process"),
        ([str(seven), "--exits", "2", "--arch", "embedding", "--output-embedding", "shared"],
         "no trainable parameters"),
    ]


def test_bad_input_one_line_exit_2(tmp_path, capsys):
    for args, needle in bad_cases(tmp_path):
        assert main(["plan", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("eetune: error: ") and err.count("\n") == 1 and needle in err, (args, err)


def test_bad_input_from_the_console(tmp_path):
    p = subprocess.run([sys.executable, "-m", "eetune.cli", "plan", str(tmp_path / "nowhere"), "--exits", "2"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("eetune: error: model config not found") and p.stderr.count("\n") == 1


def test_plan_memory_is_pure_arithmetic():
    """The same shape planned twice gives the same plan; more batch or sequence never needs less."""
    shape = model_shape(LLAMA2["7b"][0], (8, 16), "mlp", "shared")
    a = plan_memory(shape, distill=0.0, batch_size=2, seq_len=256)
    assert a == plan_memory(shape, distill=0.0, batch_size=2, seq_len=256)
    assert plan_memory(shape, distill=0.0, batch_size=4, seq_len=256).peak_bytes > a.peak_bytes
    assert plan_memory(shape, distill=0.0, batch_size=2, seq_len=512).peak_bytes > a.peak_bytes
    assert plan_memory(shape, distill=1.0, batch_size=2, seq_len=256).peak_bytes > a.peak_bytes


# --- restricted-vocabulary heads (`--exit-vocab K`: K tokens + OTHER) ------------------------------
@pytest.mark.parametrize("arch", ["embedding", "norm", "mlp"])
@pytest.mark.parametrize("emb", ["copy", "shared"])
def test_restricted_counts_match_convert(arch, emb):
    import torch
    from conftest import V
    if arch == "embedding" and emb == "shared":
        return
    K = 30
    shape = model_shape(tiny_config("llama").to_dict(), (1, 3), arch, emb, exit_vocab=K)
    bb = tiny_backbone("llama")
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:K]
    model = EarlyExitModel.convert(bb, (1, 3), arch=arch, output_embedding=emb, exit_vocab_ids=ids)
    counts = model.parameter_counts()
    assert shape.head_params == counts["per_exit"] and shape.head_total == counts["trainable"]
    assert shape.head_largest == max(p.numel() for p in model.heads.parameters())
    assert shape.exit_classes == K + 1 == model.head(1).num_classes
    full = model_shape(tiny_config("llama").to_dict(), (1, 3), arch, emb)
    H = shape.hidden_size
    own = (V - K) * H if emb == "copy" else 0  # an own output embedding keeps K of its V rows
    assert {k: full.head_params[k] - own + H + 1 for k in (1, 3)} == shape.head_params  # + OTHER's row and bias
    # K = V: a permutation, no OTHER: the unrestricted counts
    assert model_shape(tiny_config("llama").to_dict(), (1, 3), arch, emb, exit_vocab=V).head_params == full.head_params


def test_plan_with_exit_vocab(tmp_path, capsys):
    d = write_config(tmp_path / "smol", SMOLLM2_135M)
    H, V = SMOLLM2_135M["hidden_size"], SMOLLM2_135M["vocab_size"]
    full = plan(str(d), "10,20", arch="norm", output_embedding="copy")
    k = plan(str(d), "10,20", arch="norm", output_embedding="copy", exit_vocab="4k")
    assert k.exit_vocab == 4096 and full.exit_vocab is None
    assert k.parameters["head_per_exit"] == {10: 4096 * H + H + 1 + H, 20: 4096 * H + H + 1 + H}  # rows, OTHER, norm
    assert k.parameters["exit_classes"] == 4097 and "exit_classes" not in full.parameters
    assert k.peak_bytes < full.peak_bytes and k.parts["head parameters"] < full.parts["head parameters"]
    assert any("4,096 tokens + OTHER" in n for n in k.notes)
    for chunk in (0, 256):  # every term is no larger than the unrestricted one's, with and without distillation
        for alpha in (0.0, 1.0):
            a = plan(str(d), "10,20", exit_vocab=512, loss_chunk=chunk, distill=alpha, batch_size=2, seq_len=64)
            b = plan(str(d), "10,20", loss_chunk=chunk, distill=alpha, batch_size=2, seq_len=64)
            assert all(a.parts[t] <= b.parts[t] for t in a.parts) and a.peak_bytes < b.peak_bytes
    same = plan(str(d), "10,20", exit_vocab=V)  # K = V: the same heads (its folded target aside)
    assert same.parameters["head_per_exit"] == full.parameters["head_per_exit"]
    assert "exit vocabulary 4,096 tokens" in format_plan(k) and k.to_dict()["exit_vocab"] == 4096
    for bad, match in (("0", "at least 1"), ("x", "not a number"), (str(V + 1), "larger than")):
        with pytest.raises(EETuneError, match=match):
            plan(str(d), "10,20", exit_vocab=bad)
