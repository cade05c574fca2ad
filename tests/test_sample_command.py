"""`edu-prm sample` end to end on a tiny random policy: records, resume, and bad input."""

import json

import pytest
from tiny_policy import make_tiny_policy
from tree_reference import distinct_prefixes

from edu_prm_jax import cli
from edu_prm_jax.io.atomic import TMP_SUFFIX
from edu_prm_jax.io.shards import read_shards


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("policy"))


def _sample(policy, workdir, *extra):
    argv = ["sample", f"--workdir={workdir}", f"--config.policy={policy}", "--config.questions=toy:test:6",
            "--config.num_shards=3", "--config.batch_questions=4", "--config.sampling.max_new_tokens=12",
            "--config.sampling.num_leaves=4", "--config.sampling.tau=0.5", *extra]
    assert cli.main(argv) == 0


def test_sample_writes_tree_records_and_resumes(policy, tmp_path):
    _sample(policy, tmp_path / "a")
    out = tmp_path / "a" / "samples_edu"
    records = list(read_shards(out, "trees"))
    assert len(records) == 6 and [r["index"] for r in records] == list(range(6))
    for r in records:
        assert r["mode"] == "edu" and 1 <= len(r["leaves"]) <= 4
        assert r["distinct_tokens"] == distinct_prefixes(leaf["token_ids"] for leaf in r["leaves"])
        for leaf in r["leaves"]:
            assert len(leaf["entropies"]) == len(leaf["token_ids"]) == len(leaf["logprobs"])
    # a run "killed" after one shard: remove the others, leave a stale temp file, rerun
    shards = sorted(out.glob("trees-*.jsonl"))
    original = {p.name: p.read_bytes() for p in shards}
    for p in shards[1:]:
        p.unlink()
    stale = out / f".{shards[2].name}.crashed{TMP_SUFFIX}"
    stale.write_text('{"half": ')
    mtime = shards[0].stat().st_mtime_ns
    _sample(policy, tmp_path / "a")
    assert shards[0].stat().st_mtime_ns == mtime  # the finished shard was not redone
    assert {p.name: p.read_bytes() for p in sorted(out.glob("trees-*.jsonl"))} == original
    assert not stale.exists()


def test_ht_mode_samples_independent_paths(policy, tmp_path):
    _sample(policy, tmp_path, "--config.sampling.mode=ht")
    records = list(read_shards(tmp_path / "samples_ht", "trees"))
    assert all(len(r["leaves"]) == 4 and all(leaf["parent_slot"] == -1 for leaf in r["leaves"]) for r in records)
    assert all(r["distinct_tokens"] == sum(len(leaf["token_ids"]) for leaf in r["leaves"]) for r in records)


def test_malformed_question_line_stops_before_any_output(policy, tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"id": "a", "problem": "1+1"}) + "\n" + '{"id": "b", "problem": \n')
    rc = cli.main(["sample", f"--workdir={tmp_path / 'w'}", f"--config.policy={policy}",
                   f"--config.questions={bad}"])
    assert rc != 0
    assert not (tmp_path / "w" / "samples_edu").exists()
