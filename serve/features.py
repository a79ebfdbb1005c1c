"""Surface features of a prompt that its sentence embedding blurs: length, format, language, code and maths.

Computed from the text alone, the same way in training and in serving.
"""

from __future__ import annotations

import re

import numpy as np

_CODE = re.compile(r"```|\bdef |\breturn\b|\bfunction\b|[{};]\s*$|\bimport \w|assert |==|\w+\(.*\)\s*:", re.MULTILINE)
_MATH = re.compile(r"\d+\s*[-+*/^=]\s*\d+|\$|\\frac|\bsolve\b|\bcalculate\b|\bhow many\b|\bhow much\b", re.IGNORECASE)
_CHOICES = re.compile(r"(?:^|\n)\s*\(?[A-E][).:]\s", re.MULTILINE)

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


def prompt_features(texts: list[str]) -> np.ndarray:
    """[N, len(FEATURE_NAMES)] float32."""
    rows = []
    for text in texts:
        chars = max(len(text), 1)
        rows.append(
            (
                np.log1p(len(text)),
                np.log1p(text.count("\n")),
                sum(c.isdigit() for c in text) / chars,
                sum(ord(c) > 127 for c in text) / chars,
                np.log1p(len(_CODE.findall(text))),
                np.log1p(len(_MATH.findall(text))),
                np.log1p(len(_CHOICES.findall(text))),
                float(text.rstrip().endswith("?")),
            )
        )
    return np.asarray(rows, dtype=np.float32).reshape(len(texts), len(FEATURE_NAMES))
