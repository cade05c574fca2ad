"""Typed JSONL records: one pydantic model per inter-stage file, read with errors naming file, line and field.

Why one codec: the schema of a file between stages is written once, as its record type; the writer builds that
type and every reader gets it validated, so a bad line fails here (a DataError `path:line: field 'x': ...`) and
not as a KeyError three stages later. Lines come from `io.jsonl.json_lines`, which turns every malformed line
(bad UTF-8, a number of 5000 digits, nesting deeper than the parser's recursion limit) into a DataError too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PlainValidator, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from edu_prm_jax.io.jsonl import DataError, PathLike, is_json_instance, json_lines
from edu_prm_jax.io.shards import shard_paths

TokenId = NonNegativeInt

# pydantic error type -> the JSON type it expected (messages say "expected int, got bool" as io.jsonl's do)
_EXPECTED = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool",
             "list_type": "list", "dict_type": "object", "model_type": "object", "model_attributes_type": "object"}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def one_of(*types: type) -> PlainValidator:
    """A validator for a field that may hold any of `types` (e.g. an id that is a str or an int), passed through
    unchanged so that what is written is exactly what was given."""
    expected = " | ".join("null" if t is type(None) else t.__name__ for t in types)

    def check(value: Any) -> Any:
        if not is_json_instance(value, types):
            raise PydanticCustomError("json_type", "expected {expected}, got {got}",
                                      {"expected": expected, "got": _type_name(value)})
        return value

    return PlainValidator(check)


def field_path(loc: tuple[int | str, ...]) -> str | None:
    """``('leaves', 2, 'anchors', 0)`` -> ``'leaves[2].anchors[0]'`` (the form the project's messages use)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def data_error(error: ValidationError) -> DataError:
    """The first problem pydantic found, as a DataError naming its field path (the reader adds file and line)."""
    first = error.errors(include_url=False)[0]
    kind = first["type"]
    if kind == "missing":
        message = "missing required field"
    elif kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {_type_name(first.get('input'))}"
    else:
        message = first["msg"]
    more = error.error_count() - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''} in this record)"
    return DataError(message, field=field_path(tuple(first["loc"])))


class Record(BaseModel):
    """Base of the inter-stage records.

    Strict JSON types (a JSON true is not an int, a string is not a list; an int is a fine float). Extra fields
    are kept, so a reader accepts what a newer writer adds. A field that has a default may also be null (read as
    the default), as the hand-written schemas allowed.
    """

    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(v is None for v in data.values()):
            fields = cls.model_fields
            data = {k: v for k, v in data.items() if not (v is None and k in fields and not fields[k].is_required())}
        return data

    def to_json(self) -> dict[str, Any]:
        """The on-disk layout: fields in declaration order (the key order writers always used), extras after."""
        return self.model_dump(mode="python")


R = TypeVar("R", bound=Record)


def parse_record(record_type: type[R], value: Any) -> R:
    """Validate one decoded JSON value as `record_type`; a failure is a DataError naming the field."""
    try:
        return record_type.model_validate(value)
    except ValidationError as e:
        raise data_error(e) from None


def read_records(path: PathLike, record_type: type[R]) -> Iterator[R]:
    """The records of one JSONL file, each validated as `record_type`; errors name the file, line and field."""
    for lineno, value in json_lines(path):
        try:
            yield parse_record(record_type, value)
        except DataError as e:
            raise e.located(path, line=lineno) from None


def read_record_shards(directory: PathLike, prefix: str, record_type: type[R], made_by: str = "") -> Iterator[R]:
    """The records of all `prefix` shards of `directory` in shard order, validated as `record_type`."""
    for path in shard_paths(directory, prefix, made_by):
        yield from read_records(path, record_type)
