"""The shipped reward functions, with values worked out by hand, and how reward functions get
record fields."""

import pytest

from instructkit import rewards as RW
from instructkit.errors import UserError
from instructkit.rollout import reward_fields


def test_gsm8k_match_compares_the_final_numbers():
    responses = ["48 + 24 = 72 clips", "so\n#### 7,200", "It is 71.", "no number", "#### 72.0", "-3 then #### 5"]
    gold = ["Natalia ... #### 72", "7200", "#### 72", "#### 1", "72", "5"]
    assert RW.gsm8k_match([""] * 6, responses, gold) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert RW.final_answer("x 3 #### 4 then 9") == "4" and RW.final_answer("a 1,234.5 b") == "1234.5"


def test_math_answer_uses_math_verify_for_equivalent_forms():
    pytest.importorskip("math_verify")
    responses = ["The answer is $\\frac{1}{2}$", "0.5", "$x = 3$", "\\boxed{2}", "banana"]
    gold = ["1/2", "$\\frac12$", "3", "$3$", "1"]
    assert RW.math_answer([""] * 5, responses, gold) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_format_match_and_length_penalty():
    assert RW.format_match([""] * 3, ["work\n#### 12", "#### 12 more", "12"]) == [1.0, 0.0, 0.0]
    assert RW.format_match([""] * 2, ["Answer: 7", "answer 7"], pattern=r"^Answer: \d+$") == [1.0, 0.0]
    words = lambda n: " ".join(["w"] * n)
    # 0 up to 150 words, -1 at 200: 175 words is halfway
    assert RW.length_penalty([""] * 4, [words(10), words(150), words(175), words(300)]) == [0.0, 0.0, -0.5, -1.0]


def test_reward_fields_passes_what_the_function_names():
    def plain(prompts, responses):
        return [0.0] * len(responses)

    def wants(prompts, responses, answer, scale=1.0):
        return [0.0] * len(responses)

    def anything(prompts, responses, **fields):
        return [0.0] * len(responses)

    assert reward_fields(plain, "m:plain", {"answer", "id"}, {}) == []
    assert reward_fields(wants, "m:wants", {"answer", "id"}, {}) == ["answer"]
    assert reward_fields(wants, "m:wants", {"answer", "scale"}, {"scale": 2.0}) == ["answer"]  # the config's wins
    assert reward_fields(anything, "m:anything", {"answer", "id"}, {}) == ["answer", "id"]
    with pytest.raises(UserError, match=r"m:wants needs \['answer'\]"):
        reward_fields(wants, "m:wants", {"id"}, {})
    with pytest.raises(UserError, match="not parameters of it"):
        reward_fields(plain, "m:plain", set(), {"target": 3})
