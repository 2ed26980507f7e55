"""Generation-quality metrics used by the decode benchmark."""

import pytest

from eetune.evaluate import rouge_l, token_agreement


def test_rouge_l_known_values():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 words: P = R = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(5 / 6)
    # candidate of 2 words fully inside a 4-word reference: P = 1, R = 0.5, F = 2/3
    assert rouge_l("cat mat", "the cat on mat") == pytest.approx(2 / 3)
    assert rouge_l("identical words here", "Identical, words here!") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("x y", "a b") == 0.0


def test_token_agreement():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert token_agreement([1, 9, 3, 4], [1, 2, 3, 4]) == 0.75
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert token_agreement([], []) == 1.0
