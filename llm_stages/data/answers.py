"""Final answers of math replies and reference solutions: `final_answer` takes the final answer out of a
reply or a reference solution (gsm8k `#### 42`, MATH `\\boxed{...}`), and `same_answer` compares two of
them: plain numbers exactly (the fast path, also for big integers), anything else (fractions, LaTeX,
percentages, tuples, sets, intervals, expressions) by value with the `math-verify` library. The data
layer reads reference answers with it; the rule rewards (`llm_stages.rollout.rewards`) grade with it.
"""

from __future__ import annotations

import functools
import re
import threading
from decimal import Decimal, InvalidOperation


_GSM8K = re.compile(r"####\s*([^\n]*)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A plain number: digits with optional thousands separators in groups of three, optional decimals.
_PLAIN = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_PLAIN_NUMBER = re.compile(rf"\$?\s*({_PLAIN})\s*\$?")
_EQUATION_RESULT = re.compile(rf".*=\s*({_PLAIN})", re.DOTALL)  # "43 + 91 = 134": the result of a worked equation
# A trailing remark in parentheses that holds words, such as "(Step 3 of 3)", is not part of the answer.
_REMARK = re.compile(r"\s*\((?=[^()]*[A-Za-z]{2})[^()]*\)\s*$")
_WORD = re.compile(r"(?<!\\)\b[A-Za-z]{2,}")  # a word outside LaTeX commands: the text is prose, not a formula
# Arithmetic left to do ("43 + 91", "5-3", "3 \\times 4"): restating a question is not answering it,
# so it never matches a plain-number reference (else a policy learns to copy the question).
_ARITHMETIC = re.compile(r"[\d)}]\s*(?:[-+*\u00d7]|\\times|\\cdot)\s*[\d({\\]")
_DASHES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})  # unicode minus and dashes


def _boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}`, braces balanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def final_answer(text) -> str | None:
    """The final answer of a reply or of a reference solution: after the last `####` (gsm8k), else
    inside the last `\\boxed{}` (MATH), else the whole text; stripped, with unicode minus signs as
    "-", and a trailing remark in parentheses ("(Step 3 of 3)") and full stop dropped. None when empty."""
    if text is None:
        return None
    text = str(text).translate(_DASHES).strip()
    marked = _GSM8K.findall(text)
    answer = marked[-1] if marked else _boxed(text)
    answer = (answer if answer is not None else text).strip()
    answer = _REMARK.sub("", answer).strip().removesuffix(".").strip()
    return answer or None


def _plain_number(answer: str) -> Decimal | None:
    """The value of a plain number ("1,234", "-0.5", ".5", "$3$"), or of an equation's result
    ("12 + 30 = 42"); None for anything else."""
    match = _PLAIN_NUMBER.fullmatch(answer) or _EQUATION_RESULT.fullmatch(answer)
    if match is None:
        return None
    try:
        return Decimal(match.group(1).replace(",", ""))
    except InvalidOperation:
        return None


@functools.lru_cache(maxsize=8192)  # replies and references repeat within and across rollouts
def _math(answer: str) -> list:
    """math-verify's reading of an answer: a formula ("(3,4)", "\\frac{1}{2}", "1,2,3") is read
    as LaTeX; prose ("the answer is 7 apples") has its answer extracted."""
    from math_verify import parse  # imports sympy: only when an answer is not a plain number

    # signal.alarm, math-verify's timeout, only works in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if _WORD.search(answer):
        return parse(answer, parsing_timeout=timeout)
    latex = re.sub(r"(?<!\\)%", r"\\%", answer.strip("$"))
    return parse(f"${latex}$", parsing_timeout=timeout)


def same_answer(predicted: str | None, reference: str | None) -> bool:
    """Whether two final answers (see `final_answer`) are equal: plain numbers by exact decimal
    value ("1,000" == "1000.0", ".5" == "0.5"; big integers exactly), anything else by value with
    math-verify ("1/2" == "\\frac{1}{2}", "(3, 4)" == "(3,4)" != "34", "\\{1,2\\}" == "\\{2,1\\}"),
    except that arithmetic left undone ("43 + 91") never equals a number."""
    if predicted is None or reference is None:
        return False
    number, reference_number = _plain_number(predicted), _plain_number(reference)
    if number is not None and reference_number is not None:
        return number == reference_number
    gold, target = _math(reference), _math(predicted)
    if not gold:
        return predicted.strip() == reference.strip()
    if reference_number is not None and any(isinstance(t, str) and _ARITHMETIC.search(t) for t in target):
        return False
    from math_verify import verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return bool(verify(gold, target, timeout_seconds=timeout))


def numeric_answer(text) -> float | None:
    """The final answer of `text` as a number, or None when it is not one (nor arithmetic left undone)."""
    answer = final_answer(text)
    if answer is None:
        return None
    number = _plain_number(answer)
    if number is not None:
        return float(number)
    parsed = _math(answer)
    if any(isinstance(t, str) and _ARITHMETIC.search(t) for t in parsed):
        return None
    for value in parsed:
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None
