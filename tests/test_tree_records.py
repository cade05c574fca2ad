"""The typed inter-stage records (edu_prm_jax.records: trees, steps, codec): round trips, the bytes the writers
write (unchanged from the dicts they built before the records existed), errors naming file, line and field, and
a property test that no malformed line escapes as anything but such an error."""

import dataclasses
import json
import pathlib
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edu_prm_jax.commands import label
from edu_prm_jax.io.atomic import write_jsonl_atomic
from edu_prm_jax.io.jsonl import DataError, count_records
from edu_prm_jax.io.shards import shard_name
from edu_prm_jax.labeling.mc import apply_target, label_paths
from edu_prm_jax.records.steps import StepRecord, load_label_records, read_step_shards
from edu_prm_jax.records.trees import LeafRecord, TreeRecord, read_tree_file, read_tree_shards, tree_shard_paths
from edu_prm_jax.sampling.decode import DecodeParams
from edu_prm_jax.sampling.engine import Leaf, Tree
from edu_prm_jax.sampling.shards import tree_record

QUESTION = {"id": "toy-7", "problem": "Start with 2. Add 3. — what is 2 + 3?", "answer": "5"}
PROMPT = "<user>Start with 2. Add 3. — what is 2 + 3?</user>\n"
PROMPT_IDS = [3, 1, 4, 1, 5, 9, 2, 6]
PARAMS = DecodeParams()
LEAVES = [  # slot 0 forks at 2 into slot 1, slot 1 at 3 into slot 2 (odd floats, a non-ASCII text)
    Leaf(0, -1, 0, [11, 12, 13, 14, 15], [0.1234567, 2.5, 1e-7, 0.0, 3.0], [-0.25, -1.0000049, 0.0, -2.0, -0.5],
         [2], "answer", [2], "2 + 3 = 5 ✓ \\boxed{5}"),
    Leaf(1, 0, 2, [11, 12, 16, 17], [0.1234567, 2.5, 1.75, 0.5], [-0.25, -1.0000049, -0.7, -0.1], [2, 3], "eos",
         [2, 3], "2 + 6 \"quoted\"\n"),
    Leaf(2, 1, 3, [11, 12, 16, 18, 19], [0.1, 2.5, 1.75, 1.2, 0.0], [-0.2, -1.0, -0.7, -0.3, -0.0], [2, 3],
         "max_new_tokens", [], "2 + 6 = 9"),
]


def decode(ids):
    return "".join(chr(0x4E00 + t) for t in ids)


# ------------------------------------------------------ the dict layouts the writers built before records/
def previous_tree_record(question, index, prompt, prompt_ids, params, tree):
    return {"id": str(question["id"]), "index": index, "problem": question["problem"],
            "answer": question.get("answer"), "prompt": prompt, "prompt_ids": prompt_ids, "mode": params.mode,
            "params": dataclasses.asdict(params), "leaves": [leaf.to_json() for leaf in tree.leaves],
            "distinct_tokens": tree.cost, "pruned_tokens": tree.pruned_tokens}


def previous_path_record(rec, source, leaf, path, target, method, decode, rollout_params):
    labels, kinds = apply_target(path.values, target)
    qid = str(rec["id"])
    return {
        "id": f"{qid}/{leaf.slot}", "question_id": qid, "problem": rec.get("problem", ""), "prompt": rec["prompt"],
        "prompt_ids": rec["prompt_ids"],
        "steps": label.step_texts(decode, leaf.token_ids, path.spans),
        "step_ids": [leaf.token_ids[s:e] for s, e in path.spans], "labels": labels, "label_kind": kinds,
        "target": target, "final_correct": path.correct,
        "provenance": {"method": method, "source_shard": source, "mode": rec["mode"], "sampler": rec["params"],
                       "slot": leaf.slot, "values": path.values, "node_leaves": path.node_leaves,
                       "node_correct": path.node_correct, "node_rollouts": path.node_rollouts,
                       "rollout_params": rollout_params},
    }


@pytest.mark.parametrize("answer", ["5", None])
def test_tree_and_step_shards_are_byte_identical_to_the_previous_dicts(tmp_path, answer):
    question = {**QUESTION, "answer": answer}
    tree = Tree(LEAVES, pruned_tokens=4)
    old = previous_tree_record(question, 7, PROMPT, PROMPT_IDS, PARAMS, tree)
    new = tree_record(question, 7, PROMPT, PROMPT_IDS, PARAMS, tree)
    assert isinstance(new, TreeRecord)
    old_file = write_jsonl_atomic(tmp_path / "old" / shard_name("trees", 0, 1), [old, old])
    new_file = write_jsonl_atomic(tmp_path / "new" / shard_name("trees", 0, 1), [new.to_json(), new.to_json()])
    assert new_file.read_bytes() == old_file.read_bytes()

    # label what was read back, once from the old reader's dicts and once from the typed records
    (read_old,) = [json.loads(line) for line in old_file.read_text(encoding="utf-8").splitlines()[:1]]
    read_new = next(read_tree_shards(tmp_path / "new"))
    leaves = [Leaf.from_json(d) for d in read_old["leaves"]]
    paths = label_paths(leaves, [True, False, False])
    rollout_params = {"mode": "ht", "num_leaves": 2, "temperature": 0.7}
    old_steps, new_steps = [], []
    for leaf, path, params in zip(leaves, paths, [None, rollout_params, None]):
        for target in ("edu", "hard"):
            old_steps.append(previous_path_record(read_old, old_file.name, leaf, path, target, "edu", decode, params))
            new_steps.append(label.path_record(read_new, new_file.name, leaf, path, target, "edu", decode, params))
    old_labels = write_jsonl_atomic(tmp_path / "old" / shard_name("steps", 0, 1), old_steps)
    new_labels = write_jsonl_atomic(tmp_path / "new" / shard_name("steps", 0, 1), [r.to_json() for r in new_steps])
    assert new_labels.read_bytes() == old_labels.read_bytes()
    assert b"\\u" not in new_labels.read_bytes()  # ensure_ascii=False: the text is written as UTF-8


def test_round_trip_and_what_readers_accept(tmp_path):
    record = tree_record(QUESTION, 0, PROMPT, PROMPT_IDS, PARAMS, Tree(LEAVES))
    path = write_jsonl_atomic(tmp_path / shard_name("trees", 0, 1), [record.to_json()])
    (back,) = read_tree_shards(tmp_path)
    assert back == record and back.leaves[1].anchors == [2, 3] and back.question_id == "toy-7"
    assert [Leaf.from_json(leaf.to_json()) for leaf in back.leaves] == [Leaf.from_json(x.to_json()) for x in LEAVES]
    # a minimal hand-made record: an int id, optional leaf fields absent or null, an extra field kept
    minimal = {"id": 3, "index": 0, "problem": "p", "prompt": "x", "prompt_ids": [1], "mode": "ht", "params": {},
               "leaves": [{"slot": 0, "token_ids": [4, 5], "anchors": [], "text": "t", "fork_pos": None}],
               "distinct_tokens": 2, "note": "kept"}
    path.write_text(json.dumps(minimal) + "\n\n", encoding="utf-8")
    (back,) = read_tree_file(path)
    assert back.question_id == "3" and back.answer is None and back.pruned_tokens == 0
    assert back.leaves[0].parent_slot == -1 and back.leaves[0].fork_pos == 0 and back.leaves[0].entropies == []
    assert back.to_json()["note"] == "kept"


def _tree_line(**changes):
    record = tree_record(QUESTION, 0, PROMPT, PROMPT_IDS, PARAMS, Tree(LEAVES)).to_json()
    record.update(changes)
    return json.dumps(record, ensure_ascii=False)


def _leaves_with(index, **changes):
    leaves = [leaf.to_json() for leaf in LEAVES]
    leaves[index].update(changes)
    return leaves


@pytest.mark.parametrize("bad_line, field, needle", [
    ('{"id": "q", "index": 0', None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object, got list"),
    (_tree_line(prompt_ids="3 1 4"), "prompt_ids", "expected list, got str"),
    (_tree_line(index=True), "index", "expected int, got bool"),
    (_tree_line(id=1.5), "id", "expected str | int, got float"),
    (_tree_line(params=[1]), "params", "expected object, got list"),
    (_tree_line(leaves=[1]), "leaves[0]", "expected object, got int"),
    (_tree_line(leaves=_leaves_with(2, anchors=[2, "3"])), "leaves[2].anchors[1]", "expected int, got str"),
    (_tree_line(leaves=_leaves_with(2, anchors=[9])), "leaves[2].anchors", "anchor 9 outside [0, 5]"),
    (_tree_line(leaves=_leaves_with(1, token_ids=[1, -2])), "leaves[1].token_ids[1]", "greater than or equal"),
    (_tree_line(leaves=_leaves_with(0, slot=False)), "leaves[0].slot", "expected int, got bool"),
    (_tree_line(leaves=_leaves_with(0, entropies=[0.5, "x"])), "leaves[0].entropies[1]", "expected float, got str"),
])
def test_tree_errors_name_file_line_and_field(tmp_path, bad_line, field, needle):
    good = _tree_line()
    (tmp_path / shard_name("trees", 0, 1)).write_text(f"{good}\n\n{bad_line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(read_tree_shards(tmp_path))
    err, path = info.value, tmp_path / shard_name("trees", 0, 1)
    assert (pathlib.Path(err.path), err.line, err.field) == (path, 3, field)
    assert f"{path}:3" in str(err) and needle in str(err)
    if field is not None:
        assert f"field '{field}'" in str(err)


def test_missing_field_and_incomplete_shards(tmp_path):
    record = json.loads(_tree_line())
    del record["leaves"][1]["text"]
    write_jsonl_atomic(tmp_path / shard_name("trees", 1, 2), [record])
    with pytest.raises(DataError, match=r"missing shard\(s\): trees-00000-of-00002.jsonl"):
        list(read_tree_shards(tmp_path))
    write_jsonl_atomic(tmp_path / shard_name("trees", 0, 2), [])
    with pytest.raises(DataError, match=r"trees-00001-of-00002.jsonl:1: field 'leaves\[1\].text': missing required"):
        list(read_tree_shards(tmp_path))
    with pytest.raises(DataError, match=r"no shards named 'trees-NNNNN-of-NNNNN.jsonl' \(run `edu-prm sample`"):
        list(read_tree_shards(tmp_path / "nothing"))


def test_the_label_command_reads_trees_through_the_record(tmp_path):
    path = tmp_path / shard_name("trees", 0, 1)
    path.write_text(_tree_line() + "\n" + _tree_line(mode=None) + "\n", encoding="utf-8")
    assert tree_shard_paths(tmp_path) == [path] and count_records(path) == 2
    with pytest.raises(DataError, match=r":2: field 'mode': expected str, got null"):
        list(label.records_in_range([path], [2], 0, 2))


# ------------------------------------------------------------------------------------- step records
def _step_record(**changes):
    tree = read_tree_file_from_line(_tree_line())
    leaf = Leaf.from_json(tree.leaves[0].to_json())
    (path, *_) = label_paths([Leaf.from_json(x.to_json()) for x in tree.leaves], [True, False, False])
    record = label.path_record(tree, "trees-00000-of-00001.jsonl", leaf, path, "edu", "edu", decode, None).to_json()
    record.update(changes)
    return record


def read_tree_file_from_line(line):
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "t.jsonl"
        path.write_text(line + "\n", encoding="utf-8")
        return next(read_tree_file(path))


@pytest.mark.parametrize("changes, field, needle", [
    ({"labels": [1.0]}, "labels", "1 entries for 2 steps"),
    ({"label_kind": ["hard", "firm"]}, "label_kind[1]", "'hard' or 'soft'"),
    ({"final_correct": 1}, "final_correct", "expected bool, got int"),
    ({"step_ids": [[11, 12], [13, True]]}, "step_ids[1][1]", "expected int, got bool"),
    ({"provenance": {"method": "edu"}}, "provenance.source_shard", "missing required field"),
])
def test_step_errors_name_file_line_and_field(tmp_path, changes, field, needle):
    write_jsonl_atomic(tmp_path / shard_name("steps", 0, 1), [_step_record(), _step_record(**changes)])
    with pytest.raises(DataError) as info:
        list(read_step_shards(tmp_path))
    assert (info.value.line, info.value.field) == (2, field) and needle in str(info.value)
    assert f"{shard_name('steps', 0, 1)}:2: field '{field}'" in str(info.value)


def test_training_reads_label_shards_and_training_only_shards(tmp_path):
    full = _step_record()
    assert StepRecord.model_validate(full).tfds_example()["step_lengths"] == [len(s) for s in full["step_ids"]]
    write_jsonl_atomic(tmp_path / "a" / shard_name("steps", 0, 1), [full])
    (back,) = load_label_records(tmp_path / "a")
    assert back == full  # the training fields first, then the rest of the record
    # benchmarks/toy_verifier.py writes only what training reads
    minimal = {"id": "q/ref", "question_id": "q", "prompt_ids": [1, 2], "step_ids": [[3], [4, 5]], "labels": [1, 0]}
    write_jsonl_atomic(tmp_path / "b" / shard_name("steps", 0, 1), [minimal])
    assert load_label_records(tmp_path / "b") == [minimal]
    write_jsonl_atomic(tmp_path / "c" / shard_name("steps", 0, 1), [{**minimal, "labels": [1.0]}])
    with pytest.raises(DataError, match=r"steps-00000-of-00001.jsonl:1: field 'labels': 1 entries for 2 steps"):
        load_label_records(tmp_path / "c")


# ----------------------------------------------------------------------------------- property test
TREE_FIELD_KINDS = {"id": (str, int), "index": (int,), "problem": (str,), "prompt": (str,), "prompt_ids": (list,),
                    "mode": (str,), "params": (dict,), "leaves": (list,), "distinct_tokens": (int,)}
LEAF_FIELD_KINDS = {"slot": (int,), "token_ids": (list,), "anchors": (list,), "text": (str,)}
STEP_FIELD_KINDS = {"id": (str,), "question_id": (str,), "prompt": (str,), "prompt_ids": (list,),
                    "steps": (list,), "step_ids": (list,), "labels": (list,), "label_kind": (list,),
                    "target": (str,), "final_correct": (bool,), "provenance": (dict,)}
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                        st.text(max_size=20), st.lists(st.integers(0, 9), max_size=3),
                        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _kind_matches(value, kinds):
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


def _wrong_typed(draw, record, field_kinds):
    field = draw(st.sampled_from(sorted(field_kinds)))
    value = draw(JSON_VALUES.filter(lambda v: not _kind_matches(v, field_kinds[field])))
    return json.dumps({**record, field: value}).encode()


@st.composite
def malformed_lines(draw, valid: dict, field_kinds: dict, nested: tuple[str, dict] | None = None) -> bytes:
    """One non-blank line that is not a valid record (never containing a newline)."""
    good = json.dumps(valid, ensure_ascii=False).encode()
    kind = draw(st.sampled_from(["bytes", "truncated", "wrong_type", "nested_wrong_type", "bom", "huge"]))
    if kind == "bytes":
        raw = draw(st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\n", b"\x00")))
        return raw if raw.decode("utf-8", "replace").strip() else b"\x00"
    if kind == "truncated":
        return good[:draw(st.integers(1, len(good) - 1))]
    if kind == "wrong_type" or nested is None:
        return _wrong_typed(draw, valid, field_kinds)
    if kind == "nested_wrong_type":
        key, kinds = nested
        items = list(valid[key])
        i = draw(st.integers(0, len(items) - 1))
        items[i] = json.loads(_wrong_typed(draw, items[i], kinds))
        return json.dumps({**valid, key: items}).encode()
    if kind == "bom":
        return b"\xef\xbb\xbf" + good
    size = draw(st.sampled_from([10_000, 200_000]))
    how = draw(st.sampled_from(["list_then_bool", "digits", "string_for_int"]))
    if how == "list_then_bool":
        return json.dumps({**valid, "prompt_ids": [0] * size + [True]}).encode()
    if how == "digits":
        return good.replace(b'"prompt_ids": [', b'"prompt_ids": [' + b"7" * size + b", ", 1)
    scalar = next(f for f, kinds in sorted(field_kinds.items()) if kinds in ((int,), (bool,)))
    return json.dumps({**valid, scalar: "9" * size}).encode()  # a huge string where a number is expected


def _check_reader_fails_on(read, prefix, valid, line):
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / shard_name(prefix, 0, 1)
        good = json.dumps(valid, ensure_ascii=False).encode()
        path.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
        with pytest.raises(DataError) as info:
            list(read(d))
        assert pathlib.Path(info.value.path) == path and info.value.line == 2
        assert f"{path}:2" in str(info.value)


VALID_TREE = json.loads(_tree_line())
VALID_STEP = _step_record()
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(line=malformed_lines(VALID_TREE, TREE_FIELD_KINDS, ("leaves", LEAF_FIELD_KINDS)))
def test_any_malformed_tree_line_is_a_data_error_naming_file_and_line(line):
    _check_reader_fails_on(read_tree_shards, "trees", VALID_TREE, line)


@FAST
@given(line=malformed_lines(VALID_STEP, STEP_FIELD_KINDS))
def test_any_malformed_step_line_is_a_data_error_naming_file_and_line(line):
    _check_reader_fails_on(read_step_shards, "steps", VALID_STEP, line)


def test_leaf_record_matches_the_sampler_leaf():
    """The record's fields are the Leaf's, in its order (the order `Leaf.to_json` writes)."""
    assert [f for f in LeafRecord.model_fields] == [f.name for f in dataclasses.fields(Leaf)]
