"""Property-based tests (hypothesis) of what users type and what is stored: `--exits`,
`--loss-weights`, data specs, profile thresholds, and ExitConfig's JSON round trip. Any input
either parses to the right value or is refused with a one-line EETuneError; nothing else
escapes. EXAMPLES per property (docs/reliability.md quotes the total)."""

import contextlib
import functools
import io
import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eetune.model.config import ExitConfig, parse_exit_layers
from eetune.train.data import DataPart, parse_data_spec
from eetune.errors import EETuneError
from eetune.measure.evaluate import _check_thresholds
from eetune.cli import build_parser
from eetune.train.tune import TuneConfig
from eetune.flags import from_args

EXAMPLES = 200
PROFILE = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def refused_or(fn, *args):
    """fn(*args), or None when it refuses with a one-line EETuneError (any other exception fails)."""
    try:
        return fn(*args)
    except EETuneError as e:
        assert "\n" not in str(e)
        return None


@PROFILE
@given(layers=st.sets(st.integers(1, 80), min_size=1, max_size=6), depth=st.integers(1, 80),
       spaces=st.booleans())
def test_exit_layers_parse_to_the_sorted_set(layers, depth, spaces):
    spec = (", " if spaces else ",").join(str(k) for k in sorted(layers, key=lambda k: -k))
    got = refused_or(parse_exit_layers, spec, depth)
    assert got == tuple(sorted(layers))  # parsing sorts; ExitConfig validates the depth
    config = refused_or(lambda: ExitConfig(exit_layers=got, num_layers=depth))
    assert (config is not None) == (max(layers) <= depth)


@PROFILE
@given(text=st.text(max_size=30))
def test_exit_layers_never_raise_anything_but_a_one_line_error(text):
    got = refused_or(parse_exit_layers, text, 30)
    assert got is None or (all(isinstance(k, int) for k in got) and list(got) == sorted(got))


@PROFILE
@given(ws=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=5))
def test_loss_weights_round_trip(ws):
    assert parse_weights(",".join(repr(w) for w in ws)) == tuple(ws)


@functools.lru_cache(maxsize=1)
def cli_parser():
    """The real `eetune` parser, built once (building it takes ~25 ms, parsing with it ~1 ms;
    argparse keeps no state between parses)."""
    return build_parser()


def parse_weights(text: str):
    """--loss-weights TEXT through the real `eetune tune` parser: the weights, or None when it is
    refused with one line and exit code 2 (anything else fails)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = cli_parser().parse_args(["tune", "d", "--out", "o", f"--loss-weights={text}"])
    except SystemExit as e:
        assert e.code == 2 and len(err.getvalue().strip().splitlines()) == 1
        return None
    return from_args(TuneConfig, args).loss_weights


@PROFILE
@given(text=st.text(max_size=30))
def test_loss_weights_garbage_is_refused_in_one_line(text):
    got = parse_weights(text)
    assert got is None or all(isinstance(w, float) for w in got)


@PROFILE
@given(n=st.integers(1, 10 ** 9), w1=st.floats(0, 100, allow_nan=False), w2=st.floats(0, 100, allow_nan=False))
def test_data_spec_mixture_parses_weights_and_n(n, w1, w2):
    spec = f"default:{w1!r},generated:{n}:{w2!r}"
    got = refused_or(parse_data_spec, spec)
    if w1 + w2 > 0:
        assert got == [DataPart("default", w1), DataPart("generated", w2, n, "default")]
    else:
        assert got is None  # weights summing to 0 are refused


@PROFILE
@given(text=st.text(alphabet=st.sampled_from(list("default:generated,0123456789.-eE ")), max_size=40))
def test_data_spec_garbage_is_refused_in_one_line(text):
    got = refused_or(parse_data_spec, text)
    if got is not None:
        assert all(isinstance(p, DataPart) and math.isfinite(p.weight) and p.weight >= 0 for p in got)
        assert all(p.generated is None or p.generated > 0 for p in got)


@PROFILE
@given(ts=st.lists(st.floats(-1, 2, allow_nan=False), max_size=6))
def test_profile_thresholds_are_sorted_probabilities_or_refused(ts):
    got = refused_or(_check_thresholds, ts)
    if got is None:
        assert not ts or any(not 0 <= t <= 1 for t in ts)
    else:
        assert got == sorted(set(got)) and all(0 <= t <= 1 for t in got) and set(got) == set(ts)


@PROFILE
@given(depth=st.integers(1, 64), data=st.data(), arch=st.sampled_from(["embedding", "norm", "mlp", "layer"]),
       init=st.sampled_from(["copy", "random"]), emb=st.sampled_from(["copy", "shared"]),
       base=st.text(max_size=20), training=st.none() | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
def test_exit_config_json_round_trip(depth, data, arch, init, emb, base, training):
    layers = tuple(sorted(data.draw(st.sets(st.integers(1, depth), min_size=1, max_size=4))))
    c = ExitConfig(exit_layers=layers, num_layers=depth, arch=arch, init=init, output_embedding=emb, base_model=base,
                   training=training)
    again = ExitConfig.from_dict(json.loads(c.to_json()))
    assert again == c
