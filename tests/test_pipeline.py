"""`edu-prm pipeline` end to end at a tiny scale on the shipped toy policy: every stage's files, the report, and
that a rerun resumes (finished stages are not redone) instead of starting over. One N in the eval_bon grid (each N
compiles its own EDU and P-EDU decode programs); test_eval_bon.py covers a grid of several N and seeds."""

import json

from edu_prm_jax import cli
from edu_prm_jax.commands import pipeline
from edu_prm_jax.configs import pipeline as pipeline_config

TINY = ["--config.stages=sample,label,train,eval_bon", "--config.sample.questions=toy:train:12",
        "--config.sample.sampling.num_leaves=4", "--config.sample.batch_questions=12", "--config.train.steps=2",
        "--config.train.rows=8", "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
        "--config.eval_bon.questions=toy:test:6", "--config.eval_bon.n_grid=2", "--config.eval_bon.seeds=0,1",
        "--config.eval_bon.batch_questions=6"]


def test_prm_backbone_sets_only_the_train_stage_policy():
    config = pipeline_config.get_config()
    assert pipeline.stage_config(config, "train").policy == "toy"  # default: the PRM starts from the policy
    config.policy, config.prm_backbone = "/models/instruct", "/models/base"
    assert pipeline.stage_config(config, "train").policy == "/models/base"
    assert {pipeline.stage_config(config, s).policy for s in ("sample", "label", "eval_bon")} == {"/models/instruct"}


def test_pipeline_runs_every_stage_writes_the_report_and_resumes(tmp_path):
    work = tmp_path / "run"
    assert cli.main(["pipeline", f"--workdir={work}", *TINY]) == 0
    for path in ("samples_edu", "labels/label_stats.json", "prm/hf/model.safetensors", "prm/train_summary.json",
                 "eval_bon/results.json", "eval_bon/bon_accuracy_vs_n.png", "eval_bon/bon_accuracy_vs_tokens.png"):
        assert (work / path).exists(), path
    report = (work / "report.md").read_text()
    for heading in ("## Labels", "## PRM training", "## Best-of-N", "## Config"):
        assert heading in report, heading
    assert "](eval_bon/bon_accuracy_vs_n.png)" in report  # image links resolve from the workdir
    shown = json.loads(report.split("```json\n")[1].split("\n```")[0])
    ran = json.loads((work / "eval_bon_config.json").read_text())
    # the report shows the config eval_bon ran with: sample's anchor rule, not eval_bon's own default tau
    assert shown["eval_bon"]["sampling"] == ran["sampling"]
    assert shown["eval_bon"]["sampling"]["tau"] == pipeline_config.get_config().sample.sampling.tau
    assert "processbench" not in shown  # not among TINY's stages
    runs = json.loads((work / "eval_bon" / "results.json").read_text())["runs"]
    assert {r["sampler"] for r in runs} == {"ht", "edu", "p-edu"}
    summary = json.loads((work / "prm" / "train_summary.json").read_text())
    assert {"eval_pair_accuracy", "eval_select_accuracy"} <= summary.keys()

    done = ["prm/hf/model.safetensors", *[str(p.relative_to(work)) for p in (work / "labels").glob("steps-*.jsonl")],
            *[str(p.relative_to(work)) for p in (work / "samples_edu").glob("trees-*.jsonl")],
            *[str(p.relative_to(work)) for p in (work / "eval_bon" / "runs").glob("*/trees-*.jsonl")]]
    stamps = {p: (work / p).stat().st_mtime_ns for p in done}
    assert cli.main(["pipeline", f"--workdir={work}", *TINY]) == 0  # a rerun finds every stage done
    assert {p: (work / p).stat().st_mtime_ns for p in stamps} == stamps
    assert (work / "report.md").is_file()
