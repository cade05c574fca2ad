"""Bad question files and reruns on changed content: a clear error naming the file, line and field, or a rerun
that does not trust stale work (issue "Nothing lost, nothing silently wrong")."""

from __future__ import annotations

import json

import pytest

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
