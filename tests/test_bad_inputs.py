"""Bad question files and reruns on changed content: a clear error naming the file, line and field, or a rerun
that does not trust stale work (issue "Nothing lost, nothing silently wrong")."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edu_prm_jax import cli
from edu_prm_jax.commands.eval_bon import require_gold
from edu_prm_jax.io.jsonl import DataError
from edu_prm_jax.records.sources import read_questions
from edu_prm_jax.sampling.shards import questions_digest


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" if r is not None else "\n" for r in rows))
    return path


def test_duplicate_question_ids_name_both_lines(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [{"id": "a", "problem": "1+1"}, None, {"id": "b", "problem": "2+2"},
                                              {"id": "a", "problem": "3+3"}])
    with pytest.raises(DataError, match=r"q\.jsonl:4: field 'id': duplicate question id 'a' \(also on line 1\)"):
        list(read_questions(path))


def test_missing_problem_names_the_field_to_add(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [{"id": "a", "problem": "1+1"}, {"id": "b", "text": "2+2"}])
    with pytest.raises(DataError, match=r"q\.jsonl:2: field 'problem': missing required field \(the question text; "
                                        r"'question' is accepted too\)"):
        list(read_questions(path))
    ok = write_lines(tmp_path / "ok.jsonl", [{"id": "a", "question": "1+1"}])
    assert [q["problem"] for q in read_questions(ok)] == ["1+1"]


def test_questions_file_with_a_bom_is_read(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "problem": "1+1", "answer": "2"}).encode() + b"\n")
    assert [q["id"] for q in read_questions(path)] == ["a"]


def test_fingerprint_follows_question_content_not_ids():
    base = [{"id": "a", "problem": "Start with 3. Add 4.", "answer": "7"}]
    same = [dict(base[0])]
    edited_text = [{**base[0], "problem": "Start with 3. Add 5."}]
    edited_gold = [{**base[0], "answer": "8"}]
    assert questions_digest(base) == questions_digest(same)
    assert len({questions_digest(q) for q in (base, edited_text, edited_gold)}) == 3


def test_sample_rerun_after_editing_a_question_is_refused(tmp_path, capsys):
    questions = write_lines(tmp_path / "q.jsonl", [{"id": "a", "problem": "Start with 3. Add 4. What is the result?",
                                                    "answer": "7"}])
    argv = ["sample", f"--workdir={tmp_path / 'w'}", f"--config.questions={questions}",
            "--config.sampling.num_leaves=2", "--config.sampling.max_new_tokens=8"]
    assert cli.main(argv) == 0
    write_lines(questions, [{"id": "a", "problem": "Start with 3. Add 5. What is the result?", "answer": "8"}])
    assert cli.main(argv) == 1
    assert "changed: ['questions']" in capsys.readouterr().err


def test_eval_bon_refuses_questions_without_gold():
    with pytest.raises(ValueError, match=r"2 of 3 questions have no gold answer \(b, c\)"):
        require_gold([{"id": "a", "answer": "1"}, {"id": "b", "answer": None}, {"id": "c"}], "q.jsonl")
    require_gold([{"id": "a", "answer": "1"}], "q.jsonl")


def test_a_question_longer_than_the_context_is_refused_or_skipped(tmp_path, capsys):
    """The toy policy's context is 256 tokens: a 600-token question is refused naming its id and both lengths,
    or, with too_long=skip, left out with a counted warning while the others are sampled."""
    long_problem = "Start with 3. " + "Add 1. " * 200 + "What is the result?"
    questions = write_lines(tmp_path / "q.jsonl", [
        {"id": "short", "problem": "Start with 3. Add 4. What is the result?", "answer": "7"},
        {"id": "long", "problem": long_problem, "answer": "203"}])
    argv = ["sample", f"--workdir={tmp_path / 'w'}", f"--config.questions={questions}",
            "--config.sampling.num_leaves=2", "--config.sampling.max_new_tokens=8"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "question 'long': its prompt is" in err and "context of 256 tokens" in err
    assert not (tmp_path / "w" / "samples_edu").exists()  # refused before anything was written
    assert cli.main([*argv, "--config.too_long=skip"]) == 0
    trees = [json.loads(line) for p in sorted((tmp_path / "w" / "samples_edu").glob("trees-*.jsonl"))
             for line in p.read_text().splitlines()]
    assert [t["id"] for t in trees] == ["short"]
    # skipping keeps every other question's position (its record index and sampling key)
    write_lines(questions, [{"id": "long", "problem": long_problem, "answer": "203"},
                            {"id": "short", "problem": "Start with 3. Add 4. What is the result?", "answer": "7"}])
    assert cli.main([*argv[:1], f"--workdir={tmp_path / 'w2'}", *argv[2:], "--config.too_long=skip"]) == 0
    (tree,) = [json.loads(line) for p in sorted((tmp_path / "w2" / "samples_edu").glob("trees-*.jsonl"))
               for line in p.read_text().splitlines()]
    assert tree["id"] == "short" and tree["index"] == 1


def test_disk_full_while_writing_a_shard_is_one_line_and_leaves_nothing_partial(tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of a tree shard (simulated after 100 bytes of it): exit 1 with one line naming the
    shard, no temp file left; after space is freed the rerun writes every shard."""
    import errno

    from edu_prm_jax.io import atomic

    questions = write_lines(tmp_path / "q.jsonl", [{"id": str(i), "problem": f"Start with {i}. Add 4. What is the "
                                                    "result?", "answer": str(i + 4)} for i in range(3)])
    argv = ["sample", f"--workdir={tmp_path / 'w'}", f"--config.questions={questions}", "--config.num_shards=3",
            "--config.sampling.num_leaves=2", "--config.sampling.max_new_tokens=8"]
    real_fdopen = atomic.os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    real_mkstemp, names = atomic.tempfile.mkstemp, {}

    def mkstemp(*a, **k):
        fd, name = real_mkstemp(*a, **k)
        names[fd] = name
        return fd, name

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        return FullDisk(f) if ".trees-" in names.get(fd, "") else f  # only tree shards hit the full disk

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(atomic.os, "fdopen", fdopen)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err and "disk full: no space left on device writing" in err
    assert "trees-00000-of-00003.jsonl" in err
    out = tmp_path / "w" / "samples_edu"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind
    assert not list(out.glob("trees-*.jsonl"))
    monkeypatch.setattr(atomic.os, "fdopen", real_fdopen)
    assert cli.main(argv) == 0
    assert len(list(out.glob("trees-*.jsonl"))) == 3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda t: t.encode()[: len(t) // 2], st.just(json.dumps({"id": "a", "problem": "1+1"}))),
                 st.builds(lambda v: json.dumps({"id": v, "problem": "x"}).encode(),
                           st.one_of(st.booleans(), st.lists(st.integers(), max_size=3), st.none())),
                 st.builds(lambda v: json.dumps({"id": "a", "problem": v}).encode(),
                           st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=3)))))
@example(line=b"\n\xff")  # a CI draw: random bytes with a newline, the bad byte on line 3
def test_malformed_question_lines_end_in_a_data_error_naming_file_and_line(tmp_path, line):
    """Whatever the second line holds (random bytes, a truncated record, wrong types), reading the questions
    either succeeds or raises DataError naming the file and a line the written bytes occupy (line 2, or a later
    one when the random bytes hold newlines of their own: each b"\n" starts a line), never another exception."""
    path = tmp_path / "q.jsonl"
    path.write_bytes(json.dumps({"id": "first", "problem": "Start with 1. Add 1."}).encode() + b"\n" + line + b"\n")
    try:
        list(read_questions(path))
    except DataError as e:
        last = 2 + line.count(b"\n")  # the line the appended record's own newline ends
        assert str(path) in str(e) and e.line is not None and 1 <= e.line <= last, str(e)
        assert f"{path}:{e.line}:" in str(e), str(e)
