"""The toy ProcessBench (toy/processbench.py): exact labels on hand-worked slips, balanced subsets of held-out
problems, determinism, the official metric on exact-truth and all-fine scorers, and `edu-prm eval-processbench
--config.data=toy` end to end (cached, and scored exactly as a ProcessBench dir is)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from edu_prm_jax import cli
from edu_prm_jax.api import load_tokenizer
from edu_prm_jax.models.checkpoints import load_hf_model
from edu_prm_jax.models.prm import PRM, load_prm, save_prm
from edu_prm_jax.toy import processbench as pb
from edu_prm_jax.toy import world as toy
from edu_prm_jax.toy.audit import exact_step_correctness
from edu_prm_jax.toy.defaults import TOY_POLICY_DIR, toy_config_of

PROBLEM = "Start with 7. Add 5. Multiply by 3. What is the result?"
OPS = [("+", 5), ("*", 3)]
SPEC = pb.ToyBenchSpec(n=24, seed=0)


def line_by_line_label(problem: str, steps: list[str]) -> int:
    """An independent reading of the label: the first line that is not the reference's line at that position."""
    reference = toy.render(*toy.ToyTask.parse_problem(problem))["solution"].split("\n")
    for i, step in enumerate(steps):
        if i >= len(reference) or step != reference[i]:
            return i
    return -1


# ------------------------------------------------------------------------------------------------ hand-worked
def test_hand_worked_labels():
    reference = ["7 + 5 = 12", "12 * 3 = 36", "The answer is \\boxed{36}."]
    assert toy.render(7, OPS)["solution"].split("\n") == reference
    assert pb.exact_first_error(PROBLEM, reference) == -1
    cases = [  # (line, kind, value) -> the solution a slip there writes (later lines recomputed), label
        ((1, "result", 35), ["7 + 5 = 12", "12 * 3 = 35", "The answer is \\boxed{35}."], 1),
        ((0, "result", 13), ["7 + 5 = 13", "13 * 3 = 39", "The answer is \\boxed{39}."], 0),
        ((1, "operand", 4), ["7 + 5 = 12", "12 * 4 = 48", "The answer is \\boxed{48}."], 1),
        ((0, "operand", 6), ["7 + 6 = 13", "13 * 3 = 39", "The answer is \\boxed{39}."], 0),
        ((0, "start", 9), ["9 + 5 = 14", "14 * 3 = 42", "The answer is \\boxed{42}."], 0),
        ((2, "result", 37), ["7 + 5 = 12", "12 * 3 = 36", "The answer is \\boxed{37}."], 2),  # the answer line
    ]
    for (line, kind, value), steps, label in cases:
        assert pb.corrupt_chain(7, OPS, line, kind, value) == steps
        assert pb.exact_first_error(PROBLEM, steps) == label
    # text is compared exactly: a trailing space makes line 1 wrong; a wrong box after right lines is label 2
    assert pb.exact_first_error(PROBLEM, ["7 + 5 = 12", "12 * 3 = 36 ", "The answer is \\boxed{36}."]) == 1
    assert pb.exact_first_error(PROBLEM, ["7 + 5 = 12", "12 * 3 = 36", "The answer is \\boxed{6}."]) == 2
    assert pb.exact_first_error(PROBLEM, ["7 + 5 = 12", "The answer is \\boxed{12}."]) == 1  # a skipped line


def test_corrupt_chain_refuses_a_non_slip_and_out_of_bounds_values():
    cfg = toy.ToyConfig(max_value=100)
    with pytest.raises(ValueError, match="correct one"):
        pb.corrupt_chain(7, OPS, 1, "result", 36)
    with pytest.raises(ValueError, match="correct one"):
        pb.corrupt_chain(7, OPS, 1, "operand", 3)
    with pytest.raises(ValueError, match="leaves the value bounds"):
        pb.corrupt_chain(7, OPS, 1, "operand", 9, cfg)  # 12 * 9 = 108 >= 100
    with pytest.raises(ValueError, match="needs 0 <= line <= 1"):
        pb.corrupt_chain(7, OPS, 2, "operand", 4)
    with pytest.raises(ValueError, match="not a toy problem"):
        pb.exact_first_error("What is 2 + 2?", ["4"])


def test_random_slips_propagate_and_are_labelled_at_their_line():
    """Property over many problems: lines before the slip are the reference's, the slipped line differs, every
    later line starts from the previous result and is correct arithmetic, and all values are within bounds."""
    cfg = toy_config_of()
    rng = random.Random(5)
    kinds = set()
    for p in toy.generate_split("test", 200, cfg, seed=3):
        steps, line, kind = pb.draw_corruption(p["problem"], rng, cfg)
        kinds.add(kind)
        reference = p["solution"].split("\n")
        assert len(steps) == len(reference) and steps[:line] == reference[:line] and steps[line] != reference[line]
        assert line_by_line_label(p["problem"], steps) == line
        parsed = [toy.ToyTask.parse_step(s) for s in steps[:-1]]
        for i, (a, op, b, c) in enumerate(parsed):
            assert toy.in_bounds(a, cfg) and toy.in_bounds(c, cfg)
            if i > 0:
                assert a == parsed[i - 1][3]  # each line consumes the previous line's (possibly wrong) result
            if not (kind == "result" and i == line):
                assert toy.apply_op(op, a, b) == c
        final = parsed[-1][3] if not (kind == "result" and line == len(parsed)) else None
        if final is not None:
            assert steps[-1] == f"The answer is \\boxed{{{final}}}."
    assert kinds == {"result", "operand", "start"}


def test_specs_are_parsed_with_one_line_errors():
    assert pb.parse_toy_spec("toy") == (64, 0)
    assert pb.parse_toy_spec("toy:10") == (10, 0)
    assert pb.parse_toy_spec("toy:10:3") == (10, 3)
    for bad in ("toy:x", "toy:1", "toy:4:2:1", "toy:-4"):
        with pytest.raises(ValueError, match="data="):
            pb.parse_toy_spec(bad)
    assert pb.is_toy_spec("toy:4") and not pb.is_toy_spec("./toy") and not pb.is_toy_spec("/data/pb")
    assert pb.parse_temperatures("0, 0.7,1.3") == (0.0, 0.7, 1.3)
    with pytest.raises(ValueError, match="temperatures="):
        pb.parse_temperatures("0,hot")


# ------------------------------------------------------------------------------------------------ built items
@pytest.fixture(scope="module")
def built():
    return pb.build_toy_processbench(SPEC)


def test_subsets_are_balanced_held_out_and_distinct(built):
    items, stats = built
    cfg = toy_config_of()
    by = pb.items_by_subset(items)
    assert list(by) == ["policy", "corrupted"]
    for name, subset in by.items():
        assert len(subset) == SPEC.n
        assert sum(it["label"] != -1 for it in subset) == SPEC.n // 2
        assert all(it["source"] == name for it in subset)
        for cls in (True, False):  # at most one item per problem and class
            ids = [it["problem_id"] for it in subset if (it["label"] != -1) == cls]
            assert len(ids) == len(set(ids))
    assert all(toy.split_of(it["problem"], cfg) == "test" for it in items)  # never a training problem
    assert not {it["problem_id"] for it in by["policy"]} & {it["problem_id"] for it in by["corrupted"]}
    assert len({it["id"] for it in items}) == len(items)
    policy_generators = {it["generator"] for it in by["policy"]}
    assert "toy-policy:greedy" in policy_generators and len(policy_generators) >= 3  # several temperatures
    assert {it["generator"] for it in by["corrupted"]} >= {"reference", "corrupt:result", "corrupt:operand"}
    assert stats["subsets"]["policy"]["n_err"] == SPEC.n // 2


def test_every_label_is_the_exact_truth(built):
    items, _ = built
    for it in items:
        exact = exact_step_correctness(it["problem"], [s + "\n" for s in it["steps"][:-1]] + it["steps"][-1:])
        first_wrong = exact.index(False) if False in exact else -1
        assert it["label"] == first_wrong == line_by_line_label(it["problem"], it["steps"]), it
        answer = toy.render(*toy.ToyTask.parse_problem(it["problem"]))["answer"]
        assert it["final_answer_correct"] == toy.ToyTask.check("\n".join(it["steps"]), answer)
        if it["label"] == -1:
            assert it["final_answer_correct"]
        assert it["steps"][-1].startswith("The answer is \\boxed{") and all(s.strip() for s in it["steps"])


def test_same_seed_same_items_other_seed_other_items(built):
    items, _ = built
    again, _ = pb.build_toy_processbench(SPEC)
    assert again == items
    other, _ = pb.build_toy_processbench(dataclasses.replace(SPEC, seed=1))
    assert [it["problem"] for it in other] != [it["problem"] for it in items]
    assert [it["steps"] for it in other] != [it["steps"] for it in items]


def test_oracle_and_all_fine_scorers_under_the_official_metric(built):
    items, _ = built
    truth = [[1.0 if ok else 0.0 for ok in exact_step_correctness(
        it["problem"], [s + "\n" for s in it["steps"][:-1]] + it["steps"][-1:])] for it in items]
    oracle = pb.evaluate_step_scores(items, truth, theta=0.5)
    for key in ("fixed", "chosen", "best"):
        assert oracle[key]["average"]["f1"] == 100.0
        for m in oracle[key]["subsets"].values():
            assert (m["acc_err"], m["acc_corr"], m["f1"]) == (100.0, 100.0, 100.0)
    fine = pb.evaluate_step_scores(items, [[1.0] * len(it["steps"]) for it in items], theta=0.5)
    for m in fine["fixed"]["subsets"].values():
        assert (m["acc_err"], m["acc_corr"], m["f1"]) == (0.0, 100.0, 0.0)
    assert fine["items"] == {"policy": SPEC.n, "corrupted": SPEC.n}
    # "step 0 is wrong" predicts exactly the items whose first error is line 0
    first = pb.evaluate_step_scores(items, [[0.0] + [1.0] * (len(it["steps"]) - 1) for it in items])
    for name, m in first["fixed"]["subsets"].items():
        err = [it for it in items if it["source"] == name and it["label"] != -1]
        assert m["acc_err"] == pytest.approx(100.0 * sum(it["label"] == 0 for it in err) / len(err))
        assert m["acc_corr"] == 0.0
    with pytest.raises(ValueError, match="score lists"):
        pb.evaluate_step_scores(items, truth[:-1])


def test_a_cached_benchmark_of_other_settings_is_never_reused(tmp_path, built):
    items, stats = built
    identity = pb.spec_identity(SPEC)
    bench = tmp_path / pb.bench_dir_name(identity)
    pb.write_toy_processbench(items, {"identity": {**identity, "seed": 99}, "stats": stats}, bench)
    with pytest.raises(ValueError, match="a toy benchmark of other settings"):
        pb.load_or_build(SPEC, tmp_path)
    pb.write_toy_processbench(items, {"identity": identity, "stats": stats}, bench)
    loaded, where = pb.load_or_build(SPEC, tmp_path)
    assert loaded == items and str(where) == str(bench)
    assert json.loads((bench / "policy.json").read_text())[0]["steps"] == items[0]["steps"]


# ------------------------------------------------------------------------------------------------ the command
def test_eval_processbench_on_toy_data_end_to_end(tmp_path, monkeypatch):
    w = tmp_path / "w"
    save_prm(PRM.from_policy(load_hf_model(TOY_POLICY_DIR), head="scalar", seed=2), w / "prm" / "hf")
    argv = ["eval-processbench", f"--workdir={w}", f"--config.tokenizer={TOY_POLICY_DIR}", "--config.data=toy:8",
            "--config.max_tokens=256", "--log_level=error"]
    assert cli.main(argv) == 0
    res = json.loads((w / "processbench" / "results.json").read_text())
    assert res["items"] == {"policy": 8, "corrupted": 8} and res["data"] == "toy:8"
    for name in ("fixed", "chosen", "best"):
        assert set(res[name]["subsets"]) == {"policy", "corrupted"}
        for m in res[name]["subsets"].values():
            assert 0.0 <= m["f1"] <= 100.0 and (m["n_err"], m["n_corr"]) == (4, 4)
    assert res["best"]["average"]["f1"] >= res["fixed"]["average"]["f1"] - 1e-9
    assert res["trivial"]["always -1"]["average_f1"] == 0.0
    assert "threshold tuned on corrupted" in (w / "processbench" / "report.md").read_text()
    (bench,) = (w / "toy_processbench").iterdir()

    # the same items through the ProcessBench-dir path (steps joined the same way) give the same numbers
    w2 = tmp_path / "w2"
    save_prm(PRM.from_policy(load_hf_model(TOY_POLICY_DIR), head="scalar", seed=2), w2 / "prm" / "hf")
    assert cli.main(["eval-processbench", f"--workdir={w2}", f"--config.tokenizer={TOY_POLICY_DIR}",
                     f"--config.data={bench}", "--config.subsets=policy,corrupted", "--config.step_joiner=\n",
                     "--config.theta_split=corrupted", "--config.max_tokens=256", "--log_level=error"]) == 0
    res2 = json.loads((w2 / "processbench" / "results.json").read_text())
    for name in ("fixed", "chosen", "best"):
        assert res2[name] == res[name]

    # the Python API (what `edu-prm experiment` calls) on the cached items: the same numbers again
    items, _ = pb.read_toy_processbench(bench)
    prm = load_prm(w / "prm" / "hf", None)
    api = pb.evaluate_prm(prm, load_tokenizer(TOY_POLICY_DIR), items, max_tokens=256)
    for name in ("fixed", "chosen", "best"):  # one device here, the command's 8-device mesh there
        assert api[name]["theta"] == pytest.approx(res[name]["theta"], abs=1e-6)
        for subset, m in res[name]["subsets"].items():
            assert api[name]["subsets"][subset] == pytest.approx(m)

    # a rerun with the same spec reuses the cached items; another spec never does
    def no_build(*args, **kwargs):
        raise RuntimeError("rebuilt")

    monkeypatch.setattr(pb, "build_toy_processbench", no_build)
    assert cli.main(argv) == 0
    assert [p.name for p in (w / "toy_processbench").iterdir()] == [bench.name]
    with pytest.raises(RuntimeError, match="rebuilt"):
        cli.main([*argv[:3], "--config.data=toy:8:1", *argv[4:]])
    with pytest.raises(RuntimeError, match="rebuilt"):
        cli.main([*argv, "--config.toy.temperatures=0,0.7"])


def test_bad_toy_spec_fails_before_anything_loads(tmp_path, capsys):
    assert cli.main(["eval-processbench", f"--workdir={tmp_path}", "--config.data=toy:abc"]) == 1
    assert "expected toy, toy:<items per subset>" in capsys.readouterr().err
    assert not (tmp_path / "toy_processbench").exists()
