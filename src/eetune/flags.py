"""Command-line flags generated from a settings dataclass, so defaults and help live in one place.

`TuneConfig` (eetune.train.tune) and `DecodeOptions` (eetune.decode.api) document each field with a
trailing comment, continued on comment lines whose text is indented (`#` and 2+ spaces):

    seq_len: int = 512  # tokens per block
    distill: float | None = None  # alpha: loss = (1 - alpha) CE + alpha KL(final || exit)
    #                               None: 1 (the best measured recipe), 0 with cache_hidden

`add_fields(parser, TuneConfig, names)` turns each named field into `--seq-len`-style flag whose
type, default and choices come from the field (its annotation, its default, and the class's
`CHOICES` mapping) and whose help is that comment, with the default appended. A `bool` field
that defaults to False becomes a switch; one that defaults to True becomes `--no-NAME`. Tuples
are read as comma-separated numbers. `from_args(cls, args)` builds the dataclass back from the
parsed namespace. Only what a flag cannot say by itself (a metavar, a CLI-only default, a
custom type) is given at the call site.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import typing
from functools import lru_cache


@lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """Each field's documenting comment: the comment after `name: type = default`, joined with
    the comment lines right below it whose text is indented (`#` then two or more spaces)."""
    source = inspect.getsource(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, list[str]] = {}
    current, line_start = None, True
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            line_start = True
            continue
        if tok.type in (tokenize.INDENT, tokenize.DEDENT):
            continue
        if tok.type == tokenize.COMMENT:
            if line_start and not tok.string.startswith("#  "):
                current = None  # a comment line of its own, not a continuation
            elif current is not None:
                comments[current].append(tok.string.lstrip("#").strip())
            continue
        if line_start:
            current = tok.string if tok.type == tokenize.NAME and tok.string in fields else None
            if current is not None:
                comments[current] = []
        line_start = False
    return {name: " ".join(parts) for name, parts in comments.items() if parts}


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def numbers(kind):
    """An argparse type reading comma-separated numbers of `kind` into a tuple."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 1,0.5") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: give at least one number")
        return values
    return parse


def _plain_type(annotation):
    """(base type, whether None is allowed) of `int`, `int | None`, `tuple[float, ...]`, ..."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return annotation, False


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def add_fields(parser, cls, names, *, defaults: dict | None = None, types: dict | None = None,
               metavars: dict | None = None, extra_help: dict | None = None) -> None:
    """Add a flag per field of `cls` in `names` to `parser` (a parser, group or mutually
    exclusive group). `defaults`, `types`, `metavars`, `extra_help`: per-field overrides."""
    defaults, types, metavars, extra_help = defaults or {}, types or {}, metavars or {}, extra_help or {}
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    choices = getattr(cls, "CHOICES", {})
    for name in names:
        f = by_name[name]
        default = defaults.get(name, f.default)
        text = comments.get(name, "")
        if name in extra_help:
            text = f"{text}; {extra_help[name]}" if text else extra_help[name]
        kind, optional = _plain_type(hints[name])
        if kind is bool:
            if default:
                parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                                    help=f"turn off: {text}".replace("%", "%%"))
            else:
                parser.add_argument(flag_name(name), dest=name, action="store_true", help=text.replace("%", "%%"))
            continue
        if name in types:
            parse = types[name]
        elif typing.get_origin(kind) is tuple:
            parse = numbers(typing.get_args(kind)[0])
        else:
            parse = kind
        shown = "" if default is None else f" (default: {_show(default)})"
        kwargs = {"dest": name, "type": parse, "default": default, "help": (text + shown).replace("%", "%%")}
        if name in choices:
            kwargs["choices"] = list(choices[name])
        if name in metavars:
            kwargs["metavar"] = metavars[name]
        parser.add_argument(flag_name(name), **kwargs)


def from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass built from every field the namespace has (plus `overrides`)."""
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kwargs.update(overrides)
    return cls(**kwargs)
