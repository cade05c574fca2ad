"""`edu-prm label` end to end: `sample` on a tiny random policy, then label; records, stats, TFDS, resume, errors."""

import itertools
import json
import shutil

import pytest
from tiny_policy import make_tiny_policy

from edu_prm_jax import cli
from edu_prm_jax.io import tfds as tfds_io
from edu_prm_jax.io.shards import read_shards
from edu_prm_jax.scoring import examples as prm_data


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def samples(policy, tmp_path_factory):
    """EDU trees of 5 toy questions; the random policy never answers, so the first leaf of the first two
    questions gets the gold answer appended to its text (correctness is judged on the leaf text)."""
    work = tmp_path_factory.mktemp("work")
    argv = ["sample", f"--workdir={work}", f"--config.policy={policy}", "--config.questions=toy:test:5",
            "--config.num_shards=2", "--config.batch_questions=4", "--config.sampling.max_new_tokens=10",
            "--config.sampling.num_leaves=4", "--config.sampling.tau=0.5"]
    assert cli.main(argv) == 0
    src = work / "samples_edu"
    for path in sorted(src.glob("trees-*.jsonl")):
        lines = path.read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        for r in recs:
            if r["index"] < 2:
                r["leaves"][0]["text"] += " \\boxed{" + r["answer"] + "}"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return src


def _label(policy, samples, out, *extra):
    return cli.main(["label", f"--workdir={out.parent}", f"--config.policy={policy}", f"--config.samples={samples}",
                     f"--config.output={out}", *extra])


def _reference_values(tree, correct):
    """Brute force: v(prefix) = mean correctness of the tree's leaves whose token ids start with it."""
    def v(prefix):
        below = [ok for lf, ok in zip(tree["leaves"], correct) if lf["token_ids"][:len(prefix)] == prefix]
        return sum(below) / len(below)
    return v


def test_label_records_stats_tfds_and_resume(policy, samples, tmp_path, capsys):
    out = tmp_path / "labels"
    assert _label(policy, samples, out, "--config.num_shards=3") == 0
    printed = capsys.readouterr().out
    trees = {str(t["id"]): t for t in read_shards(samples, "trees")}
    records = list(read_shards(out, "steps"))
    assert len(records) == sum(len(t["leaves"]) for t in trees.values())
    n_solved = 0
    for r in records:
        tree = trees[r["question_id"]]
        slot = int(r["id"].rsplit("/", 1)[1])
        lf = next(x for x in tree["leaves"] if x["slot"] == slot)
        assert [t for s in r["step_ids"] for t in s] == lf["token_ids"]
        assert len(r["labels"]) == len(r["steps"]) == len(r["step_ids"]) == len(r["label_kind"]) >= 1
        assert "".join(r["steps"]) == lf["text"].split(" \\boxed")[0]
        assert r["prompt_ids"] == tree["prompt_ids"] and r["target"] == "edu"
        assert r["provenance"]["source_shard"].startswith("trees-") and r["provenance"]["method"] == "edu"
        # the correct leaves are exactly the ones given the gold answer
        correct = [tree["index"] < 2 and i == 0 for i in range(len(tree["leaves"]))]
        assert r["final_correct"] == correct[tree["leaves"].index(lf)]
        v = _reference_values(tree, correct)
        ends, pos = [], 0
        for s in r["step_ids"]:
            pos += len(s)
            ends.append(pos)
        expect = [v(lf["token_ids"][:e]) for e in ends[:-1]] + [float(r["final_correct"])]
        assert r["labels"] == pytest.approx(expect)
        assert r["label_kind"] == ["hard" if x in (0.0, 1.0) else "soft" for x in expect]
        assert r["provenance"]["node_leaves"][:-1] == [
            sum(x["token_ids"][:e] == lf["token_ids"][:e] for x in tree["leaves"]) for e in ends[:-1]]
        n_solved += any(x > 0 for x in r["labels"])
    assert n_solved >= 1  # the tampered leaves and their tree-mates carry positive labels

    stats = json.loads((out / "label_stats.json").read_text())
    steps = sum(len(r["labels"]) for r in records)
    assert stats["labelled_steps"] == steps and json.loads(printed[printed.index("{"):]) == stats
    assert stats["hard_share"] == pytest.approx(
        sum(k == "hard" for r in records for k in r["label_kind"]) / steps, abs=1e-6)
    assert stats["positive_share"] == pytest.approx(sum(x >= 0.5 for r in records for x in r["labels"]) / steps,
                                                    abs=1e-6)
    assert stats["questions"] == 5 and stats["questions_with_correct_leaf"] == 2
    assert stats["correct_leaf_share"] == pytest.approx(2 / len(records), abs=1e-6)
    # toy audit: the random policy's text is never on the reference, so the two "right" leaves (gold answer
    # appended) reach it through wrong lines, and a step agrees exactly when no right answer is reachable below it
    assert all(r["problem"] == trees[r["question_id"]]["problem"] for r in records)
    assert stats["toy_audited_solutions"] == len(records)
    assert stats["toy_right_answers_through_a_wrong_step"] == 1.0
    unreachable = sum(v <= 0 for r in records for v in r["provenance"]["values"])
    assert stats["toy_step_agreement"] == pytest.approx(unreachable / steps, abs=1e-6)
    # cost: tree labels need no rollouts, so they cost what sampling the trees did: each generated token once
    # (counted here from the leaves' own fork positions) and one query per leaf
    cost = stats["cost"]
    generated = sum(len(lf["token_ids"]) - lf["fork_pos"] for t in trees.values() for lf in t["leaves"])
    assert cost["sample_tokens"] == cost["tokens"] == generated > 0
    assert cost["sample_queries"] == cost["queries"] == sum(len(t["leaves"]) for t in trees.values())
    assert cost["rollout_tokens"] == cost["rollout_queries"] == 0
    assert cost["sample_wall_seconds"] > 0 and cost["wall_seconds"] >= cost["sample_wall_seconds"]

    source = tfds_io.open_tfds_source(out / "tfds", "labels")
    assert len(source) == len(records)
    decoded = tfds_io.ExampleDecoder(source.dataset_info.features)(source[0])
    assert decoded["id"] == records[0]["id"]
    assert decoded["step_ids_flat"].tolist() == [t for s in records[0]["step_ids"] for t in s]
    assert decoded["step_lengths"].tolist() == [len(s) for s in records[0]["step_ids"]]
    assert decoded["labels"].tolist() == pytest.approx(records[0]["labels"])

    examples, bstats = prm_data.build_examples(records, head="scalar")
    assert bstats.examples == len(records) and bstats.steps == steps

    # rerun: nothing redone; after losing one shard only that shard is rewritten, with the same content
    shards = sorted(out.glob("steps-*.jsonl"))
    content = {p.name: p.read_bytes() for p in shards}
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    assert _label(policy, samples, out, "--config.num_shards=3") == 0
    assert {p.name: p.stat().st_mtime_ns for p in shards} == mtimes
    shards[1].unlink()
    assert _label(policy, samples, out, "--config.num_shards=3") == 0
    assert shards[0].stat().st_mtime_ns == mtimes[shards[0].name]
    assert {p.name: p.read_bytes() for p in shards} == content
    assert len(tfds_io.open_tfds_source(out / "tfds", "labels")) == len(records)


def test_hard_target_and_extra_rollouts(policy, samples, tmp_path):
    out = tmp_path / "labels"
    assert _label(policy, samples, out, "--config.target=hard", "--config.extra_rollouts_min_leaves=3",
                  "--config.extra_rollouts_k=2", "--config.sampling.max_new_tokens=4", "--config.tfds=False") == 0
    records = list(read_shards(out, "steps"))
    assert all(x in (0.0, 1.0) for r in records for x in r["labels"])
    assert all(k == "hard" for r in records for k in r["label_kind"])
    rolled = False
    for r in records:
        p = r["provenance"]
        assert r["labels"] == [float(v > 0) for v in p["values"]]
        for n, k in zip(p["node_leaves"][:-1], p["node_rollouts"][:-1]):
            tree_leaves = n - k
            assert k % 2 == 0 and (k == 0 or p["rollout_params"]["mode"] == "ht")
            if tree_leaves < 3:
                assert k >= 2  # a node with < m tree leaves got its own k rollouts
                rolled = True
    assert rolled
    assert not (out / "tfds").exists()


def test_shepherd_method_labels_line_steps(policy, samples, tmp_path):
    """The random policy rarely writes a newline, so one is put at generated index 2 of every leaf."""
    from edu_prm_jax.tokenization import load_tokenizer

    (newline,) = load_tokenizer(policy).encode("\n")
    lined = tmp_path / "lined"
    lined.mkdir()
    for path in sorted(samples.glob("trees-*.jsonl")):
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        for r in recs:
            for lf in r["leaves"]:
                if len(lf["token_ids"]) > 3:
                    lf["token_ids"][2] = newline
        (lined / path.name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "labels"
    assert _label(policy, lined, out, "--config.method=shepherd", "--config.shepherd_k=2",
                  "--config.sampling.max_new_tokens=4", "--config.tfds=False") == 0
    trees = {str(t["id"]): t for t in read_shards(lined, "trees")}
    multi, prefixes = 0, set()
    for r in read_shards(out, "steps"):
        slot = int(r["id"].rsplit("/", 1)[1])
        lf = next(x for x in trees[r["question_id"]]["leaves"] if x["slot"] == slot)
        assert [t for s in r["step_ids"] for t in s] == lf["token_ids"]
        nl = [i for i, t in enumerate(lf["token_ids"]) if t == newline]
        ends = list(itertools.accumulate(len(s) for s in r["step_ids"]))
        assert ends == sorted({i + 1 for i in nl} | {len(lf["token_ids"])})  # a step ends after each newline
        assert r["provenance"]["method"] == "shepherd"
        assert r["provenance"]["node_rollouts"] == [2] * (len(r["steps"]) - 1) + [0]
        if len(r["steps"]) > 1:
            assert r["provenance"]["rollout_params"]["num_leaves"] == 2
            multi += 1
        prefixes.update((r["question_id"], tuple(lf["token_ids"][:e])) for e in ends[:-1])
    assert multi > 0
    # cost: k = 2 continuations of every distinct step prefix, each 1-4 tokens (max_new_tokens=4); the copied
    # trees carry no sampling cost, so the totals are unknown (null), never the rollouts alone
    cost = json.loads((out / "label_stats.json").read_text())["cost"]
    assert cost["rollout_queries"] == 2 * len(prefixes)
    assert cost["rollout_queries"] <= cost["rollout_tokens"] <= 4 * cost["rollout_queries"]
    assert cost["sample_tokens"] is cost["tokens"] is cost["queries"] is cost["wall_seconds"] is None


def test_malformed_sample_record_names_file_line_and_field(policy, samples, tmp_path, capsys):
    bad = tmp_path / "bad_samples"
    shutil.copytree(samples, bad)
    shard = sorted(bad.glob("trees-*.jsonl"))[1]
    lines = shard.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["leaves"][0]["anchors"] = ["x"]
    lines[1] = json.dumps(rec)
    shard.write_text("\n".join(lines) + "\n")
    assert _label(policy, bad, tmp_path / "labels") == 1
    err = capsys.readouterr().err
    assert f"{shard.name}:2" in err and "leaves[0].anchors" in err


def test_ht_trees_are_refused_unless_asked_for(policy, samples, tmp_path, capsys):
    ht = tmp_path / "ht_samples"
    ht.mkdir()
    for path in sorted(samples.glob("trees-*.jsonl")):  # the same trees, recorded as HT samples (no anchors)
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        for r in recs:
            r["mode"] = "ht"
            for leaf in r["leaves"]:
                leaf["anchors"] = []
        (ht / path.name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "labels"
    assert _label(policy, ht, out) == 1
    assert "5 of 5 trees were sampled in mode ['ht']" in capsys.readouterr().err
    assert not out.exists()  # refused before anything (a fingerprint included) was written
    assert _label(policy, ht, out, "--config.allow_ht_trees=True") == 0
    assert all(len(r["steps"]) == 1 for r in read_shards(out, "steps"))


def test_omega_method_searches_from_questions_and_reports_its_cost(tmp_path):
    """OmegaPRM on 4 toy questions with the shipped toy policy (which solves most of them): every record is a path
    of the search tree whose labels are its nodes' MC values, every MC value is a count over k rollouts (or a
    node's own verdict), and the cost is the rollouts alone (no samples are read)."""
    out = tmp_path / "labels"
    assert cli.main(["label", f"--workdir={tmp_path}", "--config.method=omega", "--config.questions=toy:train:4",
                     "--config.target=soft", "--config.omega.k=4", "--config.omega.max_search_count=2",
                     "--config.omega.rollout_budget=16", "--config.tfds=False", f"--config.output={out}"]) == 0
    records = list(read_shards(out, "steps"))
    assert records and {r["provenance"]["method"] for r in records} == {"omega"}
    for r in records:
        p = r["provenance"]
        assert r["labels"] == p["values"] and p["mode"] == "omega"
        for value, leaves, correct, rollouts in zip(p["values"], p["node_leaves"], p["node_correct"],
                                                    p["node_rollouts"]):
            assert value == correct / leaves and rollouts in (0, 4)  # k rollouts, or the node's own verdict
        assert r["final_correct"] == (p["values"][-1] == 1.0 and p["node_rollouts"][-1] == 0)
    cost = json.loads((out / "label_stats.json").read_text())["cost"]
    assert cost["sample_tokens"] == cost["sample_queries"] == 0
    assert cost["queries"] == cost["rollout_queries"] > 0 and cost["queries"] % 4 == 0
    assert cost["rollout_queries"] <= cost["tokens"] <= 96 * cost["rollout_queries"]
    # per question: k = 4 at the root, then at most 2 searches of at most 3 estimations each (a binary search
    # over a toy solution's <= 5 lines) of k rollouts
    assert cost["rollout_queries"] <= 4 * (4 + 2 * 3 * 4)
