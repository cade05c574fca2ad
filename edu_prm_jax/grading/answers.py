"""Final-answer extraction and equivalence checking for outcome labels.

Labels for the PRM come from comparing a sampled solution's final answer with the gold answer: a wrong verdict
is a wrong Monte Carlo label. So the check is exact where the math is exact, symmetric in its two arguments,
indifferent to presentation, deterministic, and never hangs a data-generation worker. Layers:

1. ``extract_answer``: the final answer of a solution text (boxes, GSM8K's ``#### n``, "the answer is").
2. ``normalize_answer``: string canonicalisation of presentation (Markdown emphasis, ``\\text``/``\\mathrm``/
   ``\\mbox``, ``\\dfrac``/``\\tfrac``, ``\\left``/``\\right``, units, degrees, currency, thousands
   separators, ``\\varnothing``, shorthand ``\\frac12``); equal keys imply equal answers. It is also the
   majority-vote key of Best-of-N.
3. Exact rational arithmetic on plain numbers (integers, decimals, ``\\frac{a}{b}``, ``a/b``, percentages,
   scientific notation, repeating decimals ``0.\\overline{3}``), multiple-choice letters and words, in this
   process: no sympy.
4. Everything else goes to `grading.symbolic` (latex2sympy2_extended parses, sympy decides exactly: its module
   docstring lists the rules for sets, intervals, inequalities, equations, tuples, matrices).

Verdicts are tri-state (``answers_verdict``, ``solution_verdict``): True, False, or None = undecided, when the
symbolic check ran out of its CPU-time bound twice (``timeout_s`` seconds of CPU, then once more with
``_RETRY_FACTOR`` times that) or its worker died. An undecided check is never reported as wrong: MC labelling
leaves it out of its counts and reports how many there were. ``answers_equal`` / ``is_correct`` return a bool
for callers that need one: undecided is False there (use the tri-state functions to tell the two apart).

Layer 4 runs in a worker process (a one-worker ``pebble.ProcessPool``, started on first use and warmed up by
its initializer): sympy's C-level big-integer work cannot be interrupted in-process. The bound is CPU time, not
wall time, so a loaded machine does not change verdicts: the worker arms ``ITIMER_PROF`` (the CPU time of the
worker process) before each check, and the kernel's SIGPROF ends a worker that overruns it, even inside C code;
pebble starts a replacement at once. A wall-clock bound (``_wall_bound``, far above the CPU bound) only catches a
worker that makes no progress at all; it too gives undecided. ``verification_stats()`` counts each outcome and a
warning is logged for every undecided check. Verdicts of symbolic checks are cached per process (a labelling run
asks about the same answer pairs many times), so a pair gets one verdict per process.

The worker is started with ``spawn``, never forked from the caller (which may have initialised JAX or hold locks
in other threads), so threads and forked children can all run checks: each process has its own pool, and a fork
drops the parent's pool in the child. Like any spawned process, the worker imports the caller's main module as
``__mp_main__``: a script that checks answers needs the ``if __name__ == "__main__":`` guard. A daemonic process
(a ``multiprocessing.Pool`` worker) cannot start children, so it cannot check symbolically.

Conventions (symmetric in pred/gold; the symbolic layer also sorts the pair, so no check depends on the order):

* Several boxed answers that close a solution, separated only by connectors (``,``, "and", "or", ``$``),
  form one answer list: ``\\boxed{2}`` and ``\\boxed{3}`` == ``2, 3``.
* Percentages: ``10\\%`` equals both ``10`` and ``0.1``. MATH/GSM8K "what percent" questions give gold either
  as ``10`` or ``10\\%`` and models write either; ``0.1`` for such a question is the same quantity, and no
  benchmark item hinges on distinguishing 10 from 0.1 *via the % sign*. ``10`` vs ``0.1`` stay unequal.
* Tuples are ordered: ``(1,2)`` != ``(2,1)``; sets are not: ``\\{1,2\\}`` == ``\\{2,1\\}``. Bare
  comma lists ``1,2`` are treated as unordered (MATH "enter all solutions, separated by commas").
  Intervals compare endpoints and openness: ``[1,2)`` != ``[1,2]``; ``(1,2)`` is both a pair and an interval.
* Inequalities equal the set they describe: ``x \\ge 3`` == ``[3, \\infty)`` == ``x \\in [3,\\infty)``.
* A leading single-variable assignment is dropped: ``x=3`` == ``3``, ``y=2x+1`` == ``2x+1``; two equations are
  equal when one is a nonzero multiple of the other: ``y = -1/2*x + 3/4`` == ``2x+4y-3=0``.
* Currency, degrees, ``\\text{}`` wrappers and trailing unit words are ignored: ``\\$5`` == ``5``,
  ``90^\\circ`` == ``90``, ``5.4 \\text{ cents}`` == ``5.4``; ``\\text{(B)}`` == ``B``.
* Numbers compare exactly, never with a float tolerance: ``0.5`` == ``\\frac12``, ``0.33`` != ``\\frac13``,
  ``1.414214`` != ``\\sqrt2``, ``\\frac{1}{2^{99}}`` != ``\\frac{1}{2^{98}}``; ``1,080`` (thousands separators)
  == ``1080``; ``1.2e3`` == ``1200``; ``\\emptyset`` == ``\\varnothing`` == ``\\{\\}``.
* Two purely alphabetic answers of length >= 2 (``Evelyn``, ``east``) compare as case-insensitive words,
  never symbolically (sympy would treat them as commutative products, making ``Evenly`` == ``Evelyn``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import logging
import multiprocessing
import multiprocessing.process
import multiprocessing.util
import os
import re
import signal
import threading
from collections.abc import Callable
from fractions import Fraction
from typing import Any, TypeVar

import pebble

logger = logging.getLogger(__name__)
T = TypeVar("T")

# ----------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer)[\s*_]*(?:is|:)", re.IGNORECASE)
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_CALC_ANNOTATION_RE = re.compile(r"<<[^<>\n]*>>")
# What may stand between two boxes that together form one answer: math delimiters, spacing, punctuation and
# the connectors "and" / "or" (also as \text{ and }).
_BOX_GAP_RE = re.compile(
    r"(?:\s|\$|\\[()\[\]]|[,;&]|\\\\|\\q?quad(?![a-zA-Z])|\\[,;:! ]"
    r"|\\(?:text|mbox|mathrm)\s*\{\s*(?:and|or|,|;)?\s*\}|(?<![A-Za-z])(?:and|or)(?![A-Za-z]))*"
)


def _match_braces(text: str, open_idx: int) -> int | None:
    """Index just past the ``}`` matching ``text[open_idx] == '{'`` (escaped braces ignored), or None."""
    depth = 0
    i = open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every complete top-level ``\\boxed{..}``/``\\boxed x``/``\\fbox{..}``."""
    out: list[tuple[int, int, str]] = []
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return out
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _match_braces(text, i)
            if end is None:  # truncated box: not a complete answer
                pos = m.end()
                continue
            out.append((m.start(), end, text[i + 1 : end - 1]))
            pos = end
        elif i > m.end():  # "\boxed 5": one token up to whitespace or "$"
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                out.append((m.start(), i + tok.end(), tok.group(0)))
            pos = i + (tok.end() if tok else 0)
        else:
            pos = m.end()


def _final_boxes(text: str) -> list[str]:
    """Contents of the last box and of the boxes just before it that only connectors separate from it
    (``$\\boxed{2}$ and $\\boxed{3}$``), in order, repeated contents once."""
    spans = _boxed_spans(text)
    if not spans:
        return []
    group = [spans[-1]]
    for prev in reversed(spans[:-1]):
        if not _BOX_GAP_RE.fullmatch(text[prev[1] : group[0][0]]):
            break
        group.insert(0, prev)
    out: list[str] = []
    for _, _, content in group:
        content = content.strip()
        if content and content not in out:
            out.append(content)
    return out


def _strip_math_delims(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def _strip_emphasis(s: str) -> str:
    """Markdown emphasis around an answer: ``**73**``, ``*73*``, ``__73__`` -> ``73`` (repeated)."""
    while True:
        m = re.fullmatch(r"(\*\*|__|\*|_)(.+)\1", s.strip(), flags=re.S)
        if m is None or m.group(2).strip() in ("", "*", "_"):
            return s.strip()
        s = m.group(2)


def _strip_wrappers(s: str) -> str:
    prev = None
    while prev != s:
        prev = s
        s = _strip_math_delims(_strip_emphasis(s))
    return s


def extract_answer(text: str) -> str | None:
    """Raw final answer of a solution text, or None when it has none.

    The closing box(es) (several boxes separated only by connectors form one comma-separated answer), else
    GSM8K's ``#### n``, else the last "(final) answer is ..." / "Final Answer: ..." (Markdown emphasis and math
    delimiters around it stripped). Explicit markers beat the phrase: GSM8K references say "the final answer is
    15 gallons * 8 = 120 pints" in the body and the clean ``#### 120`` at the end.
    """
    if not text:
        return None
    text = _CALC_ANNOTATION_RE.sub("", text)  # GSM8K "<<40*0.8=32>>32" -> "32"
    boxes = _final_boxes(text)
    if boxes:
        return ", ".join(boxes)
    hashes = list(_HASH_RE.finditer(text))
    if hashes:
        ans = hashes[-1].group(1).strip()
        if ans:
            return ans
    matches = list(_ANSWER_IS_RE.finditer(text))
    if matches:
        rest = text[matches[-1].end() :].lstrip(" \t:")
        rest = re.sub(r"^(?:\*\*|__|\*|_)(?=\s)", "", rest)  # "**Final Answer:** 73": closes the phrase's emphasis
        rest = rest.lstrip(" \t:")
        if rest.startswith("\n"):  # "Final Answer:\n\n73": the answer is on the next non-empty line
            rest = rest.lstrip()
        line = rest.split("\n", 1)[0]
        # Sentence end: ". " or a final "." outside math (not a decimal point).
        line = re.split(r"\.(?=[\s*_]|$)(?![^$]*\$)", line, maxsplit=1)[0]
        line = re.sub(r"^\s*(?:therefore|thus|then|simply|just)\s+", "", line, flags=re.IGNORECASE)
        # "72, altogether": a comma and a word (not a connector) end the answer
        line = re.sub(r"(?<=\d),\s+(?!(?:and|or)\b)[A-Za-z]{3,}\b.*$", "", line)
        ans = _strip_wrappers(line.strip().rstrip(".").strip())
        if ans:
            return ans
    return None


# ----------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------

_TEXT_CMDS = (
    "\\text", "\\textbf", "\\textit", "\\textrm", "\\textsf", "\\texttt", "\\textnormal", "\\mathrm", "\\mathbf",
    "\\mathit", "\\mathsf", "\\mathtt", "\\boldsymbol", "\\bm", "\\mbox", "\\hbox", "\\operatorname", "\\boxed",
    "\\fbox",
)
_UNIT_WORDS = (
    "dollars", "dollar", "cents", "cent", "units", "unit", "square units", "sq units", "degrees", "degree",
    "cm", "centimeters", "centimetres", "mm", "millimeters", "km", "kilometers", "m", "meters", "metres",
    "inches", "inch", "in", "feet", "foot", "ft", "yards", "yard", "miles", "mile", "mph", "hours", "hour",
    "minutes", "minute", "seconds", "second", "days", "day", "weeks", "years", "kg", "g", "grams", "pounds",
    "lbs", "ounces", "oz", "liters", "litres", "gallons", "people", "students", "points",
    "square feet", "square inches", "square meters", "square centimeters", "cubic feet", "cubic units", "sq ft",
    "cubic inches", "cubic centimeters", "cubic meters",
)
# A unit word must follow a number or a closing brace after whitespace ("5 m"), or be >= 3 letters ("5cm" is
# kept: it may be an algebraic product).
_ALL_UNITS = "|".join(sorted((re.escape(u) for u in _UNIT_WORDS), key=len, reverse=True))
_LONG_UNITS = "|".join(sorted((re.escape(u) for u in _UNIT_WORDS if len(u) >= 3), key=len, reverse=True))
_UNIT_RE = re.compile(
    rf"(?<=[0-9}}])(?:\s+(?:{_ALL_UNITS})|\s*(?:{_LONG_UNITS}))(?:\s*\^\s*\{{?[23]\}}?)?\s*$"
)
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_UNICODE = (("−", "-"), ("–", "-"), ("∞", "\\infty"), ("π", "\\pi"), ("√", "\\sqrt"), ("×", "\\times"),
            ("·", "\\cdot"), ("≤", "\\le "), ("≥", "\\ge "), ("≠", "\\ne "), ("∅", "\\emptyset "), ("±", "\\pm "),
            ("∪", "\\cup "), ("÷", "\\div "))
_SYNONYMS = (
    (r"\\varnothing(?![a-zA-Z])|\\emptyset(?![a-zA-Z])|\\\{\s*\\\}", r"\\emptyset "),
    (r"\\(?:geq?|geqslant)(?![a-zA-Z])", r"\\ge "),
    (r"\\(?:leq?|leqslant)(?![a-zA-Z])", r"\\le "),
    (r"\\(?:neq?)(?![a-zA-Z])", r"\\ne "),
    (r"\\lbrace(?![a-zA-Z])", r"\\{"),
    (r"\\rbrace(?![a-zA-Z])", r"\\}"),
    (r"\\vee(?![a-zA-Z])", r"\\lor "),
    (r"\\wedge(?![a-zA-Z])", r"\\land "),
    (r"\\infinity(?![a-zA-Z])|(?<![a-zA-Z\\])(?:infinity|inf)(?![a-zA-Z])", r"\\infty "),
    (r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|°|\\degree(?![a-zA-Z])", ""),
)


def _unwrap_commands(s: str, commands: tuple[str, ...]) -> str:
    """Replace ``\\cmd{X}`` by ``X`` for the given commands (brace-aware, repeated until stable)."""
    pattern = re.compile("(?:" + "|".join(re.escape(c) for c in commands) + r")(?![a-zA-Z])\s*\{")
    while True:
        m = pattern.search(s)
        if m is None:
            return s
        end = _match_braces(s, m.end() - 1)
        if end is None:
            return s[: m.start()] + s[m.end() :]
        s = s[: m.start()] + s[m.end() : end - 1] + s[end:]


def _remove_spaces(s: str) -> str:
    """Drop whitespace except where it separates a ``\\command`` from a following letter (``\\pi r``)."""
    parts = re.split(r"(\\[a-zA-Z]+)\s*", s)
    out = []
    for k, part in enumerate(parts):
        if k % 2 == 1:  # a command
            nxt = parts[k + 1] if k + 1 < len(parts) else ""
            nxt = nxt.lstrip()
            out.append(part + (" " if nxt[:1].isalpha() else ""))
        else:
            out.append(re.sub(r"\s+", "", part))
    return "".join(out)


def _canonical_number(s: str) -> str:
    """Plain decimal without superfluous zeros: ``18.00`` -> ``18``, ``0.50`` -> ``0.5``."""
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    neg = s.startswith("-")
    body = s[1:] if neg else s
    body = body.lstrip("0") or "0"
    if body.startswith("."):
        body = "0" + body
    return ("-" if neg and body != "0" else "") + body


def _canonical(s: str | None, drop_assignment: bool) -> str:
    if s is None:
        return ""
    s = _strip_wrappers(str(s))
    s = s.replace("\n", " ")
    for a, b in _UNICODE:
        s = s.replace(a, b)
    s = re.sub(r"(?<=\d)\{,\}(?=\d{3})", ",", s)  # 9{,}500
    s = re.sub(r"(?<=\d)\\[,!; ](?=\d{3}(?!\d))", "", s)  # 1\,000
    s = re.sub(r"(?<!\\)\\[!,;: ]|~|\\displaystyle(?![a-zA-Z])|\\q?quad(?![a-zA-Z])", " ", s)  # not \\ (a row end)
    s = re.sub(r"\\(?:left|right)\s*\.", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\(?:text|textrm|mbox|mathrm)\s*\{\s*(and|or)\s*\}", r" \1 ", s)
    s = _unwrap_commands(s, _TEXT_CMDS)
    for pattern, repl in _SYNONYMS:
        s = re.sub(pattern, repl, s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "%")
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"(?<=\d)\s*(?:percent|percentage|pct)$", "%", s)
    prev = None
    while prev != s:  # "5.4 cents", "12 square units", "\frac{270}7 degrees"
        prev = s
        s = _UNIT_RE.sub("", s).strip().rstrip(".").strip()
    # connectors of answer lists: "19, 46, and 82", "x = 2 or x = 3", "1 and 2"
    s = re.sub(r",\s*(?:and|or)\s+", ", ", s)
    s = re.sub(r"(?<=\S)\s+or\s+(?=\S)", r" \\lor ", s)
    s = re.sub(r"(?<=\S)\s+and\s+(?=\S)", r" \\land ", s)
    s = re.sub(r"^\s*(?:[a-zA-Z]|\\[a-zA-Z]+)\s*\\in(?![a-zA-Z])\s*", "", s)  # x \in [3, \infty)
    if drop_assignment:
        # Leading single-variable assignment "x = 3" (but not "x=1 or x=2"-style lists with several '=').
        m = re.match(r"^\s*(?:[a-zA-Z]|\\[a-zA-Z]+)\s*(?:_\{?\w+\}?)?\s*=(?!=)(.*)$", s)
        if m and "=" not in m.group(1):
            s = m.group(1)
    s = _remove_spaces(s)
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    m = re.fullmatch(r"\(([A-Za-z])\)", s)
    if m:  # multiple-choice "(B)"
        s = m.group(1)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)", s):
        s = _canonical_number(s.lstrip("+"))
    return s


def normalize_answer(s: str | None) -> str:
    """Canonical string of an answer; equal keys imply ``answers_equal`` (not conversely).

    Strips presentation (see the module docstring) and a leading single-variable assignment; spaces are
    removed except after a LaTeX command. Used as the Best-of-N vote key.
    """
    return _canonical(s, drop_assignment=True)


def structural_key(s: str | None) -> str:
    """Like ``normalize_answer`` but keeps a leading assignment (``y = 2x + 1``): what the symbolic layer reads,
    so that two equations can be compared as equations."""
    return _canonical(s, drop_assignment=False)


# ----------------------------------------------------------------------------------------------------------
# Fast exact path: plain numbers, multiple choice, words
# ----------------------------------------------------------------------------------------------------------

_NUM = r"-?(?:\d+\.?\d*|\.\d+)"
_FRAC_RE = re.compile(rf"^(-?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}$")
_SLASH_RE = re.compile(rf"^({_NUM})/({_NUM})$")
_SCI_RE = re.compile(rf"^({_NUM})(?:[eE]([+-]?\d+)|\\(?:times|cdot)10\^\{{?([+-]?\d+)\}}?)$")
_REPEATING_RE = re.compile(r"^(-?)(\d*)\.(\d*)\\overline\{(\d+)\}$")
_CHOICE_RE = re.compile(r"^\(?([A-J])\)(?!$)|^([A-J])$")


def _rational(body: str) -> Fraction | None:
    if re.fullmatch(_NUM, body):
        return Fraction(body)
    if (m := _FRAC_RE.match(body)) is not None:
        den = Fraction(m.group(3))
        return Fraction(m.group(2)) / den * (-1 if m.group(1) else 1) if den != 0 else None
    if (m := _SLASH_RE.match(body)) is not None:
        den = Fraction(m.group(2))
        return Fraction(m.group(1)) / den if den != 0 else None
    if (m := _SCI_RE.match(body)) is not None:
        exp = int(m.group(2) or m.group(3))
        return Fraction(m.group(1)) * Fraction(10) ** exp if abs(exp) <= 400 else None
    if (m := _REPEATING_RE.match(body)) is not None:  # 0.1\overline{6} = 1/6
        sign, whole, fixed, rep = m.groups()
        base = Fraction(f"{whole or 0}.{fixed}" if fixed else (whole or "0"))
        value = base + Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed))
        return -value if sign else value
    return None


def _as_rationals(key: str) -> set[Fraction] | None:
    """Rational values a normalised plain-number answer may denote (two for percentages), else None."""
    percent = key.endswith("%")
    value = _rational(key[:-1] if percent else key)
    if value is None:
        return None
    return {value, value / 100} if percent else {value}


def _choice(key: str) -> str | None:
    """The letter of a multiple-choice answer: ``B``, ``(B)``, ``(B) 12``, ``B) 12``."""
    m = _CHOICE_RE.match(key)
    return (m.group(1) or m.group(2)) if m else None


def _is_word(key: str) -> bool:
    return len(key) >= 2 and key.isalpha() and key.isascii()


def _fast_verdict(kp: str, kg: str) -> bool | None:
    """Verdict from the keys alone when it needs no sympy, else None (go symbolic)."""
    if kp == kg:
        return True
    rp, rg = _as_rationals(kp), _as_rationals(kg)
    if rp is not None and rg is not None:
        return bool(rp & rg)
    cp, cg = _choice(kp), _choice(kg)
    if cp is not None and cg is not None and (len(kp) == 1 or len(kg) == 1):
        return cp == cg  # a lone letter against a lettered option
    if _is_word(kp) and _is_word(kg):
        return kp.lower() == kg.lower()
    if (_is_word(kp) and len(kp) >= 3 and not _is_word(kg)) or (_is_word(kg) and len(kg) >= 3 and not _is_word(kp)):
        return False  # a word against a formula: "Evelyn" is no product of symbols
    return None


# ----------------------------------------------------------------------------------------------------------
# Worker pool running the symbolic layer under a CPU-time bound
# ----------------------------------------------------------------------------------------------------------

# One worker: a process checks answers one after another (labelling), and a warm worker's sympy caches are worth
# more than a second worker (measured with math-verify: two workers made MATH-500's checks 2x slower).
# Concurrent callers queue; each check's bound starts when a worker takes it.
_WORKERS = 1
_STARTUP_TIMEOUT_S = 180.0  # how long a check may wait for a worker to be ready, on top of its own bound
_MAX_CHARS = 2000  # longer answers are not final answers; refuse rather than feed sympy megabytes
_RETRY_FACTOR = 4.0  # a check that ran out of CPU time is retried once with this many times the bound
_MIN_WALL_S = 30.0  # wall-clock safety net: max(_MIN_WALL_S, _WALL_FACTOR * CPU bound)
_WALL_FACTOR = 20.0
_CACHE_SIZE = 1 << 16
_STAT_KEYS = ("fast", "symbolic", "cached", "cpu_timeouts", "wall_timeouts", "crashes", "retries", "undecided")
_stats = dict.fromkeys(_STAT_KEYS, 0)
_stats_lock = threading.Lock()
_cache: collections.OrderedDict[tuple[str, str, float], bool | None] = collections.OrderedDict()
_cache_lock = threading.Lock()


def verification_stats() -> dict[str, int]:
    """Counts in this process: checks decided by the fast path (``fast``) or symbolically (``symbolic``, of
    which ``cached`` came from the verdict cache), symbolic attempts stopped at the CPU bound
    (``cpu_timeouts``) or the wall-clock safety net (``wall_timeouts``), workers that died (``crashes``),
    retries with the larger bound (``retries``) and verdicts that stayed undecided (``undecided``, also
    counted for cached ones). ``timeouts`` = cpu_timeouts + wall_timeouts."""
    with _stats_lock:
        out = dict(_stats)
    out["timeouts"] = out["cpu_timeouts"] + out["wall_timeouts"]
    return out


def _bump(key: str) -> None:
    with _stats_lock:
        _stats[key] += 1


def _start_worker() -> None:
    """Pool initializer: pay the imports and the parser's first-use costs before the first bounded check, leave
    SIGPROF (the CPU-time bound) at its default action, which ends the process, and let SIGTERM kill at once
    (pebble's handler is Python code, which runs only between bytecodes: it would wait for a long C-level
    big-integer operation to return, and pebble waits 3 s before it sends SIGKILL)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGPROF"):
        signal.signal(signal.SIGPROF, signal.SIG_DFL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    from edu_prm_jax.grading import symbolic

    symbolic.answers_equivalent("y=-\\frac{1}{2}x+\\frac{3}{4}", "2x+4y-3=0")
    symbolic.answers_equivalent("x\\ge 3", "[3,\\infty)")
    symbolic.answers_equivalent("\\sqrt{8}", "2\\sqrt{2}")


def run_cpu_bounded(cpu_s: float, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with this process's CPU time bounded by ``cpu_s`` seconds (user + system time, all threads):
    ``ITIMER_PROF`` is armed first and SIGPROF, at its default action, ends the process when the bound is reached,
    also inside C code. Time spent waiting (sleeping, descheduled on a loaded machine) does not count. Meant for
    the checking worker, never for a process that must survive: there it is the caller's job to see the exit
    (code ``-SIGPROF``). Where the platform has no ITIMER_PROF, ``fn`` runs unbounded."""
    armed = hasattr(signal, "setitimer") and hasattr(signal, "ITIMER_PROF")
    if armed:
        signal.setitimer(signal.ITIMER_PROF, cpu_s)
    try:
        return fn(*args)
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_PROF, 0)


def _bounded_check(a: str, b: str, cpu_s: float) -> bool:
    """Worker side: the symbolic verdict of two structural keys, CPU-bounded by ``cpu_s``."""
    from edu_prm_jax.grading import symbolic

    return run_cpu_bounded(cpu_s, symbolic.answers_equivalent, a, b)


_pool_lock = threading.Lock()
_pool: pebble.ProcessPool | None = None


def _forget_parent_pool() -> None:
    """After a fork the parent's pool (its manager threads are gone) is neither used nor stopped by the child."""
    global _pool_lock, _pool, _cache_lock, _stats_lock
    if _pool is not None:
        # The parent's workers are not this child's children: without this, the exit handlers of multiprocessing
        # and pebble in a child that exits normally would terminate them. (multiprocessing's own children start
        # with an empty set the same way.)
        children = multiprocessing.process._children  # no public API forgets inherited children
        children.difference_update([p for p in children if p._parent_pid != os.getpid()])
    _pool_lock = threading.Lock()
    _cache_lock = threading.Lock()
    _stats_lock = threading.Lock()
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_pool)


def _stop_pool(pool: pebble.ProcessPool, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        pool.stop()
        pool.join()


def _worker_pool() -> pebble.ProcessPool:
    """This process's pool, started on first use (again after it broke). Workers are spawned, never forked: a
    fork of a process that has initialised JAX (or holds locks in other threads) is not safe."""
    global _pool
    with _pool_lock:
        if _pool is None or not _pool.active:
            if multiprocessing.current_process().daemon:
                raise RuntimeError("answers_equal: a daemonic process (a multiprocessing.Pool worker) cannot start "
                                   "the answer-checking worker; check answers from concurrent.futures pools instead")
            _pool = pebble.ProcessPool(max_workers=_WORKERS, initializer=_start_worker,
                                       context=multiprocessing.get_context("spawn"))
            # stopped at exit, also in multiprocessing children (they skip atexit but run these finalizers)
            multiprocessing.util.Finalize(None, _stop_pool, args=(_pool, os.getpid()), exitpriority=10)
        return _pool


def _wall_bound(cpu_s: float) -> float:
    return max(_MIN_WALL_S, _WALL_FACTOR * cpu_s)


def _attempt(a: str, b: str, cpu_s: float) -> tuple[bool | None, str]:
    """One bounded check in the worker: (verdict, "") or (None, why: "cpu", "wall" or "crash")."""
    future = _worker_pool().schedule(_bounded_check, args=(a, b, cpu_s), timeout=_wall_bound(cpu_s))
    try:
        return bool(future.result(timeout=_STARTUP_TIMEOUT_S + _wall_bound(cpu_s))), ""
    except concurrent.futures.TimeoutError:
        if not future.done():  # no worker became ready to take the check
            future.cancel()
            raise RuntimeError("answer-checking worker did not start (are sympy and latex2sympy2_extended "
                               "installed?)") from None
        _bump("wall_timeouts")  # pebble killed the worker at the wall bound and starts a replacement
        return None, "wall"
    except pebble.ProcessExpired as e:
        if hasattr(signal, "SIGPROF") and e.exitcode == -signal.SIGPROF:
            _bump("cpu_timeouts")  # the kernel ended the worker at its CPU bound; pebble starts a replacement
            return None, "cpu"
        _bump("crashes")  # the worker died on this pair (OOM, a crash in the parser)
        return None, f"crash ({e})"
    except concurrent.futures.process.BrokenProcessPool as e:
        raise RuntimeError(f"answer-checking worker pool is broken ({e})") from e
    except BaseException:
        future.cancel()  # e.g. KeyboardInterrupt: pebble stops the worker still running the check
        raise


def _symbolic_verdict(a: str, b: str, cpu_s: float) -> bool | None:
    """Verdict of the sorted pair (a <= b), cached; a check that runs out of CPU time is retried once with
    ``_RETRY_FACTOR`` times the bound, and is undecided (None) if it runs out again or its worker dies."""
    key = (a, b, cpu_s)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            verdict = _cache[key]
            _bump("cached")
            if verdict is None:
                _bump("undecided")
            return verdict
    verdict, why = _attempt(a, b, cpu_s)
    if verdict is None and why == "cpu":
        _bump("retries")
        verdict, why = _attempt(a, b, cpu_s * _RETRY_FACTOR)
    if verdict is None:
        _bump("undecided")
        logger.warning("answer check undecided (%s; CPU bound %.3gs, retried with %.3gs): %.80r vs %.80r", why,
                       cpu_s, cpu_s * _RETRY_FACTOR, a, b)
    with _cache_lock:
        _cache[key] = verdict
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return verdict


# ----------------------------------------------------------------------------------------------------------
# Public comparison API
# ----------------------------------------------------------------------------------------------------------


def answers_verdict(pred: str | None, gold: str | None, timeout_s: float = 2.0) -> bool | None:
    """Whether two final answers denote the same value (module docstring): True, False, or None = undecided.

    Symmetric: ``answers_verdict(a, b) == answers_verdict(b, a)`` always. ``timeout_s`` bounds the CPU time of
    the symbolic check (seconds of the worker's CPU, not wall time); one that runs out is retried once with
    ``_RETRY_FACTOR`` times the bound and is None if it runs out again or its worker dies (counted in
    ``verification_stats()``, logged). Never raises on malformed answers: a missing, empty or over-long
    (> 2000 characters) answer is False. Raises RuntimeError only when no checking worker can be started.
    """
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if len(pred) > _MAX_CHARS or len(gold) > _MAX_CHARS:
        return False
    kp, kg = normalize_answer(pred), normalize_answer(gold)
    if not kp or not kg:
        return False
    fast = _fast_verdict(kp, kg)
    if fast is not None:
        _bump("fast")
        return fast
    _bump("symbolic")
    a, b = sorted((structural_key(pred), structural_key(gold)))
    return _symbolic_verdict(a, b, float(timeout_s))


def answers_equal(pred: str | None, gold: str | None, timeout_s: float = 2.0) -> bool:
    """``answers_verdict`` as a bool for callers that need one: an undecided check is False here (use
    ``answers_verdict`` to tell undecided from unequal)."""
    return answers_verdict(pred, gold, timeout_s) is True


def solution_verdict(solution_text: str, gold_answer: str | None, timeout_s: float = 2.0) -> bool | None:
    """Outcome of a full solution: its extracted final answer against the gold answer; True, False (also when
    the solution has no final answer) or None = undecided (see ``answers_verdict``)."""
    return answers_verdict(extract_answer(solution_text), gold_answer, timeout_s)


def is_correct(solution_text: str, gold_answer: str | None) -> bool:
    """``solution_verdict`` as a bool: undecided counts as not correct here."""
    return solution_verdict(solution_text, gold_answer) is True
