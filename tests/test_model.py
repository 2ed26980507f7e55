"""EarlyExitModel: heads, freezing, the exits directory (save/load/fingerprint), ExitConfig."""

import json
import warnings

import pytest
import torch

from eetune.decode import generate
from eetune.model.config import ExitConfig, parse_exit_layers
from eetune.errors import EETuneError
from eetune.model.early_exit import EarlyExitModel

from conftest import L, V, tiny_backbone


@pytest.mark.parametrize("arch", ["embedding", "norm", "mlp", "layer"])
@pytest.mark.parametrize("output_embedding", ["copy", "shared"])
def test_save_load_reproduces_logits_bit_for_bit(tmp_path, family, arch, output_embedding):
    bb = tiny_backbone(family)
    if arch == "embedding" and output_embedding == "shared":  # nothing to train: refused (see test_cli)
        with pytest.raises(EETuneError, match="no trainable parameters"):
            EarlyExitModel.convert(bb, [1, 3], arch=arch, output_embedding=output_embedding)
        return
    model = EarlyExitModel.convert(bb, [1, 3], arch=arch, init="random", output_embedding=output_embedding)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(ids).exit_logits
    model.save_pretrained(tmp_path / "exits")
    assert sorted(p.name for p in (tmp_path / "exits").iterdir()) == ["exit_config.json", "exit_heads.safetensors"]
    loaded = EarlyExitModel.from_pretrained(tmp_path / "exits", backbone=tiny_backbone(family))
    after = loaded(ids).exit_logits
    for k in (1, 3):
        assert torch.equal(before[k], after[k])


def test_shared_output_embedding_is_not_trainable_nor_saved(tmp_path):
    bb = tiny_backbone("llama")
    shared = EarlyExitModel.convert(bb, [2], arch="norm", output_embedding="shared")
    own = EarlyExitModel.convert(bb, [2], arch="norm", output_embedding="copy")
    assert shared.parameter_counts()["trainable"] == bb.hidden_size
    assert own.parameter_counts()["trainable"] == bb.hidden_size + V * bb.hidden_size
    shared.save_pretrained(tmp_path / "s")
    from safetensors.torch import load_file
    assert list(load_file(tmp_path / "s" / "exit_heads.safetensors")) == ["0.norm.weight"]


def test_backbone_is_frozen_and_only_heads_train():
    bb = tiny_backbone("gemma2")
    model = EarlyExitModel.convert(bb, [1, 2], arch="mlp")
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert {id(p) for p in model.parameters()}.isdisjoint({id(p) for p in bb.model.parameters()})
    model.train()
    assert not bb.model.training
    out = model(torch.randint(0, V, (1, 6)))
    sum(v.sum() for v in out.exit_logits.values()).backward()
    assert all(p.grad is None for p in bb.model.parameters())
    assert all(p.grad is not None for p in model.parameters())


def test_random_init_differs_from_copy_and_norms_start_at_identity():
    for family, identity in (("llama", 1.0), ("gemma", 0.0)):
        bb = tiny_backbone(family)
        m = EarlyExitModel.convert(bb, [2], arch="mlp", init="random")
        head = m.heads[0]
        assert torch.all(head.norm.weight == identity)
        assert not torch.equal(head.out.weight, bb.lm_head.weight)
        assert abs(head.out.weight.std().item() - 0.02) < 0.005
        c = EarlyExitModel.convert(bb, [2], arch="mlp", init="copy").heads[0]
        assert torch.equal(c.out.weight, bb.lm_head.weight)
        assert torch.equal(c.mlp[1].up_proj.weight, bb.layers[1].mlp.up_proj.weight)


def test_mismatched_backbone_is_refused(tmp_path):
    EarlyExitModel.convert(tiny_backbone("llama", seed=0), [2]).save_pretrained(tmp_path / "e")
    with pytest.raises(EETuneError, match="do not match"):
        EarlyExitModel.from_pretrained(tmp_path / "e", backbone=tiny_backbone("llama", seed=1))


def test_save_refuses_foreign_directory_and_replaces_exits_dir(tmp_path):
    model = EarlyExitModel.convert(tiny_backbone("llama"), [2])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(EETuneError, match="not an exits directory"):
        model.save_pretrained(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    model.save_pretrained(tmp_path / "e")
    model.save_pretrained(tmp_path / "e")  # replacing an exits directory is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "foreign"]  # no temporary left behind


def test_config_json_round_trip_and_unknown_keys(tmp_path):
    model = EarlyExitModel.convert(tiny_backbone("qwen2"), [1, 4], arch="layer", output_embedding="shared")
    model.save_pretrained(tmp_path / "e")
    text = (tmp_path / "e" / "exit_config.json").read_text()
    data = json.loads(text)
    assert list(data) == sorted(data) and text.startswith("{\n  ")
    assert data["exit_layers"] == [1, 4] and data["arch"] == "layer" and data["output_embedding"] == "shared"
    assert data["backbone_fingerprint"].startswith("sha256:") and data["model_type"] == "qwen2"
    assert ExitConfig.from_dict(data) == model.config
    data["from_the_future"] = 1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert ExitConfig.from_dict(data) == model.config
    assert any("from_the_future" in str(x.message) for x in w)


@pytest.mark.parametrize("spec,expected", [("10,20", (10, 20)), ("20,10", (10, 20)), ("0.33,0.67", (10, 20)),
                                           ("1.0", (30,)), (" 5 ", (5,))])
def test_parse_exit_layers(spec, expected):
    assert parse_exit_layers(spec, 30) == expected


@pytest.mark.parametrize("spec,msg", [("0", "invalid"), ("31", "beyond the model's depth"), ("10,10", "duplicate"),
                                      ("0.5,15", "duplicate"), ("1.5", "outside"), ("x", "cannot read"), ("", "no exit")])
def test_bad_exit_layers(spec, msg):
    with pytest.raises(EETuneError, match=msg):
        ExitConfig(exit_layers=parse_exit_layers(spec, 30), num_layers=30)


def test_bad_config_values():
    with pytest.raises(EETuneError, match="unknown exit architecture"):
        ExitConfig(exit_layers=(1,), num_layers=L, arch="attention")
    with pytest.raises(EETuneError, match="unknown init"):
        ExitConfig(exit_layers=(1,), num_layers=L, init="zeros")


# --- train/eval mode of the heads (dropout) -----------------------------------------------------
def _record_head_dropout(model):
    """Forward hooks on the Dropout modules of the heads: the `training` flag each ran with."""
    seen = []
    drops = [m for m in model.heads.modules() if isinstance(m, torch.nn.Dropout)]
    for m in drops:
        m.register_forward_hook(lambda mod, args, out: seen.append(mod.training))
    return drops, seen


@pytest.mark.parametrize("arch", ["layer", "mlp"])
def test_models_start_in_eval_mode_and_generate_runs_the_heads_in_eval_mode(tmp_path, gpt2_dropout_backbone, arch):
    """Regression: `generate` never put the heads in eval mode, so heads with dropout (a GPT-2
    `layer` or `mlp` exit) decoded with it on after `model.train()`; and a converted or loaded
    model started in train mode. Now both start in eval mode, `generate` decodes in eval mode
    and the caller's mode is put back afterwards, module by module."""
    bb = gpt2_dropout_backbone
    model = EarlyExitModel.convert(bb, [1, 3], arch=arch)
    assert not any(m.training for m in model.modules()) and not bb.model.training
    model.save_pretrained(tmp_path / "e")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "e", backbone=bb)
    assert not any(m.training for m in loaded.modules())
    drops, seen = _record_head_dropout(model)
    assert drops and all(m.p == 0.1 for m in drops)
    reference = generate(model, [[1, 2, 3]], mode="early-exit", threshold=0.0, max_new_tokens=4).rows[0].ids
    assert seen and not any(seen)
    model.train()
    seen.clear()
    out = generate(model, [[1, 2, 3]], mode="early-exit", threshold=0.0, max_new_tokens=4)
    assert seen and not any(seen), "the heads decoded in train mode (dropout on)"
    assert out.rows[0].ids == reference
    assert all(m.training for m in model.modules()) and not bb.model.training  # the caller's mode, put back
    # a model whose parts were in different modes gets exactly those back
    model.heads[0].eval()
    generate(model, [[1, 2, 3]], mode="early-exit", threshold=0.0, max_new_tokens=2)
    assert [m.training for m in model.heads[0].modules()] == [False] * len(list(model.heads[0].modules()))
    assert all(m.training for m in model.heads[1].modules())
