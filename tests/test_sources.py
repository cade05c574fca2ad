"""Dataset readers on the shipped real files, broken copies, and TFDS array_record IO without TensorFlow."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from edu_prm_jax.io.jsonl import DataError
from edu_prm_jax.records import sources as S

REPO = pathlib.Path(__file__).resolve().parents[1]

# Counts from shared/data/SOURCES.md (and the ProcessBench paper): items, items with label != -1.
PROCESSBENCH = {"gsm8k": (400, 207), "math": (1000, 594), "olympiadbench": (1000, 661), "omnimath": (1000, 759)}


# ------------------------------------------------------------------------------------------ real files
@pytest.mark.parametrize("subset", sorted(PROCESSBENCH))
def test_processbench_counts(shared_data, subset):
    path = shared_data / "processbench" / f"{subset}.json"
    assert S.detect_format(path) == "processbench"
    items = list(S.read_source(path))
    n, n_err = PROCESSBENCH[subset]
    assert len(items) == n and sum(r["label"] != -1 for r in items) == n_err
    assert all(-1 <= r["label"] < len(r["steps"]) for r in items)
    assert items[0]["id"] == f"{subset}-0" and items[0]["source"] == f"processbench-{subset}"


def test_math500(shared_data):
    path = shared_data / "math500" / "test.jsonl"
    qs = list(S.read_questions(path))
    assert S.detect_format(path) == "math" and len(qs) == 500
    assert all(q["answer"] for q in qs) and len({q["id"] for q in qs}) == 500
    first = json.loads(path.read_text().splitlines()[0])
    assert qs[0]["id"] == first["unique_id"] and qs[0]["answer"] == first["answer"]
    assert qs[0]["solution"] == first["solution"] and qs[0]["subject"] == first["subject"]


@pytest.mark.parametrize("split, n", [("test", 1319), ("train", 7473)])
def test_gsm8k(shared_data, split, n):
    path = shared_data / "gsm8k" / f"{split}.jsonl"
    qs = list(S.read_questions(path))
    assert S.detect_format(path) == "gsm8k" and len(qs) == n
    assert [q["id"] for q in qs[:2]] == [f"gsm8k-{split}-0", f"gsm8k-{split}-1"]
    assert all("####" not in q["solution"] and q["answer"] for q in qs)
    if split == "test":  # Janet's ducks: 16 - 3 - 4 = 9 eggs at $2 -> 18
        assert qs[0]["answer"] == "18" and qs[0]["problem"].startswith("Janet")
        assert qs[0]["solution"].endswith("every day at the farmer’s market.")


@pytest.mark.parametrize(
    "name, n", [("phase1-train", 3), ("phase1-test", 1), ("phase2-test", 1)]
)
def test_prm800k_samples(shared_data, name, n):
    path = shared_data / "prm800k_samples" / f"prm800k-{name}-example.json"
    recs = list(S.read_source(path))
    assert S.detect_format(path) == "prm800k" and len(recs) == n
    for r in recs:
        assert len(r["steps"]) == len(r["ratings"]) == len(r["human_step"]) > 0
        assert r["problem"] and r["answer"] is not None
        # human-written replacements carry no rating; model steps along the path are rated
        assert all((rt is None) == h for rt, h in zip(r["ratings"], r["human_step"]))


def test_prm800k_path_by_hand(shared_data):
    # phase1-test: step 1 was rewritten by a human (all 5 completions -1), step 5 chose completion 4.
    raw = json.loads((shared_data / "prm800k_samples" / "prm800k-phase1-test-example.json").read_text())
    (rec,) = S.read_prm800k(shared_data / "prm800k_samples" / "prm800k-phase1-test-example.json")
    steps = raw["label"]["steps"]
    assert rec["steps"][1] == steps[1]["human_completion"]["text"]
    assert rec["steps"][5] == steps[5]["completions"][4]["text"] and rec["ratings"] == [1, None, 1, 1, 1, 1]
    # phase2 found_error: the trajectory ends on the -1 rated pre-generated step.
    (p2,) = S.read_prm800k(shared_data / "prm800k_samples" / "prm800k-phase2-test-example.json")
    assert p2["finish_reason"] == "found_error" and p2["ratings"] == [1, 0, 1, 1, 1, 1, -1]


def _shepherd_record():
    text = (
        "Tom has 3 apples and buys 2 more. How many? Step 1: 3 + 2 = 5 ки\n"
        "Step 2: He eats one, so 5 - 1 = 4 ки\nStep 3: The answer is: 4 ки"
    )
    label = (
        "Tom has 3 apples and buys 2 more. How many? Step 1: 3 + 2 = 5 +\n"
        "Step 2: He eats one, so 5 - 1 = 4 -\nStep 3: The answer is: 4 -"
    )
    return {"input": text, "label": label, "task": "GSM8K"}


def test_math_shepherd_by_hand(tmp_path):
    p = tmp_path / "shepherd.jsonl"
    p.write_text(json.dumps(_shepherd_record(), ensure_ascii=False) + "\n", encoding="utf-8")
    assert S.detect_format(p) == "math_shepherd"
    (r,) = S.read_source(p)
    assert r["problem"] == "Tom has 3 apples and buys 2 more. How many?"
    assert r["steps"] == ["3 + 2 = 5", "He eats one, so 5 - 1 = 4", "The answer is: 4"]
    assert r["labels"] == [1, 0, 0] and r["id"] == "math_shepherd-shepherd-0"


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda r: r.update(label=r["label"].replace("4 -\nStep 3", "4 ?\nStep 3")), "expected '+' or '-'"),
        (lambda r: r.update(label=r["label"].replace("Tom", "Tim")), "differs from 'input'"),
        (lambda r: r.update(label=r["label"] + " +"), "length does not match"),
    ],
)
def test_math_shepherd_bad_label(tmp_path, mutate, needle):
    rec = _shepherd_record()
    mutate(rec)
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(_shepherd_record(), ensure_ascii=False) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=re.escape(needle)) as info:
        list(S.read_source(p))
    assert info.value.line == 2 and info.value.field == "label" and str(p) in str(info.value)


# ---------------------------------------------------------------------------------------- broken copies
def _copy_lines(src, dst, n=5):
    lines = src.read_text(encoding="utf-8").splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def test_truncated_gsm8k_line(shared_data, tmp_path):
    dst = tmp_path / "test.jsonl"
    lines = _copy_lines(shared_data / "gsm8k" / "test.jsonl", dst)
    lines[3] = lines[3][: len(lines[3]) // 2]
    dst.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{dst}:4: invalid JSON"):
        list(S.read_questions(dst))


def test_gsm8k_missing_marker_and_missing_field(shared_data, tmp_path):
    dst = tmp_path / "test.jsonl"
    lines = _copy_lines(shared_data / "gsm8k" / "test.jsonl", dst)
    rec = json.loads(lines[2])
    rec["answer"] = rec["answer"].replace("####", "=")
    lines[2] = json.dumps(rec)
    dst.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{dst}:3: field 'answer': expected exactly one '####"):
        list(S.read_gsm8k_jsonl(dst))
    del rec["answer"]
    lines[2] = json.dumps(rec)
    dst.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{dst}:3: field 'answer': missing required field"):
        list(S.read_gsm8k_jsonl(dst))


def test_math_wrong_type(shared_data, tmp_path):
    dst = tmp_path / "test.jsonl"
    lines = _copy_lines(shared_data / "math500" / "test.jsonl", dst)
    rec = json.loads(lines[1])
    rec["problem"] = ["not", "a", "string"]
    lines[1] = json.dumps(rec)
    dst.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{dst}:2: field 'problem': expected str, got list"):
        list(S.read_source(dst))


def test_processbench_errors_name_item(shared_data, tmp_path):
    items = json.loads((shared_data / "processbench" / "gsm8k.json").read_text())[:6]
    items[4]["label"] = len(items[4]["steps"])
    dst = tmp_path / "gsm8k.json"
    dst.write_text(json.dumps(items, indent=2))
    with pytest.raises(DataError, match=rf"{dst} item 4: field 'label': label"):
        list(S.read_processbench(dst))
    items[4]["label"] = -1
    items[2]["steps"][1] = 3
    dst.write_text(json.dumps(items, indent=2))
    with pytest.raises(DataError, match=rf"{dst} item 2: field 'steps': .*element 1 is int"):
        list(S.read_processbench(dst))
    dst.write_text(json.dumps(items, indent=2)[:-40])
    with pytest.raises(DataError, match="invalid JSON") as info:
        list(S.read_processbench(dst))
    assert info.value.line is not None


def test_prm800k_error_names_object_line(shared_data, tmp_path):
    text = (shared_data / "prm800k_samples" / "prm800k-phase1-train-example.json").read_text()
    objs = [o for _, o in S.iter_concatenated_json(shared_data / "prm800k_samples" /
                                                   "prm800k-phase1-train-example.json")]
    del objs[2]["question"]["problem"]
    dst = tmp_path / "p.json"
    dumped = [json.dumps(o, indent=4) for o in objs]
    dst.write_text("\n".join(dumped) + "\n")
    start_line = dumped[0].count("\n") + dumped[1].count("\n") + 3
    with pytest.raises(DataError, match=rf"{dst}:{start_line}: field 'problem'"):
        list(S.read_prm800k(dst))
    assert text  # the original is untouched (read-only tree)


def test_detect_format_rejects_unknown(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match="cannot detect"):
        S.detect_format(p)
    with pytest.raises(DataError, match="not questions"):
        list(S.read_questions(tmp_path / "x.jsonl", fmt="processbench"))


def test_generic_jsonl(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"id": 7, "question": "1+1?", "answer": 2, "extra": "kept"}\n{"id": "b", "problem": "2+2?"}\n')
    assert S.detect_format(p) == "generic"
    a, b = S.read_questions(p)
    assert a == {"id": "7", "problem": "1+1?", "answer": "2", "solution": None, "source": "mine", "extra": "kept"}
    assert b["answer"] is None and b["problem"] == "2+2?"


# ------------------------------------------------------------------------------------------------- TFDS
_NO_TF = """
import sys

class _HideTF:
    # Wraps every import finder so that tensorflow looks uninstalled (find_spec -> None).
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [_HideTF(f) for f in sys.meta_path]
try:
    import tensorflow  # noqa: F401
    raise SystemExit("tensorflow importable")
except ModuleNotFoundError:
    pass
# Not sys.modules['tensorflow'] = None: TFDS (etils.enp.lazy.has_tf) reads the mere key as "TF is loaded"
# and then calls tf.dtypes, so that spelling breaks `import tensorflow_datasets` itself.
"""


def _run_without_tf(code: str, tmp_path):
    script = tmp_path / "no_tf.py"
    script.write_text(_NO_TF + textwrap.dedent(code) + "\nassert 'tensorflow' not in sys.modules\nprint('OK')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_tfds_write_read_without_tensorflow(tmp_path):
    _run_without_tf(
        f"""
        import json, numpy as np
        from edu_prm_jax.io.tfds import write_tfds_dataset, open_tfds_source, grain_loader
        recs = [{{"id": f"q{{i}}", "tokens": list(range(i, 2 * i)), "ends": [i] * (i % 3),
                  "scores": [0.25 * i] * 2, "label": i - 1, "steps": ["s"] * i}} for i in range(11)]
        spec = {{"id": "string", "tokens": "int32[]", "ends": "int64[]", "scores": "float32[]",
                 "label": "int64", "steps": "string[]"}}
        out = write_tfds_dataset(recs, r"{tmp_path}/data", "toy_steps", spec, num_shards=3)
        assert len(list(out.glob("toy_steps-train.array_record-*-of-00003"))) == 3, list(out.iterdir())
        src = open_tfds_source(r"{tmp_path}/data", "toy_steps", "train")
        assert len(src) == 11
        got = list(grain_loader(src, shuffle=False))
        for r, g in zip(recs, got):
            assert g["id"] == r["id"] and g["steps"] == r["steps"] and g["label"] == r["label"]
            assert g["tokens"].dtype == np.int32 and g["tokens"].tolist() == r["tokens"]
            assert g["ends"].dtype == np.int64 and g["ends"].tolist() == r["ends"]
            assert g["scores"].dtype == np.float32 and np.allclose(g["scores"], r["scores"])
        """,
        tmp_path,
    )


@pytest.fixture(scope="module")
def toy_source(tmp_path_factory):
    from edu_prm_jax.io.tfds import open_tfds_source, write_tfds_dataset

    d = tmp_path_factory.mktemp("tfds")
    recs = [{"id": f"r{i}", "tokens": [i, i + 1]} for i in range(40)]
    write_tfds_dataset(recs, d, "order", {"id": "string", "tokens": "int32[]"}, num_shards=2)
    return open_tfds_source(d, "order", "train")


def test_grain_order_deterministic_per_seed(toy_source):
    from edu_prm_jax.io.tfds import grain_loader

    ids = lambda seed, **kw: [e["id"] for e in grain_loader(toy_source, seed=seed, **kw)]
    a, a2, b = ids(1), ids(1), ids(2)
    assert a == a2 and a != b
    assert sorted(a) == sorted(b) == sorted(f"r{i}" for i in range(40))  # a permutation, nothing lost
    two = ids(1, num_epochs=2)
    assert two[:40] == a and sorted(two[40:]) == sorted(a) and two[40:] != a  # each epoch reshuffled
    batches = list(grain_loader(toy_source, seed=1, batch_size=8, batch_fn=lambda xs: [x["id"] for x in xs]))
    assert [i for batch in batches for i in batch] == a and len(batches) == 5


def test_prepare_source_real_and_rerun(shared_data, tmp_path):
    from edu_prm_jax.io.tfds import grain_loader, open_tfds_source
    from edu_prm_jax.records.sources import prepare_source

    path = shared_data / "processbench" / "gsm8k.json"
    out = prepare_source(path, tmp_path, num_shards=2)
    assert out == tmp_path / "processbench_gsm8k" / "1.0.0"
    got = list(grain_loader(open_tfds_source(tmp_path, "processbench_gsm8k", "train"), shuffle=False))
    ref = list(S.read_processbench(path))
    assert len(got) == 400 and sum(g["label"] != -1 for g in got) == 207
    assert got[17]["steps"] == ref[17]["steps"] and got[17]["final_answer_correct"] == ref[17]["final_answer_correct"]
    mtimes = sorted(os.stat(p).st_mtime_ns for p in out.iterdir())
    assert prepare_source(path, tmp_path, num_shards=2) == out  # a rerun reuses the finished dataset
    assert sorted(os.stat(p).st_mtime_ns for p in out.iterdir()) == mtimes


def test_prepare_source_failure_leaves_nothing(shared_data, tmp_path):
    from edu_prm_jax.io.tfds import open_tfds_source, write_tfds_dataset
    from edu_prm_jax.records.sources import prepare_source

    dst = tmp_path / "src" / "test.jsonl"
    dst.parent.mkdir()
    lines = _copy_lines(shared_data / "gsm8k" / "test.jsonl", dst, n=20)
    lines[15] = lines[15][:30]
    dst.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{dst}:16"):
        prepare_source(dst, tmp_path / "data")
    assert not (tmp_path / "data" / "gsm8k_test").exists()
    # A record failing mid-generation: TFDS's incomplete dir is removed, no version dir appears.
    recs = [{"id": "a", "n": 1}, {"id": "b", "n": 2}, {"id": "c", "n": "three"}]
    with pytest.raises(DataError, match="item 2: field 'n'"):
        write_tfds_dataset(recs, tmp_path / "data", "broken", {"id": "string", "n": "int64"})
    assert not (tmp_path / "data" / "broken" / "1.0.0").exists()
    assert not list((tmp_path / "data").rglob("*.array_record*"))
    with pytest.raises(FileNotFoundError):
        open_tfds_source(tmp_path / "data", "gsm8k_test", "train")


def test_tfds_write_leaves_no_temp_directories(tmp_path, monkeypatch):
    import tempfile

    from edu_prm_jax.io.tfds import write_tfds_dataset

    temp_root = tmp_path / "temp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    write_tfds_dataset([{"id": "a"}], tmp_path / "data", "leak_check", {"id": "string"})
    assert list(temp_root.iterdir()) == []  # tfds's empty mkdtemp("tfds") metadata dir included
    assert tempfile.gettempdir() == str(temp_root)  # the temp root is restored
