"""Partial loading (issue 12): `load_backbone(..., up_to_layer=k)` reads only the tensors the exits
need, the rest of the model stays on the meta device; exit logits equal a full load's."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from conftest import FAMILIES, L, tiny_model
from eetune.model.backbone import ReleasedLayer, fingerprint, load_backbone
from eetune.errors import EETuneError
from eetune.model.early_exit import EarlyExitModel

from tune_helpers import make_world, one_thread  # noqa: F401 (autouse fixture)
from tune_helpers import head_tensors as heads


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("partial")
    out = {}
    for fam in FAMILIES:
        tiny_model(fam, seed=1).save_pretrained(root / fam)
        out[fam] = root / fam
    return out


def _reads(monkeypatch):
    """Record every tensor name read through safetensors' safe_open."""
    seen = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            seen.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_partial_load_gives_the_exit_logits_of_a_full_load(model_dirs, family, monkeypatch):
    full = load_backbone(str(model_dirs[family]))
    seen = _reads(monkeypatch)
    part = load_backbone(str(model_dirs[family]), up_to_layer=2)
    # only layers 1..2 (0-based 0, 1) were read; 3 and 4 never left the meta device
    assert seen and not any(f".{i}." in n for n in seen for i in (2, 3) if ".h." in n or ".layers." in n)
    assert [part.is_loaded(i) for i in range(L)] == [True, True, False, False]
    assert isinstance(part.layers[3], ReleasedLayer)
    assert not any(p.device.type == "meta" for p in part.model.parameters())
    layer_params = sum(p.numel() for p in full.layers[3].parameters())
    assert sum(p.numel() for p in part.model.parameters()) == \
        sum(p.numel() for p in full.model.parameters()) - 2 * layer_params
    for arch in ("norm", "mlp"):
        torch.manual_seed(0)
        a = EarlyExitModel.convert(full, (1, 2), arch=arch)
        b = EarlyExitModel.convert(part, (1, 2), arch=arch)
        b.heads.load_state_dict(a.heads.state_dict())
        ids = torch.randint(0, 90, (2, 9))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding
        oa, ob = a(ids, attention_mask=mask), b(ids, attention_mask=mask)
        for k in (1, 2):
            assert torch.equal(oa.exit_logits[k], ob.exit_logits[k]), (family, arch, k)
    assert fingerprint(full.model, layers=2) == fingerprint(part.model, layers=2)
    assert fingerprint(full.model, layers=2) != fingerprint(full.model, layers=3)
    with pytest.raises(EETuneError, match="not loaded"):
        b(ids, final=True)
    # a missing layer read from disk on demand is the layer of the full load
    assert all(torch.equal(x, y) for x, y in zip(part.layer_module(3).state_dict().values(),
                                                 full.layers[3].state_dict().values()))


@pytest.mark.parametrize("bad", [-1, L + 1, 2.0, True])
def test_up_to_layer_outside_the_model_is_one_line(model_dirs, bad):
    with pytest.raises(EETuneError, match="outside the model") as e:
        load_backbone(str(model_dirs["llama"]), up_to_layer=bad)
    assert "\n" not in str(e.value)


def test_gpt2_checkpoint_names_without_the_base_prefix(model_dirs, tmp_path):
    """Hub GPT-2 checkpoints store `h.0.attn...` for the model's `transformer.h.0.attn...`."""
    import shutil
    src = model_dirs["gpt2"]
    dst = tmp_path / "gpt2-bare"
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    full, part = load_backbone(str(src)), load_backbone(str(dst), up_to_layer=1)
    assert fingerprint(full.model, layers=1) == fingerprint(part.model, layers=1)


def test_convert_reads_only_what_the_exits_need_and_records_the_coverage(model_dirs, tmp_path, monkeypatch):
    from eetune.cli import main

    seen = _reads(monkeypatch)
    out = tmp_path / "exits"
    assert main(["convert", "--model", str(model_dirs["llama"]), "--exits", "1,2", "--arch", "mlp",
                 "--out", str(out)]) == 0
    assert not [n for n in seen if n.startswith(("model.layers.2.", "model.layers.3."))]
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["fingerprint_layers"] == 2
    # A `layer` exit copies the last layer: convert reads it too, and the copy is the full load's.
    seen.clear()
    out2 = tmp_path / "exits-layer"
    assert main(["convert", "--model", str(model_dirs["llama"]), "--exits", "1", "--arch", "layer",
                 "--out", str(out2)]) == 0
    assert any(n.startswith("model.layers.3.") for n in seen) and not any(n.startswith("model.layers.2.")
                                                                          for n in seen)
    full = EarlyExitModel.convert(load_backbone(str(model_dirs["llama"])), (1,), arch="layer")
    got = heads(out2)
    assert all(torch.equal(got[k], v) for k, v in full.heads.state_dict().items())


def test_exits_load_partially_and_legacy_fingerprints_still_check(model_dirs, tmp_path):
    full_bb = load_backbone(str(model_dirs["llama"]))
    exits = EarlyExitModel.convert(full_bb, (1, 2), arch="norm")
    exits.save_pretrained(tmp_path / "new")
    m = EarlyExitModel.from_pretrained(tmp_path / "new", partial=True)
    assert m.backbone.released_count() == 2 and m.released_from == 2
    # exits written before partial loading: a fingerprint over every layer, no coverage recorded
    legacy = json.loads((tmp_path / "new" / "exit_config.json").read_text())
    legacy["backbone_fingerprint"], legacy["fingerprint_layers"] = fingerprint(full_bb.model), None
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "exit_config.json").write_text(json.dumps(legacy))
    (tmp_path / "legacy" / "exit_heads.safetensors").write_bytes((tmp_path / "new" / "exit_heads.safetensors")
                                                                  .read_bytes())
    m = EarlyExitModel.from_pretrained(tmp_path / "legacy", partial=True)
    assert m.backbone.released_count() == 0  # loaded whole, so the old fingerprint can be checked
    # a partially loaded backbone cannot vouch for layers it does not hold
    with pytest.raises(EETuneError, match="lacks layers"):
        EarlyExitModel.from_pretrained(tmp_path / "legacy",
                                       backbone=load_backbone(str(model_dirs["llama"]), up_to_layer=2))


def test_tune_with_the_lm_loss_loads_partially_and_matches_a_full_backbone(tmp_path):
    from eetune.train.tune import TuneConfig, tune

    world = make_world(tmp_path)
    cfg = TuneConfig(data=str(world["docs"]), seq_len=32, batch_size=4, lr=1e-2, distill=0.0, progress=False,
                     steps=3, val_blocks=2)
    s_part = tune(world["mlp"], tmp_path / "part", cfg)
    s_full = tune(world["mlp"], tmp_path / "full", cfg, backbone=load_backbone(str(world["model"])))
    assert s_part["trunk_layers_held"] == 3 and s_full["trunk_layers_held"] == L
    assert s_part["trunk_layers_loaded"] == 3 and s_full["trunk_layers_loaded"] == L
    s_kd = tune(world["mlp"], tmp_path / "kd", TuneConfig(**{**cfg.__dict__, "distill": 1.0}))
    assert s_kd["trunk_layers_loaded"] == L  # distillation needs the final layer: a whole load
    # the final layer's held-out top-1 streamed through the layers partial loading left out
    assert s_part["val_agreement"] == s_full["val_agreement"]
    a, b = heads(tmp_path / "part"), heads(tmp_path / "full")
    assert all(torch.equal(a[k], b[k]) for k in a)
