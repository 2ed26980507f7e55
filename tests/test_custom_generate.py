"""`eetune.decode.custom_generate`: eetune's engine behind Hugging Face's
`model.generate(..., custom_generate=fn)`. The length and EOS settings HF turns into stopping
criteria, and the sampling warpers, are honoured; logits processors and stopping criteria the
engine cannot apply are refused with a one-line EETuneError instead of being silently dropped."""

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from eetune.decode import custom_generate
from eetune.errors import EETuneError
from eetune.model.early_exit import EarlyExitModel

from conftest import V, peaky_backbone

PAD = 0
# Two left-padded prompts: 4 and 7 tokens in a batch 7 wide.
IDS = torch.tensor([[PAD, PAD, PAD, 5, 17, 33, 2], [60, 3, 11, 12, 13, 14, 15]])
MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
WIDTH = IDS.shape[1]


@pytest.fixture(scope="module")
def pair():
    bb = peaky_backbone("llama", scale=8.0)
    return bb, EarlyExitModel.convert(bb, [1, 2], arch="mlp")


def hf(bb, **kw):
    """The backbone's plain HF generate (greedy unless told), EOS off unless given."""
    kw = {"do_sample": False, "pad_token_id": PAD, "eos_token_id": None, **kw}
    return bb.model.generate(IDS, attention_mask=MASK, **kw)


def custom(bb, model, opts=None, **kw):
    return hf(bb, custom_generate=custom_generate(model, **(opts or {"mode": "full"})), **kw)


def test_greedy_full_mode_equals_plain_hf_generate(pair):
    bb, model = pair
    ref = hf(bb, max_new_tokens=12)
    out = custom(bb, model, max_new_tokens=12)
    assert ref.shape == (2, WIDTH + 12)
    assert out.tolist() == ref.tolist()
    assert torch.equal(out[:, :WIDTH], IDS)


@pytest.mark.parametrize("opts", [{"mode": "self-spec", "threshold": 0.0, "draft_len": 3},
                                  {"mode": "early-exit", "threshold": 1.01}])
def test_lossless_modes_equal_plain_hf_generate(pair, opts):
    bb, model = pair
    assert custom(bb, model, opts, max_new_tokens=10).tolist() == hf(bb, max_new_tokens=10).tolist()


def test_k_heads_equal_plain_hf_generate(pair):
    """Restricted-vocabulary exits (every other token id + OTHER) behind custom_generate: self-spec
    is still the plain model's greedy output."""
    bb, _ = pair
    model = EarlyExitModel.convert(bb, [1, 2], arch="mlp", exit_vocab_ids=torch.arange(0, V, 2))
    opts = {"mode": "self-spec", "threshold": 0.0, "draft_len": 3}
    assert custom(bb, model, opts, max_new_tokens=10).tolist() == hf(bb, max_new_tokens=10).tolist()


def test_max_length_is_honoured(pair):
    """max_length counts the padded prompt width (as HF does): 10 - 7 = 3 new tokens per row,
    not the engine's old default of 20."""
    bb, model = pair
    ref = hf(bb, max_length=10)
    out = custom(bb, model, max_length=10)
    assert out.shape == ref.shape == (2, 10)
    assert out.tolist() == ref.tolist()


def test_hf_default_length_when_nothing_is_given(pair):
    bb, model = pair
    with pytest.warns(UserWarning, match="max_length"):
        ref = hf(bb)
    with pytest.warns(UserWarning, match="max_length"):
        out = custom(bb, model)
    assert out.shape == ref.shape == (2, WIDTH + 20)
    assert out.tolist() == ref.tolist()


def test_max_new_tokens_beats_max_length(pair):
    bb, model = pair
    out = custom(bb, model, max_new_tokens=4, max_length=30)
    assert out.shape == (2, WIDTH + 4)


def test_custom_generate_options_take_precedence(pair):
    bb, model = pair
    out = custom(bb, model, {"mode": "full", "max_new_tokens": 2}, max_new_tokens=9)
    assert out.shape == (2, WIDTH + 2)


@pytest.mark.parametrize("kw,setting", [
    ({"repetition_penalty": 5.0}, "repetition_penalty"),
    ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"),
    ({"bad_words_ids": [[7]]}, "bad_words_ids"),
    ({"min_new_tokens": 3, "eos_token_id": 2}, "min_new_tokens"),
    ({"suppress_tokens": [7]}, "suppress_tokens"),
    ({"max_time": 5.0}, "max_time"),
    ({"num_beams": 2}, "num_beams"),
    ({"do_sample": True, "min_p": 0.1}, "min_p"),
])
def test_unsupported_settings_are_refused_in_one_line(pair, kw, setting):
    bb, model = pair
    with pytest.raises(EETuneError) as e:
        custom(bb, model, **{"max_new_tokens": 5, **kw})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{setting}") and "not supported by eetune's custom_generate" in msg
    assert "without custom_generate" in msg  # the fix


def test_repetition_penalty_message(pair):
    bb, model = pair
    with pytest.raises(EETuneError, match=r"^repetition_penalty is not supported by eetune's custom_generate: "
                                          r"drop it \(pass repetition_penalty=1\.0 .*\), or call generate\(\) "
                                          r"without custom_generate \(the full model\)$"):
        custom(bb, model, max_new_tokens=5, repetition_penalty=5.0)


def test_user_stopping_criterion_is_refused(pair):
    class Never(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    bb, model = pair
    with pytest.raises(EETuneError, match=r"^the stopping criterion Never is not supported"):
        custom(bb, model, max_new_tokens=5, stopping_criteria=StoppingCriteriaList([Never()]))


def test_eos_stops_one_row_of_a_padded_batch(pair):
    bb, model = pair
    free = custom(bb, model, max_new_tokens=12)[:, WIDTH:].tolist()
    # a token row 0 produces early and row 1 never does
    eos = next(t for t in free[0][1:6] if t not in free[1])
    cut = free[0].index(eos)
    ref = hf(bb, max_new_tokens=12, eos_token_id=eos)
    out = custom(bb, model, max_new_tokens=12, eos_token_id=eos)
    assert out.tolist() == ref.tolist()
    assert out.shape == (2, WIDTH + 12)  # row 1 runs on to the length limit
    assert out[0, WIDTH:].tolist() == free[0][:cut + 1] + [PAD] * (12 - cut - 1)
    assert out[1, WIDTH:].tolist() == free[1]


def test_eos_in_every_row_ends_the_batch_early(pair):
    bb, model = pair
    free = custom(bb, model, max_new_tokens=12)[:, WIDTH:].tolist()
    eos = [free[0][2], free[1][0]]
    out = custom(bb, model, max_new_tokens=12, eos_token_id=eos)
    assert out.tolist() == hf(bb, max_new_tokens=12, eos_token_id=eos).tolist()
    assert out.shape[1] < WIDTH + 12


def test_sampling_warpers_are_applied_not_refused(pair):
    """do_sample builds temperature / top-k / top-p warpers: eetune applies them. top_k=1 keeps
    only the argmax, so sampling must reproduce greedy decoding exactly."""
    bb, model = pair
    greedy = hf(bb, max_new_tokens=10)
    out = custom(bb, model, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=1, top_p=0.9)
    assert out.tolist() == greedy.tolist()


def test_sampling_follows_torch_manual_seed(pair):
    bb, model = pair
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    torch.manual_seed(3)
    a = custom(bb, model, **kw)
    torch.manual_seed(3)
    b = custom(bb, model, **kw)
    torch.manual_seed(4)
    c = custom(bb, model, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_custom_generate_option_is_refused(pair):
    _, model = pair
    with pytest.raises(EETuneError, match="unknown custom_generate option.*repetition_penalty"):
        custom_generate(model, mode="full", repetition_penalty=5.0)


def test_another_models_generate_is_refused(pair):
    _, model = pair
    other = peaky_backbone("llama", seed=1)
    with pytest.raises(EETuneError, match="built for another model"):
        hf(other, max_new_tokens=3, custom_generate=custom_generate(model, mode="full"))


def test_min_length_the_prompt_already_reaches_is_no_refusal(pair):
    bb, model = pair
    eos = custom(bb, model, max_new_tokens=12)[0, WIDTH + 3].item()
    out = custom(bb, model, max_new_tokens=12, min_length=WIDTH, eos_token_id=eos)
    assert out.tolist() == hf(bb, max_new_tokens=12, min_length=WIDTH, eos_token_id=eos).tolist()


def test_a_passed_max_length_criterion_replaces_the_default_one(pair):
    from transformers import MaxLengthCriteria

    bb, model = pair
    crit = StoppingCriteriaList([MaxLengthCriteria(max_length=WIDTH + 3)])
    ref = hf(bb, max_new_tokens=12, stopping_criteria=crit)
    out = custom(bb, model, max_new_tokens=12, stopping_criteria=crit)
    assert out.shape == ref.shape == (2, WIDTH + 3)
    assert out.tolist() == ref.tolist()
