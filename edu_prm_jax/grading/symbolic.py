"""Exact, symmetric equivalence of two normalised final answers (the symbolic layer of `grading.answers`).

This module runs inside the checking worker (it imports sympy and latex2sympy2_extended, about 1 s); callers use
`answers.answers_verdict`, which normalises both answers, decides the cheap cases itself and sends the rest here
under a CPU-time bound.

An answer string is read into one or more *readings* (alternatives), and two answers are equal when some reading
of one equals some reading of the other. Readings:

* ``Assign(var, value)``: ``x = 3``, ``f(x) = 2x``, ``x = 1, 2`` (a lone variable or function call on the left).
* ``Seq(kind, items)``: ``tuple`` (``(1,2,3)``, ``\\langle 1,2 \\rangle``), ``set`` (``\\{1,2\\}``, ``\\pm 3``) or
  ``list`` (bare ``1, 2``, ``2 \\lor 3``, several boxed answers); each item has its own readings.
* ``SetV(set)``: intervals and unions (``[3, \\infty)``, ``(-\\infty,1) \\cup (2,\\infty)``), ``\\emptyset``,
  ``\\mathbb{R}``; a one-variable inequality list joined by "or" is also read as the union of its solution sets.
* ``Rel(relation)``: equations and inequalities (``2x+4y-3=0``, ``x \\ge 3``, ``1 < x < 2``).
* ``Num(expr)``: a sympy expression or matrix. Decimals are read as exact rationals (``0.1`` is 1/10, never a
  binary float), ``i`` is the imaginary unit, ``e`` is Euler's number.
* ``Word(text)``: text answers (``Evelyn``), numbers in a base (``10101_2``) and anything that does not parse
  (compared as strings).

Readings with two meanings get both: ``(1, 2)`` is an ordered pair and the open interval; ``10\\%`` is 10 and
1/10. Equality of two readings (every rule is symmetric, and the pair is put in a fixed order of kinds):

* scalars: exactly equal. The difference must simplify to 0 (or, for algebraic numbers, have minimal polynomial
  ``x``); a numerical evaluation is used only to show two values *unequal* (a difference whose 30-digit value is
  not below 1e-20 is nonzero). So ``0.333`` != ``1/3`` and ``1.414214`` != ``\\sqrt2``.
* matrices: same shape, entries equal; an n-tuple equals a column or row vector with the same entries.
* tuples are ordered; sets and bare lists are not (duplicates collapse); a bare list against a tuple compares in
  written order; a tuple never equals a set. A one-item set or list (duplicates collapsed) equals its item.
* sets: intervals compare openness and endpoints; unions compare their parts. A one-variable inequality equals
  the interval or union it describes (``x \\ge 3`` == ``[3, \\infty)``); two inequalities must use the same
  variable.
* equations: equal when ``lhs - rhs`` of one is a nonzero constant multiple of the other's
  (``y = -x/2 + 3/4`` == ``2x + 4y - 3 = 0``). An assignment equals its right side (``x = 3`` == ``3``); two
  assignments to the same variable compare right sides.
* words: case-insensitive; a number in base b equals the same digits in base b or written without a base.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import sympy
from latex2sympy2_extended import latex2sympy
from latex2sympy2_extended.latex2sympy2 import ConversionConfig
from latex2sympy2_extended.math_normalization import NormalizationConfig
from sympy.parsing.sympy_parser import (
    convert_xor,
    implicit_multiplication_application,
    parse_expr,
    rationalize,
    standard_transformations,
)

_NORMALIZATION = NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=False,
                                     boxed="none", equations=False)
_CONVERSION = ConversionConfig(interpret_as_mixed_fractions=True, interpret_simple_eq_as_assignment=False,
                               interpret_contains_as_eq=True, lowercase_symbols=False)
_PLAIN_TRANSFORMS = standard_transformations + (implicit_multiplication_application, convert_xor, rationalize)
_SAFE_PLAIN_RE = re.compile(r"^[0-9a-zA-Z+\-*/^().\s]+$")
_SAFE_NAMES = {"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp", "E", "I"}
_PLAIN_HINT_RE = re.compile(r"\b(?:sqrt|pi|exp|log|ln|sin|cos|tan)\b|\*\*")
_NONZERO_EPS = sympy.Float("1e-20")
_PROBE_VALUES = (sympy.Rational(13, 7), sympy.Rational(17, 11), sympy.Rational(23, 19), sympy.Rational(29, 5))


# ------------------------------------------------------------------------------------------------ readings
@dataclasses.dataclass(frozen=True)
class Num:
    expr: Any  # sympy Expr or Matrix


@dataclasses.dataclass(frozen=True)
class Rel:
    rel: Any  # sympy Relational, or And of relationals (a chain 1 < x < 2)


@dataclasses.dataclass(frozen=True)
class SetV:
    set: Any  # sympy Set (Interval, Union, EmptySet, Reals, FiniteSet)


@dataclasses.dataclass(frozen=True)
class Seq:
    kind: str  # "tuple" (ordered), "set" or "list" (unordered)
    items: tuple  # each item: a tuple of readings


@dataclasses.dataclass(frozen=True)
class Word:
    text: str
    base: str | None = None  # "2" for 10101_2


@dataclasses.dataclass(frozen=True)
class Assign:
    var: str  # the left side as written (a variable or function call)
    value: tuple  # readings of the right side


Reading = Num | Rel | SetV | Seq | Word | Assign


# ------------------------------------------------------------------------------------------ structure
_OPENERS = {"(": ")", "[": "]"}
_TOKEN_RE = re.compile(r"\\\{|\\\}|\\langle|\\rangle|\\[a-zA-Z]+|.", re.S)


def _tokens(s: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group(0)) for m in _TOKEN_RE.finditer(s)]


def _depths(s: str) -> list[tuple[int, str, int]]:
    """(position, token, bracket depth before the token) for every token; brackets of all kinds nest together."""
    out, depth = [], 0
    for pos, tok in _tokens(s):
        if tok in ("(", "[", "{", "\\{", "\\langle"):
            out.append((pos, tok, depth))
            depth += 1
        elif tok in (")", "]", "}", "\\}", "\\rangle"):
            depth -= 1
            out.append((pos, tok, depth))
        else:
            out.append((pos, tok, depth))
    return out


def _split_top(s: str, separators: tuple[str, ...]) -> list[str]:
    """Split at depth-0 separator tokens (``,``, ``\\cup``...); one part when there is none."""
    parts, start = [], 0
    for pos, tok, depth in _depths(s):
        if depth == 0 and tok in separators:
            parts.append(s[start:pos])
            start = pos + len(tok)
    parts.append(s[start:])
    return parts


def _wrapped(s: str) -> tuple[str, str, str] | None:
    """(opening, inner, closing) when one bracket pair encloses the whole string, e.g. ``[1, 2)``."""
    toks = _depths(s)
    if len(toks) < 2:
        return None
    first, last = toks[0], toks[-1]
    if first[1] not in ("(", "[", "\\{", "\\langle") or last[1] not in (")", "]", "\\}", "\\rangle"):
        return None
    if any(depth == 0 for _, _, depth in toks[1:-1]) or last[2] != 0:
        return None
    return first[1], s[len(first[1]):last[0]], last[1]


_ASSIGN_RE = re.compile(r"^((?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?[a-zA-Z0-9]+\}?)?(?:\([a-zA-Z,]+\))?)=(?![=<>])(.*)$")
_WORD_RE = re.compile(r"^[A-Za-z]{2,}$")
_BASE_RE = re.compile(r"^([0-9A-Za-z]+)_\{?(\d+)\}?$")
_DECIMAL_RE = re.compile(r"(?<![\d.])(\d*)\.(\d+)(?![\d.])")


def parse_readings(s: str) -> tuple[Reading, ...]:
    """All readings of one normalised answer (`answers.structural_key` output); () when nothing parses."""
    s = s.strip()
    if not s:
        return ()
    m = _ASSIGN_RE.match(s)
    if m and "=" not in m.group(2) and m.group(2):
        value = parse_readings(m.group(2))
        return (Assign(m.group(1), value),) if value else ()
    union = _split_top(s, ("\\cup",))
    if len(union) > 1:
        sets = [_as_set_reading(parse_readings(p)) for p in union]
        return (SetV(sympy.Union(*sets)),) if all(x is not None for x in sets) else (Word(s),)
    w = _wrapped(s)
    if w is not None:
        return _wrapped_readings(*w)
    for seps, kind in (((",", ";", "\\lor"), "or"), (("\\land",), "and")):
        parts = _split_top(s, seps)
        if len(parts) > 1:
            items = tuple(parse_readings(p) for p in parts)
            if not all(items):
                return (Word(s),)
            return _list_readings(items, kind)
    return _atom_readings(s)


def _wrapped_readings(opening: str, inner: str, closing: str) -> tuple[Reading, ...]:
    parts = _split_top(inner, (",", ";"))
    if opening == "\\{":
        if not inner.strip():
            return (SetV(sympy.EmptySet),)
        items = tuple(parse_readings(p) for p in parts)
        return (Seq("set", items),) if all(items) else ()
    if opening == "\\langle" or closing == "\\rangle":
        items = tuple(parse_readings(p) for p in parts)
        return (Seq("tuple", items),) if all(items) else ()
    if len(parts) == 1:  # (3), [x+1]: grouping
        return parse_readings(inner) if opening == "(" and closing == ")" else _atom_readings(opening + inner + closing)
    items = tuple(parse_readings(p) for p in parts)
    if not all(items):
        return ()
    out: list[Reading] = []
    if opening == "(" and closing == ")":
        out.append(Seq("tuple", items))
    if len(parts) == 2:
        interval = _interval(items[0], items[1], opening == "(", closing == ")")
        if interval is not None:
            out.append(SetV(interval))
    if not out:
        out.append(Seq("tuple", items))  # [1, 2, 3], or [2, 1] which is no interval
    return tuple(out)


def _interval(lo: tuple, hi: tuple, left_open: bool, right_open: bool) -> Any:
    a, b = _scalar(lo), _scalar(hi)
    if a is None or b is None:
        return None
    try:
        iv = sympy.Interval(a, b, left_open, right_open)
    except Exception:  # noqa: BLE001 - sympy refuses e.g. non-real endpoints: not an interval
        return None
    return iv if isinstance(iv, sympy.Interval) else None


def _scalar(readings: tuple) -> Any:
    for r in readings:
        if isinstance(r, Num) and not isinstance(r.expr, sympy.MatrixBase):
            return r.expr
    return None


def _list_readings(items: tuple, joined_by: str) -> tuple[Reading, ...]:
    out: list[Reading] = []
    rels = [_scalar_rel(it) for it in items]
    if all(r is not None and not isinstance(r, sympy.Eq) for r in rels):
        syms = {frozenset(r.free_symbols) for r in rels}
        if len(syms) == 1 and len(next(iter(syms))) == 1:
            sets = [_rel_as_set(r) for r in rels]
            if all(x is not None for x in sets):
                out.append(SetV(sympy.Union(*sets) if joined_by == "or" else sympy.Intersection(*sets)))
    out.append(Seq("list", items))
    return tuple(out)


def _scalar_rel(readings: tuple) -> Any:
    for r in readings:
        if isinstance(r, Rel):
            return r.rel
    return None


def _as_set_reading(readings: tuple) -> Any:
    for r in readings:
        if isinstance(r, SetV):
            return r.set
        if isinstance(r, Rel):
            s = _rel_as_set(r.rel)
            if s is not None:
                return s
        if isinstance(r, Seq) and r.kind == "set":
            values = [_scalar(it) for it in r.items]
            if all(v is not None for v in values):
                return sympy.FiniteSet(*values)
    return None


def _atom_readings(s: str) -> tuple[Reading, ...]:
    if s.endswith("%"):
        inner = _atom_readings(s[:-1])
        out: list[Reading] = []
        for r in inner:
            if isinstance(r, Num) and not isinstance(r.expr, sympy.MatrixBase):
                out += [r, Num(r.expr / 100)]
        return tuple(out) or (Word(s),)
    if _WORD_RE.match(s):
        return (Word(s),)
    m = _BASE_RE.match(s)
    if m and not m.group(1).isalpha():
        return (Word(m.group(1), m.group(2)),)
    if ":" in s or "\\ldots" in s or "\\cdots" in s or "\\dots" in s:
        return (Word(s),)  # ratios, clock times, sequences: compared as written
    expr = _parse_expression(s)
    if expr is None:
        return (Word(s),)
    return _from_sympy(expr)


def _rational_decimals(s: str) -> str:
    """``1.25`` -> ``(\\frac{125}{100})``: decimals are exact rationals, never binary floats."""
    def repl(m: re.Match) -> str:
        whole, frac = m.group(1) or "0", m.group(2)
        return f"(\\frac{{{int(whole + frac)}}}{{{10 ** len(frac)}}})"
    return _DECIMAL_RE.sub(repl, s)


def _parse_expression(s: str) -> Any:
    """sympy object of one LaTeX (or plain-text) expression, or None when neither parser reads all of it."""
    plain = "\\" not in s and bool(_PLAIN_HINT_RE.search(s))
    order = (_parse_plain, _parse_latex) if plain else (_parse_latex, _parse_plain)
    for parse in order:
        try:
            expr = parse(s)
        except Exception:  # noqa: BLE001 - a parser that cannot read the answer: try the other
            expr = None
        if expr is not None:
            return expr
    return None


def _parse_latex(s: str) -> Any:
    return latex2sympy(_rational_decimals(s), normalization_config=_NORMALIZATION, conversion_config=_CONVERSION)


def _parse_plain(s: str) -> Any:
    if not _SAFE_PLAIN_RE.match(s):
        return None
    names = set(re.findall(r"[a-zA-Z]+", s))
    if any(len(n) > 1 and n not in _SAFE_NAMES for n in names):
        return None
    return parse_expr(s.replace("ln", "log"), transformations=_PLAIN_TRANSFORMS)  # decimals -> Rational


def _clean(expr: Any) -> Any:
    """Imaginary unit for the symbol ``i``; exact rationals for any float a parser still produced."""
    if isinstance(expr, sympy.MatrixBase):
        return expr.applyfunc(_clean)
    if not isinstance(expr, sympy.Basic):
        return expr
    i = sympy.Symbol("i")
    if i in expr.free_symbols:
        expr = expr.subs(i, sympy.I)
    floats = expr.atoms(sympy.Float)
    if floats:
        expr = expr.xreplace({f: sympy.Rational(str(f)) for f in floats})
    return expr


def _from_sympy(expr: Any) -> tuple[Reading, ...]:
    if isinstance(expr, sympy.MatrixBase):
        return (Num(_clean(expr)),)
    if isinstance(expr, sympy.Tuple):
        return (Seq("tuple", tuple(_from_sympy(e) for e in expr.args)),)
    if isinstance(expr, sympy.FiniteSet):
        items = getattr(expr, "_unsorted_args", expr.args)
        return (Seq("set", tuple(_from_sympy(e) for e in items)),)
    if isinstance(expr, sympy.Set):
        return (SetV(expr),)
    if isinstance(expr, sympy.Eq) and isinstance(expr.rhs, (sympy.Set, sympy.Tuple)):  # x \in S
        return _from_sympy(expr.rhs)
    if isinstance(expr, (sympy.core.relational.Relational, sympy.And)):
        return (Rel(_clean(expr)),)
    if isinstance(expr, sympy.Basic) and (expr.has(sympy.zoo) or expr.has(sympy.nan)):
        return ()
    if isinstance(expr, sympy.Basic) and not isinstance(expr, sympy.Expr):
        return ()
    return (Num(_clean(expr)),)


# ------------------------------------------------------------------------------------------ equality
_RANK = {Assign: 0, Word: 1, Seq: 2, SetV: 3, Rel: 4, Num: 5}


def answers_equivalent(a: str, b: str) -> bool:
    """Whether two normalised answers (`answers.structural_key`) denote the same thing (module docstring)."""
    return readings_equal(parse_readings(a), parse_readings(b))


def readings_equal(ra: tuple, rb: tuple) -> bool:
    """Some reading of one equals some reading of the other."""
    return any(_equal(x, y) for x in ra for y in rb)


def _equal(a: Reading, b: Reading) -> bool:
    if _RANK[type(a)] > _RANK[type(b)]:
        a, b = b, a
    if isinstance(a, Assign):
        return _assign_equal(a, b)
    if isinstance(a, Word):
        if not isinstance(b, Word):
            return _base_number_equal(a, b)
        if a.base is not None or b.base is not None:
            return a.text.lower() == b.text.lower() and (a.base is None or b.base is None or a.base == b.base)
        return a.text.casefold() == b.text.casefold()
    if isinstance(a, Seq):
        return _seq_equal(a, b)
    if isinstance(a, SetV):
        if isinstance(b, SetV):
            return _sets_equal(a.set, b.set)
        if isinstance(b, Rel):
            s = _rel_as_set(b.rel)
            return s is not None and _sets_equal(a.set, s)
        return False
    if isinstance(a, Rel):
        return isinstance(b, Rel) and _relations_equal(a.rel, b.rel)
    return _scalars_equal(a.expr, b.expr)


def _base_number_equal(w: Word, other: Reading) -> bool:
    """``10101_2`` against a plain ``10101``: the same digits written without the base."""
    if w.base is None or not isinstance(other, Num):
        return False
    return isinstance(other.expr, sympy.Integer) and str(other.expr) == w.text


def _assign_equal(a: Assign, b: Reading) -> bool:
    if isinstance(b, Assign):
        if a.var == b.var:
            return readings_equal(a.value, b.value)
        ea, eb = _assign_as_eq(a), _assign_as_eq(b)
        return ea is not None and eb is not None and _equations_equal(ea, eb)
    if isinstance(b, Rel) and isinstance(b.rel, sympy.Eq):
        ea = _assign_as_eq(a)
        return ea is not None and _equations_equal(ea, b.rel)
    return readings_equal(a.value, (b,))


def _assign_as_eq(a: Assign) -> Any:
    value = _scalar(a.value)
    if value is None:
        return None
    try:
        lhs = _parse_latex(a.var)
    except Exception:  # noqa: BLE001 - a left side latex2sympy cannot read is no equation
        return None
    return sympy.Eq(_clean(lhs), value, evaluate=False)


def _seq_equal(a: Seq, b: Reading) -> bool:
    if isinstance(b, Seq):
        if a.kind == b.kind == "tuple" or {a.kind, b.kind} == {"tuple", "list"}:
            return len(a.items) == len(b.items) and all(readings_equal(x, y) for x, y in zip(a.items, b.items))
        if "tuple" in (a.kind, b.kind):
            return False
        return _unordered_equal(a.items, b.items)
    items = _dedupe(a.items)
    if a.kind != "tuple" and len(items) == 1:  # {3}, or one value boxed twice in two forms
        return readings_equal(items[0], (b,))
    if isinstance(b, SetV):
        s = _as_set_reading((a,)) if a.kind != "tuple" else None
        return s is not None and _sets_equal(s, b.set)
    if isinstance(b, Num) and isinstance(b.expr, sympy.MatrixBase) and a.kind != "set":
        if 1 not in b.expr.shape or len(b.expr) != len(a.items):
            return False
        return all(readings_equal(x, (Num(v),)) for x, v in zip(a.items, list(b.expr)))
    return False


def _dedupe(items: tuple) -> list:
    """Items with repeated values (by exact equality) kept once, in order."""
    out: list = []
    for it in items:
        if not any(readings_equal(it, o) for o in out):
            out.append(it)
    return out


def _unordered_equal(xs: tuple, ys: tuple) -> bool:
    """Equal as sets: duplicates collapse, then the items pair off one to one (a perfect bipartite matching:
    readings with two meanings, like 10% = 10 and 10% = 0.1, make equality non-transitive, so greedy is not
    enough)."""
    xs_, ys_ = _dedupe(xs), _dedupe(ys)
    if len(xs_) != len(ys_):
        return False
    return _perfect_matching([[readings_equal(x, y) for y in ys_] for x in xs_])


def _perfect_matching(edges: list[list[bool]]) -> bool:
    """Whether a square boolean adjacency matrix has a perfect matching (Kuhn's augmenting paths)."""
    match_of_col: dict[int, int] = {}

    def augment(row: int, seen: set[int]) -> bool:
        for col, ok in enumerate(edges[row]):
            if ok and col not in seen:
                seen.add(col)
                if col not in match_of_col or augment(match_of_col[col], seen):
                    match_of_col[col] = row
                    return True
        return False

    return all(augment(row, set()) for row in range(len(edges)))


def _rel_as_set(rel: Any) -> Any:
    """Solution set over the reals of a one-variable inequality (or chain); None otherwise."""
    if isinstance(rel, sympy.Eq) or len(rel.free_symbols) != 1:
        return None
    try:
        return rel.as_set()
    except Exception:  # noqa: BLE001 - sympy cannot solve it: not comparable as a set
        return None


def _sets_equal(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, sympy.Interval) and isinstance(b, sympy.Interval):
        return (a.left_open == b.left_open and a.right_open == b.right_open and _scalars_equal(a.start, b.start)
                and _scalars_equal(a.end, b.end))
    if isinstance(a, sympy.FiniteSet) and isinstance(b, sympy.FiniteSet):
        return _unordered_equal(tuple((Num(x),) for x in a.args), tuple((Num(y),) for y in b.args))
    if isinstance(a, sympy.Union) and isinstance(b, sympy.Union):
        return len(a.args) == len(b.args) and _perfect_matching([[_sets_equal(x, y) for y in b.args] for x in a.args])
    return False


def _relations_equal(a: Any, b: Any) -> bool:
    if isinstance(a, sympy.Eq) or isinstance(b, sympy.Eq):
        return isinstance(a, sympy.Eq) and isinstance(b, sympy.Eq) and _equations_equal(a, b)
    if a.free_symbols == b.free_symbols and len(a.free_symbols) == 1:
        sa, sb = _rel_as_set(a), _rel_as_set(b)
        if sa is not None and sb is not None:
            return _sets_equal(sa, sb)
    na, nb = _inequality_normal(a), _inequality_normal(b)
    if na is None or nb is None or na[1] != nb[1]:
        return False
    ratio = _constant_ratio(na[0], nb[0])
    return ratio is not None and bool(ratio > 0)


def _inequality_normal(rel: Any) -> tuple[Any, bool] | None:
    """``a < b`` -> (b - a, strict): the relation says expr > 0 (strict) or expr >= 0."""
    if isinstance(rel, (sympy.StrictLessThan, sympy.LessThan)):
        return rel.rhs - rel.lhs, isinstance(rel, sympy.StrictLessThan)
    if isinstance(rel, (sympy.StrictGreaterThan, sympy.GreaterThan)):
        return rel.lhs - rel.rhs, isinstance(rel, sympy.StrictGreaterThan)
    return None


def _equations_equal(a: Any, b: Any) -> bool:
    """Same solution set as lhs - rhs = 0, shown by a nonzero constant ratio of the two differences."""
    da, db = a.lhs - a.rhs, b.lhs - b.rhs
    if da == 0 or db == 0:
        return _scalars_equal(da, db)
    if da.free_symbols != db.free_symbols:
        return False
    ratio = _constant_ratio(da, db)
    return ratio is not None and ratio != 0


def _constant_ratio(x: Any, y: Any) -> Any:
    """x / y when it is a finite constant (no free symbols), else None."""
    try:
        ratio = sympy.cancel(sympy.together(x / y))
        if ratio.free_symbols:
            ratio = sympy.simplify(ratio)
    except Exception:  # noqa: BLE001 - sympy could not divide: no constant ratio shown
        return None
    if ratio.free_symbols or not ratio.is_finite or ratio.has(sympy.nan, sympy.zoo):
        return None
    return ratio


def _scalars_equal(a: Any, b: Any) -> bool:
    """Exact equality of two expressions (or matrices); numerics only ever show inequality."""
    if isinstance(a, sympy.MatrixBase) or isinstance(b, sympy.MatrixBase):
        if not (isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase)) or a.shape != b.shape:
            return False
        return all(_scalars_equal(x, y) for x, y in zip(a, b))
    try:
        if a == b:
            return True
        if a.has(sympy.oo, -sympy.oo, sympy.zoo) or b.has(sympy.oo, -sympy.oo, sympy.zoo):
            return False  # infinities are equal only as the same object (oo == oo, -oo == -oo)
        diff = a - b
        if diff.is_Rational:
            return diff == 0
        if not _may_be_zero(diff):
            return False
        if sympy.simplify(diff) == 0:
            return True
        if not diff.free_symbols and diff.is_algebraic:
            x = sympy.Dummy("x")
            return sympy.minimal_polynomial(diff, x) == x
    except Exception:  # noqa: BLE001 - sympy failed on this pair: not shown equal
        return False
    return False


def _may_be_zero(diff: Any) -> bool:
    """False when numerical evaluation shows `diff` nonzero (at fixed probe points for its free symbols)."""
    syms = sorted(diff.free_symbols, key=lambda s: s.name)
    points = [dict(zip(syms, _PROBE_VALUES[k:] + _PROBE_VALUES[:k])) for k in range(2)] if syms else [{}]
    for point in points:
        try:
            value = diff.evalf(30, subs=point) if point else diff.evalf(30)
        except Exception:  # noqa: BLE001 - cannot evaluate: no evidence either way
            continue
        if not value.is_number:
            continue
        magnitude = sympy.Abs(value).evalf(30)
        if magnitude.is_Number and magnitude.is_finite and magnitude > _NONZERO_EPS:
            return False
    return True

