"""JSONL validation errors, schemas, atomic files and resumable shards (edu_prm_jax.io: jsonl, atomic, shards)."""

import json
import os

import pytest

from edu_prm_jax.io import atomic, jsonl, shards


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


SCHEMA = jsonl.Schema({"id": (str, int), "problem": str}, optional={"answer": str, "steps": jsonl.ListOf(str)})


def test_read_jsonl_valid_skips_blank_lines(tmp_path):
    p = _write_lines(tmp_path / "q.jsonl", ['{"id": 1, "problem": "a"}', "", '{"id": "x", "problem": "b"}'])
    assert [r["problem"] for r in jsonl.read_jsonl(p, SCHEMA)] == ["a", "b"]


@pytest.mark.parametrize(
    "bad_line, field, needle",
    [
        ('{"id": 3, "problem": "trunc', None, "invalid JSON"),
        ('[1, 2]', None, "expected a JSON object"),
        ('{"id": 3}', "problem", "missing required field"),
        ('{"id": 3, "problem": 7}', "problem", "expected str, got int"),
        ('{"id": true, "problem": "p"}', "id", "expected str | int, got bool"),
        ('{"id": 3, "problem": "p", "steps": ["a", 2]}', "steps", "element 1 is int"),
        ('{"id": 3, "problem": "p", "answer": 5}', "answer", "expected str"),
    ],
)
def test_read_jsonl_errors_name_file_line_field(tmp_path, bad_line, field, needle):
    p = _write_lines(tmp_path / "broken.jsonl", ['{"id": 1, "problem": "ok"}', "", bad_line])
    with pytest.raises(jsonl.DataError) as info:
        list(jsonl.read_jsonl(p, SCHEMA))
    err = info.value
    assert err.line == 3 and err.field == field and str(err.path) == str(p)
    assert f"{p}:3" in str(err) and needle in str(err)
    if field is not None:
        assert f"field '{field}'" in str(err)


def test_optional_field_may_be_null_or_absent():
    SCHEMA.validate({"id": 1, "problem": "p", "answer": None})
    assert jsonl.optional({"x": None}, "x", int, default=4) == 4
    with pytest.raises(jsonl.DataError, match="field 'x'"):
        jsonl.optional({"x": "s"}, "x", int)


def test_atomic_json_and_text(tmp_path):
    p = atomic.write_json_atomic(tmp_path / "sub" / "a.json", {"k": [1, 2]})
    assert json.loads(p.read_text()) == {"k": [1, 2]}
    atomic.write_text_atomic(p, "replaced")
    assert p.read_text() == "replaced"
    assert sorted(os.listdir(p.parent)) == ["a.json"]  # no temp files left behind


def test_failed_atomic_write_keeps_old_file_and_no_temp(tmp_path):
    p = atomic.write_jsonl_atomic(tmp_path / "x.jsonl", [{"a": 1}])

    def records():
        yield {"a": 2}
        raise RuntimeError("crash while producing records")

    with pytest.raises(RuntimeError):
        atomic.write_jsonl_atomic(p, records())
    assert list(jsonl.read_jsonl(p)) == [{"a": 1}]
    assert os.listdir(tmp_path) == ["x.jsonl"]


def test_shard_names_sort_in_order():
    assert shards.shard_name("trees", 3, 10) == "trees-00003-of-00010.jsonl"
    names = [shards.shard_name("t", i, 12) for i in (11, 2, 0)]
    assert sorted(names) == [shards.shard_name("t", i, 12) for i in (0, 2, 11)]
    with pytest.raises(ValueError):
        shards.shard_name("t", 4, 4)


def test_crash_mid_shard_not_done_and_rerun_skips_finished(tmp_path):
    w = shards.ShardedJsonlWriter(tmp_path, "labels", num_shards=4)
    assert w.pending() == [0, 1, 2, 3]
    for i in (0, 2):
        w.write(i, [{"shard": i, "k": j} for j in range(3)])

    # Crash while writing shard 1: the producer raises after one record.
    def crashing():
        yield {"shard": 1, "k": 0}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        w.write(1, crashing())
    # A hard kill (no cleanup) leaves a temp file; simulate it by hand.
    stale = tmp_path / ".labels-00003-of-00004.jsonl.abc123.tmp"
    stale.write_text('{"shard": 3, "k"')

    assert shards.completed_shards(tmp_path, "labels") == {0, 2}
    assert not shards.shard_done(tmp_path, "labels", 1, 4) and not shards.shard_done(tmp_path, "labels", 3, 4)
    assert shards.stale_temp_files(tmp_path, "labels") == [stale]

    rerun = shards.ShardedJsonlWriter(tmp_path, "labels", num_shards=4)
    mtime0 = (tmp_path / shards.shard_name("labels", 0, 4)).stat().st_mtime_ns
    todo = rerun.pending()
    assert todo == [1, 3] and not stale.exists()
    for i in todo:
        rerun.write(i, [{"shard": i, "k": j} for j in range(3)])
    assert (tmp_path / shards.shard_name("labels", 0, 4)).stat().st_mtime_ns == mtime0  # untouched
    got = [(r["shard"], r["k"]) for r in shards.read_shards(tmp_path, "labels")]
    assert got == [(i, j) for i in range(4) for j in range(3)]


def test_read_shards_fails_on_missing_shard(tmp_path):
    for i in (0, 1, 3):
        shards.write_shard(tmp_path, "trees", i, 4, [{"i": i}])
    with pytest.raises(jsonl.DataError, match="trees-00002-of-00004.jsonl"):
        list(shards.read_shards(tmp_path, "trees"))
    with pytest.raises(jsonl.DataError, match="no shards"):
        list(shards.read_shards(tmp_path, "other"))


def test_read_shards_validation_error_names_shard_file(tmp_path):
    shards.write_shard(tmp_path, "q", 0, 2, [{"id": 1, "problem": "a"}])
    shards.write_shard(tmp_path, "q", 1, 2, [{"id": 2, "problem": "b"}, {"id": 3}])
    with pytest.raises(jsonl.DataError) as info:
        list(shards.read_shards(tmp_path, "q", SCHEMA))
    assert info.value.path.name == "q-00001-of-00002.jsonl" and info.value.line == 2
    assert info.value.field == "problem"


def test_mixed_shard_counts_rejected(tmp_path):
    shards.write_shard(tmp_path, "t", 0, 2, [{}])
    with pytest.raises(jsonl.DataError, match="num_shards"):
        shards.ShardedJsonlWriter(tmp_path, "t", num_shards=3)
    shards.write_shard(tmp_path, "t", 0, 3, [{}])
    with pytest.raises(jsonl.DataError, match="disagree"):
        list(shards.read_shards(tmp_path, "t"))


def test_read_jsonl_skips_a_leading_utf8_bom_and_names_bad_bytes(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"id": 1, "problem": "a"}\n{"id": 2, "problem": "b"}\n')
    assert [r["id"] for r in jsonl.read_jsonl(p, SCHEMA)] == [1, 2]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": 1, "problem": "a"}\n{"id": 2, "problem": "\xff"}\n')
    with pytest.raises(jsonl.DataError, match=r"bad\.jsonl:2: not UTF-8"):
        list(jsonl.read_jsonl(bad))
