"""Surface features of a prompt that its sentence embedding blurs: length, format, language, code and maths.

Computed from the text alone, the same way in training and in serving. Serving computes them on whatever a
client sends, so the work is bounded: every pattern runs in linear time (no quantified run that backtracks),
and all but the length read only the first `WINDOW_CHARS` characters (the encoder reads less still).
"""

from __future__ import annotations

import re

import numpy as np

_CODE = re.compile(r"```|\bdef |\breturn\b|\bfunction\b|[{};][ \t]*$|\bimport \w|assert |==", re.MULTILINE)
_CALL = re.compile(r"\w\(")  # a signature line: a call's opening ...
_CALL_END = re.compile(r"\)[ \t]*:")  # ... then, later on the same line, `):` (as in `def f(x):`, `if g(y):`)
_MATH = re.compile(r"\d[ \t]*[-+*/^=][ \t]*\d|\$|\\frac|\bsolve\b|\bcalculate\b|\bhow many\b|\bhow much\b", re.IGNORECASE)
_CHOICES = re.compile(r"(?:^|\n)[ \t]*\(?[A-E][).:]\s", re.MULTILINE)
WINDOW_CHARS = 16_384

FEATURE_NAMES = (
    "log_chars",
    "log_lines",
    "digit_share",
    "non_ascii_share",
    "code_markers",
    "math_markers",
    "choice_markers",
    "ends_with_question",
)


def _signature_lines(text: str) -> int:
    count = 0
    for line in text.split("\n"):
        opening = _CALL.search(line)
        count += bool(opening and _CALL_END.search(line, opening.end()))
    return count


def prompt_features(texts: list[str]) -> np.ndarray:
    """[N, len(FEATURE_NAMES)] float32."""
    rows = []
    for full_text in texts:
        text = full_text[:WINDOW_CHARS]
        chars = max(len(text), 1)
        rows.append(
            (
                np.log1p(len(full_text)),
                np.log1p(text.count("\n")),
                sum(map(str.isdigit, text)) / chars,
                (chars - len(text.encode("ascii", "ignore"))) / chars if text else 0.0,
                np.log1p(len(_CODE.findall(text)) + _signature_lines(text)),
                np.log1p(len(_MATH.findall(text))),
                np.log1p(len(_CHOICES.findall(text))),
                float(text.rstrip().endswith("?")),
            )
        )
    return np.asarray(rows, dtype=np.float32).reshape(len(texts), len(FEATURE_NAMES))
