"""The benchmark harness: paired ratios worked by hand, interleaved rounds with the warm-up left out, thread pinning
refused after import, the README table between its markers, and the decode / train-step benchmarks end to end
on a tiny model (sides cross-checked: same tokens, same losses)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from benchmarks import harness
from benchmarks.__main__ import BEGIN, END, reproduction, reproduction_table, update_readme


def test_paired_ratio_is_per_round():
    fast = harness.Timing([1.0, 2.0, 4.0], warmup_s=9.0)
    slow = harness.Timing([3.0, 3.0, 4.0], warmup_s=1.0)
    r = harness.paired_ratio(fast, slow)
    assert r.values == [3.0, 1.5, 1.0]  # 3/1, 3/2, 4/4: not median(slow) / median(fast) = 1.5
    assert (r.median, r.low, r.high) == (1.5, 1.0, 3.0)
    with pytest.raises(ValueError, match="same measure"):
        harness.paired_ratio(fast, harness.Timing([1.0], 0.0))


def test_measure_interleaves_rounds_and_leaves_out_the_warmup():
    calls = []
    sides = {name: (lambda name=name: calls.append(name) or name) for name in ("a", "b", "c")}
    timings, results, load = harness.measure(sides, repeats=3, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-ups, untimed
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # who goes first rotates
    assert all(len(t.seconds) == 3 for t in timings.values())
    assert results == {"a": "a", "b": "b", "c": "c"}
    assert load.other_cores_busy >= 0.0
    with pytest.raises(ValueError, match="repeats"):
        harness.measure(sides, repeats=0)


def test_threads_cannot_be_pinned_after_jax_is_imported():
    import jax  # noqa: F401

    with pytest.raises(ValueError, match="may use"):
        harness.pin_threads(10_000)
    with pytest.raises(RuntimeError, match="before jax or torch"):
        harness.pin_threads(1)


def test_markdown_row_and_readme_markers(tmp_path):
    cell = harness.Cell("decode", {"batch": 8}, {"jax": harness.Timing([0.5, 0.25], 1.0),
                                                 "hf": harness.Timing([1.0, 1.0], 0.1)},
                        {"jax vs hf": harness.Spread([2.0, 4.0])}, {"tokens = hf": "all rows"},
                        {"xla_cpu_threads": 1, "torch_threads": 1}, harness.Load(0.1, 0.2, 0.05))
    table = harness.markdown_table([json.loads(json.dumps(cell.to_json()))])
    row = table.splitlines()[2]
    assert row.startswith("| decode | batch 8 | 1 / torch 1 | jax vs hf: **3.00x** (2.00-4.00) |")
    assert "jax 375.0 ms; hf 1.00 s" in row and "tokens = hf: all rows" in row

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\noutro\n")
    update_readme(readme, "new table")
    assert readme.read_text() == f"intro\n{BEGIN}\nnew table\n{END}\noutro\n"
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="plain.md.*markers"):
        update_readme(tmp_path / "plain.md", "x")
    assert (tmp_path / "plain.md").read_text() == "no markers\n"


TINY = ["--vocab", "128", "--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--inter", "64"]


def _run(module: str, args: list[str], out) -> dict:
    proc = subprocess.run([sys.executable, "-m", module, "--threads", "1", "--json", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_decode_benchmark_end_to_end_checks_tokens(tmp_path):
    r = _run("benchmarks.decode", ["--batch-sizes", "2", "--new-tokens", "6", "--repeats", "2", *TINY],
             tmp_path / "d.json")
    (cell,) = r["cells"]
    assert cell["threads"]["xla_cpu_threads"] == 1 and cell["threads"]["torch_threads"] == 1
    assert cell["check"]["tokens = transformers"] == "all rows"
    assert cell["units"]["tokens"] == 12 and len(cell["timings"]["jax"]["seconds"]) == 2
    if "tunix" in cell["timings"]:
        assert cell["check"]["tokens = tunix"] == "all rows"
    else:
        assert any(n.startswith("tunix skipped") for n in r["notes"])


def test_train_step_benchmark_end_to_end_checks_losses(tmp_path):
    r = _run("benchmarks.train_step", ["--seq-lens", "16", "--batch", "2", "--repeats", "2", *TINY],
             tmp_path / "t.json")
    (cell,) = r["cells"]
    first, after = cell["check"]["first loss"].split(" = "), cell["check"]["loss after 3 steps"].split(" = ")
    assert first[0] == first[1] and after[0] == after[1]
    assert float(after[0]) < float(first[0])  # three AdamW steps on one batch lower its loss
    ratio = cell["ratios"]["jax vs torch"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"]


def _cell(batch: int, threads: int, **ratios: tuple[float, float, float]) -> dict:
    return {"benchmark": "decode (greedy)", "case": {"batch": batch}, "threads": {"xla_cpu_threads": threads},
            "ratios": {k: {"median": m, "min": lo, "max": hi} for k, (m, lo, hi) in ratios.items()}}


def test_reproduction_checks_each_new_median_against_the_earlier_spread(tmp_path):
    earlier = [_cell(1, 1, vs_t=(2.0, 1.5, 2.5)), _cell(8, 1, vs_t=(1.2, 1.1, 1.3)), _cell(8, 2, vs_t=(3.0, 2.9, 3.1))]
    now = [_cell(1, 1, vs_t=(2.5, 2.4, 2.6)),  # at the earlier max: within
           _cell(8, 1, vs_t=(1.05, 1.0, 1.1), vs_u=(1.0, 1.0, 1.0)),  # below the earlier min; a ratio new here
           _cell(8, 2, vs_t=(3.0, 2.0, 4.0)),
           _cell(64, 1, vs_t=(1.0, 1.0, 1.0))]  # a case the earlier run lacks
    rows = reproduction(earlier, now)
    assert [(r["case"], r["threads"], r["ratio"], r["within"]) for r in rows] == [
        ("batch 1", 1, "vs_t", True), ("batch 8", 1, "vs_t", False), ("batch 8", 1, "vs_u", None),
        ("batch 8", 2, "vs_t", True), ("batch 64", 1, "vs_t", None)]
    text = reproduction_table(rows, "old.json")
    assert "| decode (greedy) | batch 8 | 1 | vs_t | 1.20x (1.10-1.30) | 1.05x | **no** |" in text
    assert text.endswith("2 of 3 ratios within the earlier min-max.")
    bad = tmp_path / "results.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(ValueError, match="results.json: not a benchmarks results.json"):
        harness.load_cells(str(bad))


def test_cells_of_separate_runs_are_pooled_round_by_round():
    def run(ratios, seconds, load):
        return [{"benchmark": "decode (greedy)", "case": {"batch": 8}, "threads": {"xla_cpu_threads": 1},
                 "ratios": {"jax vs t": {"values": ratios}}, "check": {"tokens": "all rows"},
                 "timings": {"jax": {"seconds": seconds, "warmup_s": 5.0}},
                 "load": {"load_1m_before": load, "other_cores_busy": 0.1}}]
    merged = harness.merge_cells([run([2.0, 2.2, 2.1], [1.0, 1.1, 0.9], 1.0),
                                  run([1.7, 1.8, 1.9], [1.3, 1.2, 1.4], 1.5)])
    (cell,) = merged
    r = cell["ratios"]["jax vs t"]
    assert r["values"] == [2.0, 2.2, 2.1, 1.7, 1.8, 1.9]
    assert (r["median"], r["min"], r["max"]) == (1.95, 1.7, 2.2)  # pooled: neither run's own (2.1 / 1.8)
    t = cell["timings"]["jax"]
    assert t["repeats"] == 6 and t["median_s"] == 1.15 and (t["min_s"], t["max_s"]) == (0.9, 1.4)
    assert cell["load"] == {"load_1m_before": 1.5, "other_cores_busy": 0.1} and cell["processes"] == 2
    other = run([1.0], [1.0], 1.0)
    other[0]["case"] = {"batch": 64}
    with pytest.raises(ValueError, match="same benchmark cases"):
        harness.merge_cells([run([1.0], [1.0], 1.0), other])
