"""`ExitConfig`: what an exits directory says about its exits, and its JSON round trip.

Saved as `exit_config.json` (sorted keys, indented) beside `exit_heads.safetensors`. Keys this
version does not know (written by a newer eetune) are dropped with a warning, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from eetune.errors import EETuneError
from eetune.model.heads import ARCHS, INITS, OUTPUT_EMBEDDINGS

CONFIG_NAME = "exit_config.json"
WEIGHTS_NAME = "exit_heads.safetensors"


def _version() -> str:
    from eetune.version import __version__
    return __version__


@dataclass(frozen=True)
class ExitConfig:
    exit_layers: tuple[int, ...]  # 1-based: an exit "after layer k", ascending
    num_layers: int  # depth of the backbone the exits were made for
    arch: str = "norm"  # embedding | norm | mlp | layer (the paper's names)
    init: str = "copy"  # copy (from the backbone, the paper's default) | random
    output_embedding: str = "copy"  # copy: own trainable LM head per exit | shared: the frozen one
    exit_vocab: int | None = None  # restricted-vocabulary heads: K token ids + OTHER (None: the whole vocabulary);
    #                                the ids are in exit_heads.safetensors (each head's `vocab_ids`)
    exit_vocab_source: dict | None = None  # how the K ids were ranked: {"ranked_by": "data" | "generated" |
    #                                        "mixture", "data": the data description, "tokens": tokens counted}
    base_model: str = ""  # what load_backbone was given: alias, hub id or absolute path
    revision: str | None = None  # hub revision of the base model, if any
    model_type: str = ""  # HF model_type of the backbone (llama, gpt2, ...)
    backbone_fingerprint: str = ""  # backbone.fingerprint() of the weights the exits belong to
    fingerprint_layers: int | None = None  # the decoder layers (1..k) that fingerprint covers, beside the
    #                                        embeddings, final norm and LM head; None: every layer (before 0.x)
    eetune_version: str = field(default_factory=_version)
    training: dict | None = None  # summary written by `eetune tune` (tokens, time, losses, data)
    gates: dict | None = None  # summary written by `eetune tune --gates` (data, held-out precision/coverage)
    calibration: dict | None = None  # written by `eetune calibrate`: the exit threshold(s) meeting a target agreement
    #                                  with the full model, measured agreement and predicted speedup; `eetune
    #                                  generate` uses it when no --threshold is given (eetune.measure.calibrate)

    def __post_init__(self):
        object.__setattr__(self, "exit_layers", tuple(int(k) for k in self.exit_layers))
        self.validate()

    def validate(self) -> None:
        L = self.num_layers
        if not self.exit_layers:
            raise EETuneError("no exit layers given: pass e.g. --exits 10,20")
        for k in self.exit_layers:
            if k < 1:
                raise EETuneError(f"exit layer {k} is invalid: layers are numbered 1..{L} (an exit goes after layer k)")
            if k > L:
                raise EETuneError(f"exit layer {k} is beyond the model's depth: it has {L} layers, use 1..{L}")
        if len(set(self.exit_layers)) != len(self.exit_layers):
            raise EETuneError(f"duplicate exit layers in {list(self.exit_layers)}: give each layer once")
        if list(self.exit_layers) != sorted(self.exit_layers):
            raise EETuneError(f"exit layers {list(self.exit_layers)} are not ascending: list them in depth order")
        if self.arch not in ARCHS:
            raise EETuneError(f"unknown exit architecture {self.arch!r}: use one of {', '.join(ARCHS)}")
        fl = self.fingerprint_layers
        if fl is not None and (isinstance(fl, bool) or not isinstance(fl, int) or not 0 <= fl <= L):
            raise EETuneError(f"fingerprint_layers {fl!r} is not a layer count of a {L}-layer model")
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise EETuneError(f"calibration is a {type(self.calibration).__name__}, not an object: run `eetune "
                              f"calibrate` again or remove it from exit_config.json")
        ev = self.exit_vocab
        if ev is not None and (isinstance(ev, bool) or not isinstance(ev, int) or ev < 1):
            raise EETuneError(f"exit_vocab {ev!r} is not a token count: re-create the exits with --exit-vocab K")
        if self.exit_vocab_source is not None and not isinstance(self.exit_vocab_source, dict):
            raise EETuneError(f"exit_vocab_source is a {type(self.exit_vocab_source).__name__}, not an object: "
                              f"re-create the exits with --exit-vocab K")
        if self.init not in INITS:
            raise EETuneError(f"unknown init {self.init!r}: use one of {', '.join(INITS)}")
        if self.output_embedding not in OUTPUT_EMBEDDINGS:
            raise EETuneError(f"unknown output embedding {self.output_embedding!r}: use one of "
                              f"{', '.join(OUTPUT_EMBEDDINGS)}")

    def replace(self, **changes) -> "ExitConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exit_layers"] = list(self.exit_layers)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "ExitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"exit_config.json has keys this eetune version does not know, ignored: {unknown}",
                          stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, directory: str | Path) -> "ExitConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise EETuneError(f"{directory} is not an exits directory (no {CONFIG_NAME}): "
                              f"create one with `eetune convert`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EETuneError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): re-create it with "
                              f"`eetune convert`") from None
        if not isinstance(data, dict):
            raise EETuneError(f"{path} holds a JSON {type(data).__name__}, not an object: re-create it with "
                              f"`eetune convert`")
        try:
            return cls.from_dict(data)
        except TypeError as e:
            raise EETuneError(f"{path} is missing required fields or has fields of the wrong type ({e}): re-create "
                              f"it with `eetune convert`") from None
        except ValueError as e:
            raise EETuneError(f"{path} has a field of the wrong type or value ({e}): re-create it with "
                              f"`eetune convert`") from None


def parse_exit_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """`"10,20"` (1-based layers, "after layer k") or `"0.33,0.67"` (fractions of depth,
    rounded to the nearest layer) -> sorted tuple of layer numbers; validated by ExitConfig."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise EETuneError("no exit layers given: pass e.g. --exits 10,20 or --exits 0.33,0.67")
    layers = []
    for p in parts:
        try:
            if "." in p:
                frac = float(p)
                if not 0.0 < frac <= 1.0:
                    raise EETuneError(f"exit fraction {p} is outside (0, 1]: give fractions of depth such as 0.33")
                layers.append(max(1, round(frac * num_layers)))
            else:
                layers.append(int(p))
        except ValueError:
            raise EETuneError(f"cannot read exit layer {p!r}: give integers (10,20) or fractions (0.33,0.67)") from None
    if len(set(layers)) != len(layers):
        raise EETuneError(f"duplicate exit layers {layers} (from {spec!r}): give each layer once")
    return tuple(sorted(layers))
