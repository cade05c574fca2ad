"""Final-answer extraction and equivalence checking for outcome labels.

Labels for the PRM come from comparing a sampled solution's final answer with the gold answer, so the
checker must be lenient about notation yet never hang a data-generation worker. Three layers:

1. ``normalize_answer``: cheap string canonicalisation (majority-vote key, first equality test).
2. Exact rational arithmetic on plain numbers (ints, decimals, ``\\frac{a}{b}``, ``a/b``, percentages,
   thousands commas). Decisive when both sides are plain numbers; no sympy involved.
3. math-verify (``parse``/``verify``) with a restricted sympy ``parse_expr`` fallback for plain-text
   expressions such as ``sqrt(2)/2`` that math-verify cannot parse.

Layer 3 runs in a worker process (a one-worker ``pebble.ProcessPool``, started on first use) because
math-verify's own timeout uses ``signal.alarm``, which only works on the main thread. We call it with
``parsing_timeout=None`` and ``timeout_seconds=None`` and bound each check with pebble's per-task ``timeout``: a
worker that overruns is killed (pebble starts a replacement at once, so its import overlaps the caller's next
work), the check returns False, ``verification_stats()["timeouts"]`` is incremented and a warning is logged.
The bound covers the check itself, not the one-off worker start-up (about 1 s of imports).

The worker is started with ``spawn``, never forked from the caller (which may have initialised JAX or hold locks
in other threads), so threads and forked children can all run checks: each process has its own pool, and a fork
drops the parent's pool in the child. Like any spawned process, the worker imports the caller's main module as
``__mp_main__``: a script that checks answers needs the ``if __name__ == "__main__":`` guard. A daemonic process
(a ``multiprocessing.Pool`` worker) cannot start children, so it cannot check symbolically.

Conventions (both directions, i.e. symmetric in pred/gold):

* Percentages: ``10\\%`` equals both ``10`` and ``0.1``. MATH/GSM8K "what percent" questions give gold either
  as ``10`` or ``10\\%`` and models write either; ``0.1`` for such a question is the same quantity, and no
  benchmark item hinges on distinguishing 10 from 0.1 *via the % sign*. ``10`` vs ``0.1`` stay unequal.
* Tuples are ordered: ``(1,2)`` != ``(2,1)``; sets are not: ``\\{1,2\\}`` == ``\\{2,1\\}``. Bare
  comma lists ``1,2`` are treated as unordered (MATH "enter all solutions, separated by commas").
  Intervals compare endpoints and openness: ``[1,2)`` != ``[1,2]``.
* A leading single-variable assignment is dropped: ``x=3`` == ``3``, ``y=2x+1`` == ``2x+1``.
* Currency, degrees, ``\\text{}`` wrappers and trailing unit words are ignored: ``\\$5`` == ``5``,
  ``90^\\circ`` == ``90``, ``5.4 \\text{ cents}`` == ``5.4``; ``\\text{(B)}`` == ``B``.
* Numbers compare exactly as rationals: ``0.5`` == ``\\frac12``, ``0.33`` != ``\\frac13``;
  ``1,080`` (thousands separators) == ``1080``. A decimal vs an irrational goes to math-verify, which rounds
  to 6 decimals (``1.414214`` == ``\\sqrt2``).
* Two purely alphabetic answers of length >= 2 (``Evelyn``, ``east``) compare as case-insensitive words,
  never symbolically (sympy would treat them as commutative products, making ``Evenly`` == ``Evelyn``).
"""

from __future__ import annotations

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
from fractions import Fraction

import pebble

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_CALC_ANNOTATION_RE = re.compile(r"<<[^<>\n]*>>")


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


def _boxed_contents(text: str) -> list[str]:
    """Contents of all complete top-level ``\\boxed{..}``/``\\boxed x``/``\\fbox{..}`` in order."""
    out: list[str] = []
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
            out.append(text[i + 1 : end - 1])
            pos = end
        elif i > m.end():  # "\boxed 5": one token up to whitespace or "$"
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                out.append(tok.group(0))
            pos = i + (tok.end() if tok else 0)
        else:
            pos = m.end()


def _strip_math_delims(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def extract_answer(text: str) -> str | None:
    """Raw final answer: last complete box, else GSM8K's ``#### n``, else the last "(final) answer is ...".

    Explicit markers beat the phrase: GSM8K references say "the final answer is 15 gallons * 8 = 120 pints"
    in the body and the clean ``#### 120`` at the end.
    """
    if not text:
        return None
    text = _CALC_ANNOTATION_RE.sub("", text)  # GSM8K "<<40*0.8=32>>32" -> "32"
    boxes = _boxed_contents(text)
    if boxes:
        return boxes[-1].strip()
    hashes = list(_HASH_RE.finditer(text))
    if hashes:
        ans = hashes[-1].group(1).strip()
        if ans:
            return ans
    matches = list(_ANSWER_IS_RE.finditer(text))
    if matches:
        rest = text[matches[-1].end() :]
        line = rest.split("\n", 1)[0]
        # Sentence end: ". " or a final "." outside math (not a decimal point).
        line = re.split(r"\.(?=\s|$)(?![^$]*\$)", line, maxsplit=1)[0]
        line = re.sub(r"^\s*(?:therefore|thus|then|simply|just)\s+", "", line, flags=re.IGNORECASE)
        ans = _strip_math_delims(line.strip().rstrip(".").strip())
        if ans:
            return ans
    return None


# ----------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------

_TEXT_CMDS = (
    "\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox", "\\textnormal", "\\operatorname",
)
_UNIT_WORDS = (
    "dollars", "dollar", "cents", "cent", "units", "unit", "square units", "sq units", "degrees", "degree",
    "cm", "centimeters", "centimetres", "mm", "millimeters", "km", "kilometers", "m", "meters", "metres",
    "inches", "inch", "in", "feet", "foot", "ft", "yards", "yard", "miles", "mile", "mph", "hours", "hour",
    "minutes", "minute", "seconds", "second", "days", "day", "weeks", "years", "kg", "g", "grams", "pounds",
    "lbs", "ounces", "oz", "liters", "litres", "gallons", "people", "students", "points",
    "square feet", "square inches", "square meters", "cubic feet", "cubic units", "sq ft",
)
# A unit word must follow a number or a closing brace after whitespace ("5 m"), or be >= 3 letters ("5cm" is
# kept: it may be an algebraic product; math-verify's own unit handling still sees the raw answer).
_ALL_UNITS = "|".join(sorted((re.escape(u) for u in _UNIT_WORDS), key=len, reverse=True))
_LONG_UNITS = "|".join(sorted((re.escape(u) for u in _UNIT_WORDS if len(u) >= 3), key=len, reverse=True))
_UNIT_RE = re.compile(
    rf"(?<=[0-9}}])(?:\s+(?:{_ALL_UNITS})|\s*(?:{_LONG_UNITS}))(?:\s*\^\s*\{{?[23]\}}?)?\s*$"
)
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


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


def normalize_answer(s: str | None) -> str:
    """Canonical string of an answer; equal keys imply ``answers_equal`` (not conversely)."""
    if s is None:
        return ""
    s = _strip_math_delims(str(s))
    s = s.replace("\n", " ")
    for tok in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\displaystyle"):
        s = s.replace(tok, " ")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = _unwrap_commands(s, _TEXT_CMDS)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "%")
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"(?<=\d)\s*percent$", "%", s)
    prev = None
    while prev != s:  # "5.4 cents", "12 square units", "\frac{270}7 degrees"
        prev = s
        s = _UNIT_RE.sub("", s).strip().rstrip(".").strip()
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
    if re.fullmatch(r"-?(?:\d+\.?\d*|\.\d+)", s):
        s = _canonical_number(s)
    return s


# ----------------------------------------------------------------------------------------------------------
# Fast numeric path
# ----------------------------------------------------------------------------------------------------------

_FRAC_RE = re.compile(r"^(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}$")
_SLASH_RE = re.compile(r"^(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)$")


def _as_rationals(key: str) -> set[Fraction] | None:
    """Rational values a normalised plain-number answer may denote (two for percentages), else None."""
    percent = key.endswith("%")
    body = key[:-1] if percent else key
    value: Fraction | None = None
    if re.fullmatch(r"-?(?:\d+\.?\d*|\.\d+)", body):
        value = Fraction(body)
    elif (m := _FRAC_RE.match(body)) is not None:
        den = Fraction(m.group(3))
        if den != 0:
            value = Fraction(m.group(2)) / den * (-1 if m.group(1) else 1)
    elif (m := _SLASH_RE.match(body)) is not None:
        den = Fraction(m.group(2))
        if den != 0:
            value = Fraction(m.group(1)) / den
    if value is None:
        return None
    return {value, value / 100} if percent else {value}


def _is_word(key: str) -> bool:
    return len(key) >= 2 and key.isalpha() and key.isascii()


# ----------------------------------------------------------------------------------------------------------
# Worker pool running math-verify (a signal-free bound on every symbolic check)
# ----------------------------------------------------------------------------------------------------------

# One worker: a process checks answers one after another (labelling), and a warm worker's sympy / math-verify
# caches are worth more than a second worker (measured: two workers made MATH-500's checks 2x slower).
# Concurrent callers queue; each check's bound starts when a worker takes it.
_WORKERS = 1
_STARTUP_TIMEOUT_S = 180.0  # how long a check may wait for a worker to be ready, on top of its own bound
_MAX_CHARS = 2000  # longer answers are not final answers; refuse rather than feed sympy megabytes
_stats = {"fast": 0, "symbolic": 0, "timeouts": 0}
_stats_lock = threading.Lock()


def verification_stats() -> dict[str, int]:
    """Counts of checks decided by the fast path, by math-verify, and that timed out (in this process)."""
    with _stats_lock:
        return dict(_stats)


def _bump(key: str) -> None:
    with _stats_lock:
        _stats[key] += 1


def _start_worker() -> None:
    """Pool initializer: pay the imports before the first timed check, and let SIGTERM kill at once (pebble's
    handler is Python code, which runs only between bytecodes: it would wait for a long C-level big-integer
    operation to return, and pebble waits 3 s before it sends SIGKILL)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401
    import sympy  # noqa: F401


_pool_lock = threading.Lock()
_pool: pebble.ProcessPool | None = None


def _forget_parent_pool() -> None:
    """After a fork the parent's pool (its manager threads are gone) is neither used nor stopped by the child."""
    global _pool_lock, _pool
    if _pool is not None:
        # The parent's workers are not this child's children: without this, the exit handlers of multiprocessing
        # and pebble in a child that exits normally would terminate them. (multiprocessing's own children start
        # with an empty set the same way.)
        children = multiprocessing.process._children  # no public API forgets inherited children
        children.difference_update([p for p in children if p._parent_pid != os.getpid()])
    _pool_lock = threading.Lock()
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
                                   "the math-verify workers; check answers from concurrent.futures pools instead")
            _pool = pebble.ProcessPool(max_workers=_WORKERS, initializer=_start_worker,
                                       context=multiprocessing.get_context("spawn"))
            # stopped at exit, also in multiprocessing children (they skip atexit but run these finalizers)
            multiprocessing.util.Finalize(None, _stop_pool, args=(_pool, os.getpid()), exitpriority=10)
        return _pool


def _symbolic_equal(pred: str, gold: str, timeout_s: float) -> bool:
    future = _worker_pool().schedule(_math_verify_equal, args=(pred, gold), timeout=timeout_s)
    try:
        return future.result(timeout=_STARTUP_TIMEOUT_S + timeout_s)
    except concurrent.futures.TimeoutError:
        if not future.done():  # no worker became ready to take the check
            future.cancel()
            raise RuntimeError("math-verify worker did not start (is math-verify installed?)") from None
        _bump("timeouts")  # pebble killed the worker at the bound and starts a replacement
        logger.warning("answers_equal timed out after %.1fs: pred=%.80r gold=%.80r", timeout_s, pred, gold)
        return False
    except pebble.ProcessExpired as e:  # the worker died on this pair (OOM, a crash in the parser): judged like
        _bump("timeouts")               # an overrun check, counted, and the pool starts a replacement worker
        logger.warning("answers_equal: the checking worker died (%s): pred=%.80r gold=%.80r", e, pred, gold)
        return False
    except concurrent.futures.process.BrokenProcessPool as e:
        raise RuntimeError(f"math-verify worker pool is broken ({e})") from e
    except BaseException:
        future.cancel()  # e.g. KeyboardInterrupt: pebble stops the worker still running the check
        raise


# ----------------------------------------------------------------------------------------------------------
# Public comparison API
# ----------------------------------------------------------------------------------------------------------


def answers_equal(pred: str | None, gold: str | None, timeout_s: float = 2.0) -> bool:
    """Whether two final answers denote the same value (see module docstring for conventions).

    Never raises on malformed answers and never blocks longer than ``timeout_s`` on a symbolic check; a
    timed-out check is False and counted in ``verification_stats()["timeouts"]``.
    """
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if len(pred) > _MAX_CHARS or len(gold) > _MAX_CHARS:
        return False
    kp, kg = normalize_answer(pred), normalize_answer(gold)
    if not kp or not kg:
        return False
    if kp == kg:
        _bump("fast")
        return True
    rp, rg = _as_rationals(kp), _as_rationals(kg)
    if rp is not None and rg is not None:
        _bump("fast")
        return bool(rp & rg)
    if _is_word(kp) and _is_word(kg):
        _bump("fast")
        return kp.lower() == kg.lower()
    _bump("symbolic")
    return _symbolic_equal(pred, gold, timeout_s)


def is_correct(solution_text: str, gold_answer: str) -> bool:
    """Outcome label of a full solution: its extracted final answer equals the gold answer."""
    return answers_equal(extract_answer(solution_text), gold_answer)


# ----------------------------------------------------------------------------------------------------------
# Worker side (runs only inside the pool's worker processes)
# ----------------------------------------------------------------------------------------------------------

_SAFE_EXPR_RE = re.compile(r"^[0-9a-zA-Z+\-*/^().,\s]+$")
_SAFE_NAMES = {"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp", "E", "I"}


def _sympy_fallback(pred: str, gold: str) -> bool:
    """Plain-text expressions (``sqrt(2)/2``) via ``parse_expr`` on a whitelisted alphabet (no eval risk)."""
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)

    def to_expr(s: str):
        s = normalize_answer(s)
        if not _SAFE_EXPR_RE.match(s) or "," in s:
            return None
        names = set(re.findall(r"[a-zA-Z]+", s))
        if any(len(n) > 1 and n not in _SAFE_NAMES for n in names):
            return None
        return parse_expr(s.replace("ln", "log"), transformations=transformations)

    a, b = to_expr(pred), to_expr(gold)
    if a is None or b is None:
        return False
    return bool(sympy.simplify(a - b) == 0)


def _math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict, else the restricted sympy fallback's; malformed answers are simply unequal."""
    from math_verify import parse, verify

    def parse_any(s: str):
        for cand in (f"${s}$", f"$\\boxed{{{s}}}$", f"${normalize_answer(s)}$"):
            parsed = parse(cand, parsing_timeout=None)
            if parsed:
                return parsed
        return []

    try:
        pg, pp = parse_any(gold), parse_any(pred)
        if pg and pp and verify(pg, pp, timeout_seconds=None):
            return True
        return _sympy_fallback(pred, gold)
    except Exception:  # noqa: BLE001 - any parser or sympy failure means "not shown equal"
        return False
