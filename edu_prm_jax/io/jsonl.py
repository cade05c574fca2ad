"""Validated JSONL reading: every bad line fails with the file, the 1-based line and the field.

Why: every stage of the pipeline hands its output to the next as files. A bad line must fail loudly with the
file, the line and the field (not a KeyError three stages later).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from edu_prm_jax.io import storage

PathLike = str | os.PathLike
UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """Bad input data; the message names the file, the location (1-based line or item) and the field."""

    def __init__(
        self,
        message: str,
        *,
        path: PathLike | None = None,
        line: int | None = None,
        item: int | None = None,
        field: str | None = None,
    ):
        self.message, self.path, self.line, self.item, self.field = message, path, line, item, field
        super().__init__(self._format())

    def _format(self) -> str:
        where = str(self.path) if self.path is not None else "<record>"
        if self.line is not None:
            where += f":{self.line}"
        if self.item is not None:
            where += f" item {self.item}"
        parts = [where] + ([f"field '{self.field}'"] if self.field is not None else []) + [self.message]
        return ": ".join(parts)

    def located(self, path: PathLike, line: int | None = None, item: int | None = None) -> DataError:
        """The same error with the location filled in (validators do not know where the record came from)."""
        return DataError(
            self.message,
            path=self.path if self.path is not None else path,
            line=self.line if self.line is not None else line,
            item=self.item if self.item is not None else item,
            field=self.field,
        )


class ListOf:
    """A list field whose elements all have the given type(s), e.g. ``ListOf(str)`` for ProcessBench steps."""

    def __init__(self, types: type | tuple[type, ...]):
        self.types = types if isinstance(types, tuple) else (types,)

    def __repr__(self) -> str:
        return f"list[{_type_names(self.types)}]"


TypeSpec = type | tuple[type, ...] | ListOf


def _type_names(types: tuple[type, ...]) -> str:
    return " | ".join("None" if t is type(None) else t.__name__ for t in types)


def is_json_instance(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance with JSON's rules: a `true` is not a count (bool is an int in Python); an int is a fine float
    (JSON writes 1.0 as 1)."""
    if isinstance(value, bool) and bool not in types:
        return False
    if isinstance(value, int) and not isinstance(value, bool) and float in types and int not in types:
        return True  # JSON writes 1.0 as 1; an int is a fine float
    return isinstance(value, types)


def check_type(value: Any, field: str, types: TypeSpec, where: str = "") -> None:
    """Raise DataError unless `value` matches `types` (a type, a tuple of types, or a ListOf)."""
    prefix = f"{where}: " if where else ""
    if isinstance(types, ListOf):
        if not isinstance(value, list):
            raise DataError(f"{prefix}expected {types!r}, got {type(value).__name__}", field=field)
        for i, element in enumerate(value):
            if not is_json_instance(element, types.types):
                raise DataError(
                    f"{prefix}expected {types!r}, element {i} is {type(element).__name__}", field=field
                )
        return
    tup = types if isinstance(types, tuple) else (types,)
    if not is_json_instance(value, tup):
        raise DataError(f"{prefix}expected {_type_names(tup)}, got {type(value).__name__}", field=field)


def require(record: Mapping[str, Any], field: str, types: TypeSpec, where: str = "") -> Any:
    """Return ``record[field]`` after checking it exists and has the expected type."""
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", field=field)
    if field not in record:
        raise DataError(f"{where + ': ' if where else ''}missing required field", field=field)
    value = record[field]
    check_type(value, field, types, where)
    return value


def optional(record: Mapping[str, Any], field: str, types: TypeSpec, default: Any = None, where: str = "") -> Any:
    """Return ``record[field]`` (type-checked) or `default` when the field is absent or null."""
    value = record.get(field)
    if value is None:
        return default
    check_type(value, field, types, where)
    return value


class Schema:
    """A record schema written as data: ``Schema({"id": (str, int), "problem": str}, optional={...})``.

    `required` fields must be present with a matching type; `optional` fields may be absent or null.
    Extra fields are allowed (sources carry metadata we pass through).
    """

    def __init__(self, required: Mapping[str, TypeSpec], optional: Mapping[str, TypeSpec] | None = None):
        self.required = dict(required)
        self.optional = dict(optional or {})

    def validate(self, record: Any) -> None:
        if not isinstance(record, Mapping):
            raise DataError(f"expected a JSON object, got {type(record).__name__}")
        for field, types in self.required.items():
            require(record, field, types)
        for field, types in self.optional.items():
            if record.get(field) is not None:
                check_type(record[field], field, types)

    __call__ = validate


def _is_blank(raw: bytes) -> bool:
    # what `json_lines` skips: undecodable bytes become U+FFFD, which is not whitespace
    return not raw.decode("utf-8", errors="replace").strip()


def json_lines(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line, object) for each non-blank line; any line that is not a UTF-8 JSON object is a DataError.

    Why our own line reader: a file may be truncated or corrupted (bad UTF-8, a number of 5000 digits, nesting
    deeper than the parser's recursion limit); each such line must end in a DataError naming the file and line,
    never in another exception. A UTF-8 byte-order mark at the start of the file is skipped."""
    with storage.as_path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]  # an encoding mark some editors write, not content
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 (byte {e.start + 1} of the line)", path=path, line=lineno) from None
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, line=lineno) from None
            except (ValueError, RecursionError) as e:  # a number too long to convert, nesting too deep
                raise DataError(f"invalid JSON ({type(e).__name__}: {str(e)[:120]})", path=path,
                                line=lineno) from None
            if not isinstance(value, dict):
                got = "null" if value is None else type(value).__name__
                raise DataError(f"expected a JSON object, got {got}", path=path, line=lineno)
            yield lineno, value


def count_records(path: PathLike) -> int:
    """Non-blank lines of a JSONL file (the records `read_records` yields, or fails on), without parsing them."""
    with storage.as_path(path).open("rb") as f:
        return sum(1 for raw in f if not _is_blank(raw))


def record_lines(path: PathLike) -> list[int]:
    """The 1-based line of each record of a JSONL file (its non-blank lines), for messages that name a record
    found by position, e.g. the first of two duplicates."""
    with storage.as_path(path).open("rb") as f:
        return [lineno for lineno, raw in enumerate(f, start=1) if not _is_blank(raw)]


def read_jsonl(path: PathLike, validate: Callable[[dict], None] | None = None) -> Iterator[dict]:
    """Yield one dict per non-blank line (`json_lines`); a failed `validate` raises DataError at that line."""
    for lineno, record in json_lines(path):
        if validate is not None:
            try:
                validate(record)
            except DataError as e:
                raise e.located(path, line=lineno) from None
        yield record
