"""bloomray.demo's check that no completion repeats one token through it (issue 11)."""

from __future__ import annotations

import pytest

from bloomray.demo import DegenerateCompletionError, repeated_token


@pytest.mark.parametrize(
    "text",
    [
        " is used to iterate over the elements of a sequence (such as a string, tuple or list).",
        " loop:\n    for x in range(10):\n        print(x)\n",
        " 1, 2, 3, 4, 5, 6, 7, 8",  # commas are 7 of 15 units: under half
        " the the",  # too short to call
        "",
    ],
)
def test_real_text_passes(text: str):
    assert repeated_token(text) is None


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        (" the the the the the the the the", "the"),
        (" The the THE the, the the", "the"),  # case does not hide it
        (",,,,,,,,,,,,", ","),  # one token with no spaces between
        ("\n\n\n\n\n\n", "\n"),
        (" of of of of of of of of a sequence of", "of"),
        (" and the and the and the and", "and"),  # a two-token loop
    ],
)
def test_one_token_through_the_completion_fails(text: str, unit: str):
    assert repeated_token(text) == unit


def test_the_error_is_a_work_failure():
    err = DegenerateCompletionError("the served winner repeats 'the'", hint="pretrain longer")
    assert err.exit_code == 1 and "pretrain longer" in str(err)
