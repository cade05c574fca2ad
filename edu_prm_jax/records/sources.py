"""Readers for the public math datasets, yielding uniform dicts the rest of the pipeline understands.

Why one module: each dataset has its own quirks (GSM8K hides the answer after ``####``, PRM800K concatenates
pretty-printed JSON objects, Math-Shepherd encodes step labels inside a copy of the text). Each reader
validates the raw record and fails with the file, the line (or array item) and the field.

Question sources (MATH, GSM8K, generic JSONL) yield
``{"id": str, "problem": str, "answer": str | None, "solution": str | None, "source": str, ...}``;
step-labelled sources (ProcessBench, PRM800K, Math-Shepherd) add ``"steps": list[str]`` and their labels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from etils import epath

from edu_prm_jax.io import storage
from edu_prm_jax.io.jsonl import DataError, ListOf, PathLike, Schema, optional, read_jsonl, record_lines, require
from edu_prm_jax.io.tfds import MISSING_RATING, write_tfds_dataset

MATH_SCHEMA = Schema({"problem": str, "answer": (str, int, float)}, optional={"solution": str, "unique_id": str})
GSM8K_SCHEMA = Schema({"question": str, "answer": str})
GENERIC_SCHEMA = Schema({"id": (str, int)}, optional={"answer": (str, int, float), "solution": str})
PROCESSBENCH_SCHEMA = Schema(
    {
        "id": str,
        "generator": str,
        "problem": str,
        "steps": ListOf(str),
        "final_answer_correct": bool,
        "label": int,
    }
)
MATH_SHEPHERD_SCHEMA = Schema({"input": str, "label": str}, optional={"task": str, "id": (str, int)})
QUESTION_SCHEMA = Schema(
    {"id": str, "problem": str, "source": str}, optional={"answer": str, "solution": str}
)

MATH_SHEPHERD_TAG = "ки"
_SHEPHERD_STEP_PREFIX = re.compile(r"^\s*Step \d+:\s*")


def _answer_text(value: Any) -> str | None:
    return None if value is None else str(value)


# ------------------------------------------------------------------------------------- question sources
def read_math_jsonl(path: PathLike, source: str = "math") -> Iterator[dict]:
    """MATH-style JSONL (e.g. MATH-500: problem, solution, answer, subject, level, unique_id)."""
    stem = storage.as_path(path).stem
    for i, r in enumerate(read_jsonl(path, MATH_SCHEMA)):
        out = {
            "id": str(r.get("unique_id") or f"{source}-{stem}-{i}"),
            "problem": r["problem"],
            "answer": _answer_text(r["answer"]),
            "solution": r.get("solution"),
            "source": source,
        }
        out.update({k: r[k] for k in ("subject", "level") if k in r})
        yield out


def split_gsm8k_answer(answer: str) -> tuple[str, str]:
    """GSM8K's answer field is ``<worked solution>\\n#### <final answer>``; return (solution, final)."""
    if answer.count("####") != 1:
        raise DataError("expected exactly one '#### <answer>' marker", field="answer")
    solution, final = answer.split("####")
    final = final.strip()
    if not final:
        raise DataError("empty final answer after '####'", field="answer")
    return solution.strip(), final


def read_gsm8k_jsonl(path: PathLike, split: str | None = None) -> Iterator[dict]:
    """GSM8K JSONL (question, answer). ids are ``gsm8k-<split>-<0-based line index>``; split = file stem."""
    split = split or storage.as_path(path).stem

    def validate(r: dict) -> None:
        GSM8K_SCHEMA.validate(r)
        split_gsm8k_answer(r["answer"])

    for i, r in enumerate(read_jsonl(path, validate)):
        solution, final = split_gsm8k_answer(r["answer"])
        yield {"id": f"gsm8k-{split}-{i}", "problem": r["question"], "answer": final,
               "solution": solution, "source": "gsm8k"}


def read_generic_jsonl(path: PathLike, source: str | None = None) -> Iterator[dict]:
    """Any JSONL with ``id`` and ``problem`` (or ``question``); answer/solution optional; extras kept."""
    source = source or storage.as_path(path).stem

    def validate(r: dict) -> None:
        GENERIC_SCHEMA.validate(r)
        if "problem" not in r and "question" not in r:
            raise DataError("missing required field (the question text; 'question' is accepted too)",
                            field="problem")
        require(r, "problem" if "problem" in r else "question", str)

    for r in read_jsonl(path, validate):
        out = dict(r)
        out.pop("question", None)
        out.update(
            id=str(r["id"]),
            problem=r["problem"] if "problem" in r else r["question"],
            answer=_answer_text(r.get("answer")),
            solution=r.get("solution"),
            source=r.get("source") if isinstance(r.get("source"), str) else source,
        )
        yield out


# -------------------------------------------------------------------------------- step-labelled sources
def _load_json_document(path: PathLike) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, line=e.lineno) from None


def read_processbench(path: PathLike) -> Iterator[dict]:
    """ProcessBench JSON: one array of {id, generator, problem, steps, final_answer_correct, label}.

    ``label`` is the 0-based index of the earliest wrong step, or -1 when every step is correct.
    Errors name the 0-based array item.
    """
    data = _load_json_document(path)
    if not isinstance(data, list):
        raise DataError(f"expected a JSON array of items, got {type(data).__name__}", path=path)
    subset = storage.as_path(path).stem
    for i, r in enumerate(data):
        try:
            PROCESSBENCH_SCHEMA.validate(r)
            if not -1 <= r["label"] < len(r["steps"]):
                raise DataError(f"label {r['label']} outside [-1, {len(r['steps'])})", field="label")
        except DataError as e:
            raise e.located(path, item=i) from None
        yield {**r, "answer": None, "solution": None, "source": f"processbench-{subset}"}


def iter_concatenated_json(path: PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (1-based start line, object) for a file of one or more concatenated JSON values."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=path, line=e.lineno) from None
        yield line, obj


def _prm800k_steps(label: dict) -> tuple[list[str], list[int | None], list[bool]]:
    """Follow the trajectory the labeller actually took through PRM800K's per-step alternatives.

    Per step: the chosen completion if there is one, else the human-written replacement (which carries no
    rating). A final step with neither is kept only when its first completion is rated -1: that is where
    the labeller stopped at an error (phase 2 ``found_error``); otherwise the trajectory ends before it.
    """
    steps, ratings, human = [], [], []
    raw_steps = require(label, "steps", list)
    for k, step in enumerate(raw_steps):
        where = f"label.steps[{k}]"
        if not isinstance(step, dict):
            raise DataError(f"{where}: expected an object", field="label.steps")
        completions = require(step, "completions", list, where)
        for j, c in enumerate(completions):
            if not isinstance(c, dict):
                raise DataError(f"{where}.completions[{j}]: expected an object", field="completions")
            require(c, "text", str, f"{where}.completions[{j}]")
            optional(c, "rating", int, where=f"{where}.completions[{j}]")
        chosen = optional(step, "chosen_completion", int, where=where)
        human_completion = optional(step, "human_completion", dict, where=where)
        if chosen is not None:
            if not 0 <= chosen < len(completions):
                raise DataError(f"{where}: index {chosen} outside completions", field="chosen_completion")
            steps.append(completions[chosen]["text"])
            ratings.append(completions[chosen].get("rating"))
            human.append(False)
        elif human_completion is not None:
            steps.append(require(human_completion, "text", str, f"{where}.human_completion"))
            ratings.append(optional(human_completion, "rating", int))
            human.append(True)
        else:
            if k != len(raw_steps) - 1:
                raise DataError(f"{where}: no chosen or human completion before the last step",
                                field="chosen_completion")
            if completions and completions[0].get("rating") == -1:
                steps.append(completions[0]["text"])
                ratings.append(-1)
                human.append(False)
    return steps, ratings, human


def read_prm800k(path: PathLike) -> Iterator[dict]:
    """Raw PRM800K records (pretty-printed, possibly several concatenated objects in one file).

    Yields problem, ground-truth answer, the steps along the chosen path with their ratings (-1/0/1, or
    None for human-written steps) and ``finish_reason``. ids are ``prm800k-<file stem>-<object index>``.
    """
    stem = storage.as_path(path).stem
    for k, (line, r) in enumerate(iter_concatenated_json(path)):
        try:
            if not isinstance(r, dict):
                raise DataError(f"expected a JSON object, got {type(r).__name__}")
            question = require(r, "question", dict)
            label = require(r, "label", dict)
            problem = require(question, "problem", str, "question")
            answer = optional(question, "ground_truth_answer", str, where="question")
            steps, ratings, human = _prm800k_steps(label)
            finish_reason = require(label, "finish_reason", str, "label")
        except DataError as e:
            raise e.located(path, line=line) from None
        yield {
            "id": f"prm800k-{stem}-{k}",
            "problem": problem,
            "answer": answer,
            "solution": question.get("ground_truth_solution"),
            "steps": steps,
            "ratings": ratings,
            "human_step": human,
            "finish_reason": finish_reason,
            "source": "prm800k",
        }


def parse_math_shepherd(text: str, labelled: str) -> tuple[str, list[str], list[int]]:
    """Split a Math-Shepherd ``input`` at its ``ки`` step tags and read each step's ``+``/``-`` label.

    ``labelled`` is ``text`` with every tag replaced by one character, so tag k (0-based) found at offset p
    in ``text`` sits at offset ``p - k`` in ``labelled`` (the tag is two characters, its label one).
    Returns (problem, steps without their ``Step n:`` prefix, labels 1 = correct / 0 = wrong).
    """
    positions = [m.start() for m in re.finditer(MATH_SHEPHERD_TAG, text)]
    if not positions:
        raise DataError(f"no '{MATH_SHEPHERD_TAG}' step tags", field="input")
    if len(labelled) != len(text) - len(positions):
        raise DataError("length does not match 'input' with each tag replaced by one character",
                        field="label")
    labels = []
    start, prev_lab = 0, 0
    for k, p in enumerate(positions):
        q = p - k
        if labelled[prev_lab:q] != text[start:p]:
            raise DataError(f"text before step tag {k} differs from 'input'", field="label")
        mark = labelled[q]
        if mark not in "+-":
            raise DataError(f"step {k} is labelled {mark!r}, expected '+' or '-'", field="label")
        labels.append(1 if mark == "+" else 0)
        start, prev_lab = p + len(MATH_SHEPHERD_TAG), q + 1
    if labelled[prev_lab:] != text[start:]:
        raise DataError("text after the last step tag differs from 'input'", field="label")
    first = re.search(r"Step 1:", text)
    if first is None or first.start() > positions[0]:
        raise DataError("cannot find 'Step 1:' before the first step tag", field="input")
    problem = text[: first.start()].strip()
    pieces = [text[first.start() : positions[0]]]
    pieces += [text[positions[k] + len(MATH_SHEPHERD_TAG) : positions[k + 1]] for k in range(len(positions) - 1)]
    steps = [_SHEPHERD_STEP_PREFIX.sub("", s).strip() for s in pieces]
    return problem, steps, labels


def read_math_shepherd(path: PathLike) -> Iterator[dict]:
    """Math-Shepherd JSONL ({input, label, task?}); ids ``math_shepherd-<file stem>-<line index>``."""
    stem = storage.as_path(path).stem

    def validate(r: dict) -> None:
        MATH_SHEPHERD_SCHEMA.validate(r)
        parse_math_shepherd(r["input"], r["label"])

    for i, r in enumerate(read_jsonl(path, validate)):
        problem, steps, labels = parse_math_shepherd(r["input"], r["label"])  # cheap; validated above
        yield {
            "id": str(r["id"]) if "id" in r else f"math_shepherd-{stem}-{i}",
            "problem": problem,
            "answer": None,
            "solution": None,
            "steps": steps,
            "labels": labels,
            "task": r.get("task"),
            "source": "math_shepherd",
        }


# --------------------------------------------------------------------------------------- auto-detection
READERS: dict[str, Callable[[PathLike], Iterator[dict]]] = {
    "math": read_math_jsonl,
    "gsm8k": read_gsm8k_jsonl,
    "generic": read_generic_jsonl,
    "processbench": read_processbench,
    "prm800k": read_prm800k,
    "math_shepherd": read_math_shepherd,
}
QUESTION_FORMATS = ("math", "gsm8k", "generic")


def _read_text(path: PathLike) -> str:
    """The whole file as text; a leading BOM is dropped (an encoding mark, not content) and bytes that are not
    UTF-8 are a DataError naming their line."""
    raw = storage.as_path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"not UTF-8 (byte {e.start + 1} of the file)", path=path, line=line) from None


def _first_value(path: PathLike) -> Any:
    """The first JSON value of the file (first line for JSONL, else the first whole document)."""
    text = _read_text(path)
    stripped = text.lstrip()
    head = stripped[:1]
    if head == "[":
        data = _load_json_document(path)
        return data[0] if isinstance(data, list) and data else data
    if head == "{":
        try:
            return next(iter_concatenated_json(path))[1]
        except DataError:
            return next(read_jsonl(path), None)  # a broken later line; detection needs only the first
    raise DataError("file does not start with a JSON object or array", path=path, line=1)


def detect_format(path: PathLike) -> str:
    """Name of the reader for `path`, decided by the fields of its first record."""
    first = _first_value(path)
    if not isinstance(first, dict):
        raise DataError(f"cannot detect the format: first value is {type(first).__name__}", path=path, line=1)
    keys = set(first)
    if {"steps", "label", "generator"} <= keys:
        return "processbench"
    if {"question", "label"} <= keys and isinstance(first.get("label"), dict):
        return "prm800k"
    if {"input", "label"} <= keys:
        return "math_shepherd"
    if "id" in keys and ({"problem", "question"} & keys):
        return "generic"
    if {"problem", "answer"} <= keys:
        return "math"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    raise DataError(f"cannot detect the format from fields {sorted(keys)}", path=path, line=1)


def read_source(path: PathLike, fmt: str | None = None) -> Iterator[dict]:
    """Records of any supported source; `fmt` (a READERS key) overrides auto-detection."""
    fmt = fmt or detect_format(path)
    if fmt not in READERS:
        raise ValueError(f"unknown source format {fmt!r}; known: {sorted(READERS)}")
    return READERS[fmt](path)


def read_questions(path: PathLike, fmt: str | None = None) -> Iterator[dict]:
    """Uniform question dicts from a MATH, GSM8K or generic JSONL file (format auto-detected)."""
    fmt = fmt or detect_format(path)
    if fmt not in QUESTION_FORMATS:
        raise DataError(f"holds {fmt} records, not questions ({', '.join(QUESTION_FORMATS)})", path=path)
    first_item: dict[str, int] = {}
    for item, r in enumerate(READERS[fmt](path)):
        QUESTION_SCHEMA.validate(r)
        earlier = first_item.setdefault(r["id"], item)
        if earlier != item:  # records would collide downstream (label ids, per-question statistics)
            lines = record_lines(path)
            raise DataError(f"duplicate question id {r['id']!r} (also on line {lines[earlier]}); ids must be "
                            "unique", path=path, line=lines[item], field="id")
        yield r


# ----------------------------------------------------------------------------------- sources -> TFDS
_QUESTION_SPEC = {"id": "string", "problem": "string", "answer": "string", "solution": "string", "source": "string"}
SOURCE_SPECS: dict[str, dict[str, str]] = {
    **{fmt: _QUESTION_SPEC for fmt in QUESTION_FORMATS},
    "processbench": {"id": "string", "generator": "string", "problem": "string", "steps": "string[]",
                     "final_answer_correct": "bool", "label": "int64", "source": "string"},
    "prm800k": {"id": "string", "problem": "string", "answer": "string", "steps": "string[]",
                "ratings": "int32[]", "human_step": "bool[]", "finish_reason": "string", "source": "string"},
    "math_shepherd": {"id": "string", "problem": "string", "steps": "string[]", "labels": "int32[]",
                      "source": "string"},
}


def _project(record: Mapping[str, Any], spec: Mapping[str, str]) -> dict:
    out = {}
    for key, kind in spec.items():
        value = record.get(key)
        if kind == "string" and value is None:
            value = ""
        elif key == "ratings":
            value = [MISSING_RATING if v is None else v for v in value]
        out[key] = value
    return out


def prepare_source(
    path: PathLike,
    data_dir: PathLike,
    name: str | None = None,
    split: str = "train",
    fmt: str | None = None,
    num_shards: int | None = None,
) -> epath.Path:
    """Convert any supported source file (see `READERS`) into a TFDS dataset under `data_dir`.

    The whole source is read and validated before anything is written, so a bad line raises DataError
    and leaves no dataset behind. `name` defaults to ``<format>_<file stem>``.
    """
    fmt = fmt or detect_format(path)
    spec = SOURCE_SPECS[fmt]
    records = [_project(r, spec) for r in read_source(path, fmt)]
    name = name or re.sub(r"[^a-z0-9_]", "_", f"{fmt}_{storage.as_path(path).stem}".lower())
    return write_tfds_dataset(records, data_dir, name, spec, split=split, num_shards=num_shards)
