"""Judges: how good one answer is, as a grade in [0, 1] or a recorded failure (never a guessed score).

Reference judges compare an answer with the prompt's expected answer (`reference`):
- `choice`: the option letter the answer picks equals the reference letter;
- `number`: the answer's final number equals the reference number (to a relative tolerance);
- `exact`: the answer, normalised (case, punctuation, articles, spaces), equals the normalised reference;
- `code`: the answer's code, run with the reference's tests (Python `assert` lines) in a separate interpreter
  under a time limit and memory, file-size and process limits, passes every test.
`auto` picks one from the reference's form. The LLM judge (`LLMJudge`) asks any OpenAI-compatible endpoint to
grade an answer with a rubric; a reply the configured parse cannot read is a failure, recorded as such.
"""

from __future__ import annotations

import ast
import builtins
import math
import os
import re
import string
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from serve.core.answer_facts import choice_letter, code_of

REFERENCE_JUDGES = ("auto", "choice", "number", "exact", "code")


@dataclass(frozen=True)
class Verdict:
    """A grade in [0, 1] from `judge`, or `score` None and `failure` saying why no grade could be given."""

    score: float | None
    judge: str
    failure: str | None = None


# --- choice letters and numbers -------------------------------------------------------------------------------

_REFERENCE_LETTER = re.compile(r"^\s*\(?([A-Ea-e])\)?\s*$")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")
_FINAL_CUE = re.compile(r"(?:####|\\boxed\{|answer\s*(?:is|:))\s*", re.IGNORECASE)


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The number an answer ends on: the first number after its last answer cue ("####", "\\boxed{", "answer is",
    "answer:"), else its last number; None where it has none."""
    cues = list(_FINAL_CUE.finditer(text))
    if cues:
        after = _NUMBER.search(text, cues[-1].end())
        if after:
            return _to_number(after[0])
    numbers = _NUMBER.findall(text)
    return _to_number(numbers[-1]) if numbers else None


def judge_choice(answer: str, reference: str) -> Verdict:
    expected = _REFERENCE_LETTER.match(reference)
    if not expected:
        return Verdict(None, "choice", f"bad reference: {reference!r} is not an option letter A-E")
    return Verdict(float(choice_letter(answer) == expected[1].upper()), "choice")


def judge_number(answer: str, reference: str, relative_tolerance: float = 1e-6) -> Verdict:
    expected = final_number(reference)
    if expected is None:
        return Verdict(None, "number", f"bad reference: {reference!r} holds no number")
    given = final_number(answer)
    return Verdict(float(given is not None and math.isclose(given, expected, rel_tol=relative_tolerance, abs_tol=1e-9)), "number")


# --- normalised exact match -----------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def judge_exact(answer: str, reference: str) -> Verdict:
    return Verdict(float(normalise(answer) == normalise(reference)), "exact")


# --- code against tests -----------------------------------------------------------------------------------------

CODE_TIME_LIMIT_S = 10.0
CODE_MEMORY_BYTES = 1 << 30
CODE_FILE_BYTES = 1 << 20
CODE_PROCESSES = 64


def tests_of(reference: str) -> list[str]:
    """The reference's test statements: its lines that start with `assert` (a JSON-like list of them is read
    too, as datasets store MBPP's tests)."""
    text = reference.strip()
    if text.startswith("["):
        try:
            items = ast.literal_eval(text)
            if isinstance(items, list) and all(isinstance(item, str) for item in items):
                text = "\n".join(items)
        except (ValueError, SyntaxError):
            pass
    return [line.strip() for line in text.splitlines() if line.strip().startswith("assert")]


_CALLED = re.compile(r"^assert\s+(?:not\s+)?\(?\s*(?:set\(|sorted\(|abs\(|round\(|math\.isclose\()?\s*([A-Za-z_]\w*)\s*\(")


def _defined_functions(code: str) -> list[str]:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    return [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def aliases(code: str, tests: list[str]) -> str:
    """Lines binding the function the tests call to the answer's function, where the answer defines one
    function under another name (a prompt that does not name the function leaves the name to the model)."""
    called = {match[1] for test in tests if (match := _CALLED.match(test))}
    defined = _defined_functions(code)
    missing = sorted(name for name in called if name not in defined and not hasattr(builtins, name))
    if not missing or not defined:
        return ""
    return "\n".join(f"{name} = {defined[-1]}" for name in missing)


def _limit_resources() -> None:  # runs in the child, before the interpreter starts
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CODE_MEMORY_BYTES, CODE_MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (CODE_FILE_BYTES, CODE_FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_NPROC, (CODE_PROCESSES, CODE_PROCESSES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.setsid()


def run_tests(code: str, tests: list[str], time_limit_s: float = CODE_TIME_LIMIT_S) -> tuple[bool, str]:
    """(passed, why not): the code and then the tests, in a fresh isolated interpreter (`-I`: no site packages of
    the user, no environment) in an empty temporary folder, killed after `time_limit_s`."""
    program = "\n".join([code, aliases(code, tests), *tests, ""])
    with tempfile.TemporaryDirectory(prefix="judge-") as folder:
        try:
            run = subprocess.run([sys.executable, "-I", "-c", program], cwd=folder, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                 timeout=time_limit_s, env={"PATH": "/usr/bin:/bin"}, preexec_fn=_limit_resources)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {time_limit_s:g}s"
    if run.returncode == 0:
        return True, ""
    last = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
    return False, last[:200]


def judge_code(answer: str, reference: str, time_limit_s: float = CODE_TIME_LIMIT_S) -> Verdict:
    tests = tests_of(reference)
    if not tests:
        return Verdict(None, "code", "bad reference: it holds no `assert` tests")
    code = code_of(answer) or answer
    passed, _ = run_tests(code, tests, time_limit_s)
    return Verdict(float(passed), "code")


def reference_kind(reference: str) -> str:
    """The judge `auto` picks: `code` for tests, `choice` for a lone letter, `number` for a number, else `exact`."""
    if tests_of(reference):
        return "code"
    if _REFERENCE_LETTER.match(reference):
        return "choice"
    if _to_number(reference.strip()) is not None:
        return "number"
    return "exact"


def judge_with_reference(answer: str, reference: str, kind: str = "auto") -> Verdict:
    if kind not in REFERENCE_JUDGES:
        raise ValueError(f"unknown reference judge {kind!r}: use one of {REFERENCE_JUDGES}")
    kind = reference_kind(reference) if kind == "auto" else kind
    return {"choice": judge_choice, "number": judge_number, "exact": judge_exact, "code": judge_code}[kind](answer, reference)


# --- the LLM judge ----------------------------------------------------------------------------------------------

DEFAULT_RUBRIC = """You grade one answer of an AI assistant. Judge whether it answers the user's request correctly,
completely and helpfully. Reply with a grade from 0 to 10 on the last line, written as "Grade: N".

[User request]
{prompt}

[Answer]
{answer}"""
DEFAULT_GRADE_PATTERN = r"Grade:\s*(\d+(?:\.\d+)?)"


def parse_grade(reply: str, pattern: str = DEFAULT_GRADE_PATTERN, scale: float = 10.0) -> Verdict:
    """The last match of `pattern` (its first group a number) divided by `scale`; a failure where nothing
    matches or the grade lies outside [0, scale]."""
    matches = re.findall(pattern, reply)
    if not matches:
        return Verdict(None, "llm", f"judge reply unparsable: no grade matching {pattern!r} in {reply[:120]!r}")
    grade = _to_number(matches[-1] if isinstance(matches[-1], str) else matches[-1][0])
    if grade is None or not 0 <= grade <= scale:
        return Verdict(None, "llm", f"judge reply unparsable: grade {matches[-1]!r} is outside [0, {scale:g}]")
    return Verdict(grade / scale, "llm")
