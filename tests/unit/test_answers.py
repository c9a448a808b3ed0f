"""Final answers of math replies against reference answers: the verdict a careful grader gives.

Each row: (reply, reference, verdict). A naive parser misreads many of these: "(3,4)" as 34,
"1,2,3" as 123, "5-3" as -3, "1/2" and "\\frac{1}{2}" as 2, ".5" as 5, a unicode minus as
nothing, "42. (Step 3 of 3)" as 3, and 20-digit integers compared as floats.
"""

import pytest

from llm_stages.data.answers import final_answer, numeric_answer
from llm_stages.rollout.rewards import answer_closeness, answer_match

GRADER = [
    # tuples, lists, sets, intervals are not numbers with their separators dropped
    ("(3,4)", "34", False),
    ("(3,4)", "(3, 4)", True),
    ("(3,4)", "(4,3)", False),
    ("1,2,3", "123", False),
    ("1,2,3", r"\{1,2,3\}", True),
    (r"\{1,2\}", r"\{2,1\}", True),
    ("[1,2)", "[1, 2)", True),
    ("(1,2)", "[1,2]", False),
    # expressions are evaluated, not cut into numbers
    ("5-3", "-3", False),
    ("5-3", "2", False),  # arithmetic left undone: restating "43 + 91" must not earn the reward for 134
    ("43 + 91", "134", False),
    ("43 + 91 =", "134", False),
    ("So it is 7 - 2 = 5.", "5", True),
    ("x^2+2x+1", "(x+1)^2", True),  # expressions are compared as expressions
    ("1/2", "2", False),
    ("1/2", "0.5", True),
    (r"\frac{1}{2}", "2", False),
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac{3}{4}", "0.75", True),
    ("2/4", r"\frac12", True),
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}", True),
    ("10^{3}", "1000", True),
    ("0.333", "1/3", False),
    # plain numbers: exact decimal value
    (".5", "5", False),
    (".5", "0.5", True),
    ("\u22125", "-5", True),  # unicode minus
    ("\u22125", "5", False),
    ("3.0", "3", True),
    ("3.14", "3.15", False),
    ("1,000", "1000", True),
    ("$1,234$", "1234", True),
    ("12345678901234567890", "12345678901234567891", False),  # equal as floats
    ("12345678901234567890", "12345678901234567890", True),
    # where the final answer is
    ("42. (Step 3 of 3)", "42", True),
    ("42. (Step 3 of 3)", "3", False),
    ("43 + 91 = 134", "134", True),
    ("Adding the tens first:\n40 + 90 = 130, then 3 + 1 = 4,\nso 43 + 91 = 134", "134", True),
    ("x = 5", "5", True),
    ("The answer is 7 apples", "7", True),
    ("I think 7, no wait, 8", "8", True),
    ("She had 5 and gave 2.\n#### 3", "3", True),
    (r"So the answer is $\boxed{\frac{1}{2}}$. Check: 1 - 1/2", "0.5", True),
    (r"\boxed{(3, 4)}", "(3,4)", True),
    ("50%", "50", True),
    ("no answer", "5", False),
    ("", "5", False),
    # references that are whole worked solutions
    ("72", "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", True),
    ("1,234", "#### 1,234", True),
    (r"\frac{1}{2}", r"The probability is $\frac{2}{4} = \boxed{\frac{1}{2}}$.", True),
    ("0.5", r"Hence $x = \boxed{\dfrac{1}{2}}$.", True),
    ("2", r"Hence $x = \boxed{\dfrac{1}{2}}$.", False),
]


@pytest.mark.parametrize("reply,reference,verdict", GRADER)
def test_answer_match_gives_the_careful_graders_verdict(reply, reference, verdict):
    assert answer_match([reply], answers=[reference]) == [float(verdict)]


def test_final_answer_of_reference_solutions():
    assert final_answer("She sold 48+24 = 72 clips.\n#### 1,234") == "1,234"
    assert final_answer(r"so $\boxed{\frac{1}{2}}$ of them, not \boxed{3} \boxed{\{1, 2\}}.") == r"\{1, 2\}"
    assert final_answer("42. (Step 3 of 3)") == "42"
    assert final_answer("\u22127") == "-7"
    assert final_answer("  ") is None and final_answer(None) is None
    assert answer_match(["42"], answers=[None]) == [0.0]


def test_numeric_answers_and_closeness():
    assert numeric_answer("12 + 30 = 41") == 41.0
    assert numeric_answer(r"\boxed{\frac{1}{4}}") == 0.25
    assert numeric_answer("(3,4)") is None and numeric_answer("no number") is None and numeric_answer("43 + 91") is None
    assert answer_closeness(["12 + 30 = 41", "(3,4)", r"\frac{69}{2}"], answers=["42", "34", "#### 34"]) == [0.9, 0.0, 0.95]
