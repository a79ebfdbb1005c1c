"""What an answer says about itself and about the other answers to the same prompt.

Plain text checks (a parsed choice letter, code that parses, refusal markers), the answer's embedding with the
prompt encoder, and agreement between answers: equal letters where both name one, else the cosine of their
embeddings. Serving owns them (training imports them from here), so a recorded answer judged by the evaluation
and a live answer judged by the Ranker go through the same code. No Ray, no torch.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import numpy as np

# An answer is embedded by its opening characters: they carry its format and approach, the encoder would cut
# it at 256 tokens anyway, and a short input keeps judging an answer cheap where a cascade waits on it.
ANSWER_EMBEDDING_CHARS = 400

# "B", "B)", "(B)", "B.", "Answer: B", "The answer is B" at the start of the answer or after an answer cue.
_LEADING_LETTER = re.compile(r"^\s*\(?([A-E])(?:[).:,\n]|\s*$)")
_CUED_LETTER = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-E])\b", re.IGNORECASE)
# Markdown fences (the last one may be cut off by the token limit), or the [PYTHON] tags Code Llama writes.
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\r?\n(.*?)(?:```|\Z)|\[PYTHON\]\r?\n?(.*?)(?:\[/PYTHON\]|\Z)",
                         re.DOTALL | re.IGNORECASE)
# Refusals and hedges; "I do" alone is a "I don't know" cut off by the answer's token limit.
_REFUSAL = re.compile(
    r"\b(?:I(?:'m| am) sorry|I apologi[sz]e|I can(?:no|')t (?:help|assist|provide|answer)|as an AI\b|I(?:'m| am) unable|"
    r"I do(?:n't| not) know)|^\s*(?:Unfortunately\b|I do\s*$)",
    re.IGNORECASE,
)


def answer_opening(text: str) -> str:
    """What of an answer is embedded, in training and in serving alike."""
    return text[:ANSWER_EMBEDDING_CHARS]


def choice_letter(text: str) -> str | None:
    """The option letter an answer picks, or None where it names none."""
    match = _LEADING_LETTER.match(text) or _CUED_LETTER.search(text)
    return match[1].upper() if match else None


def code_of(text: str) -> str | None:
    """The answer's code: its fenced blocks joined, None where it has none."""
    blocks = [fenced or tagged for fenced, tagged in _CODE_BLOCK.findall(text)]
    return "\n".join(blocks) if blocks else None


def parses_as_python(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text))


@dataclass(frozen=True)
class AnswerFacts:
    """Per-answer facts of N prompts x M models, all [N, M]."""

    letters: np.ndarray  # object: the parsed choice letter or None
    log_length: np.ndarray  # log(1 + characters)
    has_code: np.ndarray  # float 0/1
    code_parses: np.ndarray  # float 0/1 (0 where there is no code)
    refusal: np.ndarray  # float 0/1
    embeddings: np.ndarray  # [N, M, D] float32, unit norm

    @classmethod
    def of(cls, responses: np.ndarray, embeddings: np.ndarray) -> AnswerFacts:
        texts = responses.ravel()
        code = [code_of(t) for t in texts]
        shape = responses.shape
        return cls(
            letters=np.array([choice_letter(t) for t in texts], dtype=object).reshape(shape),
            log_length=np.log1p([len(t) for t in texts]).reshape(shape),
            has_code=np.array([c is not None for c in code], float).reshape(shape),
            code_parses=np.array([c is not None and parses_as_python(c) for c in code], float).reshape(shape),
            refusal=np.array([is_refusal(t) for t in texts], float).reshape(shape),
            embeddings=embeddings,
        )

    def subset(self, rows: np.ndarray) -> AnswerFacts:
        return AnswerFacts(*(getattr(self, name)[rows] for name in self.__dataclass_fields__))


def agreement(facts: AnswerFacts) -> np.ndarray:
    """[N, M, M] how far each pair of answers to a prompt agree, in [0, 1]: 1 or 0 where both name a choice
    letter, else the (clipped) cosine of their embeddings."""
    letters = facts.letters
    named = np.not_equal(letters, None)
    both = named[:, :, None] & named[:, None, :]
    same = letters[:, :, None] == letters[:, None, :]
    cosine = np.clip(np.einsum("nmd,nkd->nmk", facts.embeddings, facts.embeddings), 0.0, 1.0)
    return np.where(both, same.astype(float), cosine)
