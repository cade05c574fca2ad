"""The shipped configs are honest: every field is read by its command, sampling fields reach the sampler by name
(an unmapped one is an error), the pipeline's eval_bon.sampling overrides work, shared fields have one home, and
the configs are found from any directory as the package edu_prm_jax.configs."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import ml_collections
import pytest

from edu_prm_jax import cli, config_utils
from edu_prm_jax.commands import pipeline
from edu_prm_jax.commands.common.builders import SAMPLER_FIELDS, decode_params, sampler_options
from edu_prm_jax.configs import common, qwen25_math_7b
from edu_prm_jax.configs import eval_bon as eval_bon_config
from edu_prm_jax.configs import label as label_config
from edu_prm_jax.configs import pipeline as pipeline_config
from edu_prm_jax.configs import sample as sample_config

PACKAGE = Path(config_utils.__file__).resolve().parent
COMMANDS = PACKAGE / "commands"


# ------------------------------------------------------------------------------------------- fields are read
@pytest.mark.parametrize("command", ["build_toy", "convert", "eval_bon", "eval_processbench", "export", "label",
                                     "prepare_data", "sample", "score", "train"])
def test_every_top_level_field_is_read_by_its_command(command):
    """A field no code mentions is dead (a static guard; the sampling groups are checked by decode_params)."""
    config, _, _ = config_utils.load_config_file(config_utils.shipped_config(command))
    source = (COMMANDS / f"{command}.py").read_text() + "".join(
        p.read_text() for p in (COMMANDS / "common").glob("*.py"))
    for key in config.keys():
        assert re.search(rf"\.{key}\b|[\"']{key}[\"']", source), f"{command}: config.{key} is read nowhere"
    if "mesh" in config:
        assert "mesh.data, " in source or "mesh_cfg.data" in source


@pytest.mark.parametrize("sampling", [sample_config.get_config("edu").sampling, sample_config.get_config("ht").sampling,
                                      eval_bon_config.get_config().sampling, label_config.get_config().sampling],
                         ids=["sample_edu", "sample_ht", "eval_bon", "label"])
def test_every_shipped_sampling_field_reaches_the_sampler(sampling):
    params = decode_params(sampling, mode="ht", num_leaves=3)
    for key, value in sampling.items():
        if key in SAMPLER_FIELDS:
            continue
        if key not in ("mode", "num_leaves"):
            assert getattr(params, key) == value, key
    options = sampler_options(sampling)
    assert options["stop_strings"] == [] and options["extra_symbols"] == "" and options["disable_symbols"] is False


def test_decode_params_maps_num_leaves_and_greedy():
    s = common.sampling_config("edu", num_leaves=5)
    s.tau, s.max_new_tokens = 0.3, 11
    p = decode_params(s)
    assert (p.mode, p.num_leaves, p.tau, p.max_new_tokens) == ("edu", 5, 0.3, 11)
    assert decode_params(common.sampling_config("greedy", num_leaves=8)).num_leaves == 1  # greedy: one path
    assert decode_params(s, mode="ht", num_leaves=6).num_leaves == 6  # per-run overrides
    assert decode_params(s, seed=4, prune_below=0.1).seed == 4


@pytest.mark.parametrize("field, value", [("stop_at_anwser", True), ("num_slots", 4), ("temprature", 0.5)])
def test_decode_params_rejects_a_field_no_setting_reads(field, value):
    s = common.sampling_config()
    s[field] = value
    with pytest.raises(ValueError, match=rf"sampling\.{field}: no sampler setting reads this field"):
        decode_params(s)


def test_sampling_config_fields_are_checked():
    assert list(common.sampling_config(fields=("tau", "seed")).keys()) == ["seed", "tau"]
    with pytest.raises(ValueError, match="no sampler field"):
        common.sampling_config(fields=("tua",))


def test_per_run_sampling_fields_are_not_config_fields():
    """eval-bon sets mode, N and seed per run; label's rollouts are HT with k per use: no dead copies."""
    assert not {"mode", "num_leaves", "seed"} & set(eval_bon_config.get_config().sampling.keys())
    assert set(label_config.get_config().sampling.keys()) == set(common.ROLLOUT_SAMPLING)


# ------------------------------------------------------------------------------------------- pipeline
def test_eval_bon_takes_sample_sampling_unless_a_field_is_set():
    config = pipeline_config.get_config()
    default = pipeline.stage_config(config, "eval_bon").sampling
    assert default.to_dict() == {k: config.sample.sampling[k] for k in common.EVAL_BON_SAMPLING}
    assert default.tau == 0.5  # the toy pipeline's anchor rule, not eval-bon's own default 1.0
    config.eval_bon.sampling.max_new_tokens = 7
    config.eval_bon.sampling.tau = 0.25
    resolved = pipeline.stage_config(config, "eval_bon").sampling
    assert (resolved.max_new_tokens, resolved.tau) == (7, 0.25)
    assert resolved.branch_k == config.sample.sampling.branch_k
    assert pipeline.stage_config(config, "sample").sampling.tau == 0.5  # sample's own setting untouched
    shown = pipeline.effective_config(config)
    assert shown["eval_bon"]["sampling"]["max_new_tokens"] == 7


def test_eval_bon_sampling_override_on_the_command_line(tmp_path, monkeypatch):
    """`--config.eval_bon.sampling.*` parses (typed placeholders) and reaches the stage, and the report shows it."""
    seen = {}

    class Stage:
        @staticmethod
        def run(sub, workdir):
            seen[sub.get("questions", "?")] = sub

    monkeypatch.setattr(pipeline.registry, "load", lambda name: Stage)
    argv = ["pipeline", f"--workdir={tmp_path}", "--config.stages=eval_bon",
            "--config.eval_bon.sampling.max_new_tokens=33", "--config.eval_bon.sampling.edu_greedy=False",
            "--config.sample.sampling.tau=0.4", "--log_level=error"]
    assert cli.main(argv) == 0
    (sub,) = seen.values()
    assert (sub.sampling.max_new_tokens, sub.sampling.edu_greedy, sub.sampling.tau) == (33, False, 0.4)
    ran = json.loads((tmp_path / "eval_bon_config.json").read_text())
    report = (tmp_path / "report.md").read_text()
    shown = json.loads(report.split("```json\n")[1].split("\n```")[0])
    assert shown["eval_bon"]["sampling"] == ran["sampling"] and ran["sampling"]["max_new_tokens"] == 33


def test_qwen_config_eval_bon_samples_like_sample():
    config = qwen25_math_7b.get_config()
    resolved = pipeline.stage_config(config, "eval_bon").sampling
    assert resolved.max_new_tokens == config.sample.sampling.max_new_tokens == 2048
    assert all(v is None for v in config.eval_bon.sampling.values())  # nothing overridden by accident


def test_shared_fields_have_one_home(capsys, tmp_path):
    config = pipeline_config.get_config()
    for stage in pipeline.STAGES:
        assert "policy" not in config[stage] and "dtype" not in config[stage]
    config.policy, config.dtype = "/models/p", "bfloat16"
    assert pipeline.stage_config(config, "label").policy == "/models/p"
    assert pipeline.stage_config(config, "processbench").dtype == "bfloat16"
    assert "policy" not in pipeline.stage_config(config, "processbench")  # its command has no policy field
    config.sample.policy = "/models/other"  # a user config that adds a stage copy is refused, not ignored
    with pytest.raises(ValueError, match="sample.policy: the pipeline sets policy once"):
        pipeline.stage_config(config, "sample")
    rc = cli.main(["pipeline", f"--workdir={tmp_path}", "--config.sample.policy=/x"])
    assert rc == 2 and "did you mean --config.policy," in capsys.readouterr().err  # the same field, up top
    assert not (tmp_path / "report.md").exists()


def test_processbench_stage_without_data_is_skipped_with_the_reason(tmp_path, monkeypatch):
    config = pipeline_config.get_config()
    assert config.processbench.data == ""
    assert "--config.processbench.data" in pipeline.processbench_skip_reason(config)
    config.processbench.data = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="processbench.data="):
        pipeline.processbench_skip_reason(config)
    config.processbench.data = str(tmp_path)
    assert pipeline.processbench_skip_reason(config) is None

    monkeypatch.setattr(pipeline.registry, "load", lambda name: pytest.fail(f"stage {name} ran"))
    config = pipeline_config.get_config()
    config.stages = "processbench"
    pipeline.run(config, tmp_path / "w")
    report = (tmp_path / "w" / "report.md").read_text()
    assert "| processbench | skipped: no ProcessBench data dir" in report
    shown = json.loads(report.split("```json\n")[1].split("\n```")[0])
    assert "processbench" not in shown  # a skipped stage shows no config it ran with


def test_standalone_processbench_needs_data(capsys, tmp_path):
    rc = cli.main(["eval-processbench", f"--workdir={tmp_path}"])
    assert rc == 1 and "config.data is not set" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- locating configs
def test_nothing_in_the_package_points_at_shared():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "../shared" in p.read_text()]
    assert offenders == []


def test_shipped_configs_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, path, _ = config_utils.load_config("configs/convert.py:orbax_to_hf")
    assert path == PACKAGE / "configs" / "convert.py" and config.direction == "orbax_to_hf"
    assert cli.default_config_file("eval-bon") == PACKAGE / "configs" / "eval_bon.py"
    with pytest.raises(config_utils.ConfigFileError, match="shipped configs: .*configs/sample.py"):
        config_utils.load_config("configs/nope.py")
    # a file at that path under the current directory wins over the shipped one
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "convert.py").write_text(textwrap.dedent('''
        import ml_collections
        from edu_prm_jax.configs import convert

        def get_config():
            config = convert.get_config()
            config.shard_bytes = 123  # Smaller shards.
            return config
    '''))
    config, path, _ = config_utils.load_config("configs/convert.py")
    assert path == tmp_path / "configs" / "convert.py" and config.shard_bytes == 123


def test_old_style_config_import_gets_a_hint(tmp_path):
    old = tmp_path / "mine.py"
    old.write_text("from configs import common\n\ndef get_config():\n    return common.mesh_config()\n")
    with pytest.raises(config_utils.ConfigFileError, match="from edu_prm_jax.configs import common"):
        config_utils.load_config(str(old))


def test_group_comments_show_in_help(capsys):
    assert cli.main(["pipeline", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config.eval_bon.sampling.*\n      null = sample.sampling's value." in out
    assert "--config.eval_bon.sampling.tau=null  (float)" in out
    assert "--config.processbench.data=\"\"" in out and "(undocumented)" not in out


def test_unset_like_keeps_types():
    c = ml_collections.ConfigDict({"a": 1, "b": "x", "g": {"f": 0.5}})
    u = common.unset_like(c)
    assert u.a is None and u.g.f is None and u.get_type("b") is str and u.g.get_type("f") is float


@pytest.mark.parametrize("stage,field", [("sample", "output"), ("label", "samples"), ("label", "output"),
                                         ("train", "labels"), ("eval_bon", "prm"), ("processbench", "prm")])
def test_pipeline_refuses_paths_that_would_break_the_hand_off(stage, field):
    config = pipeline_config.get_config()
    config[stage][field] = "/elsewhere"
    with pytest.raises(ValueError, match=rf"{stage}\.{field}='/elsewhere': the pipeline hands each stage"):
        pipeline.stage_config(config, stage)


def test_pipeline_refuses_ht_trees_for_labelling():
    config = pipeline_config.get_config()
    config.sample.sampling.mode = "ht"
    with pytest.raises(ValueError, match="sample.sampling.mode='ht'"):
        pipeline.stage_config(config, "sample")


def test_a_finished_stage_with_other_settings_stops_the_pipeline(tmp_path):
    config = pipeline_config.get_config()
    ran = pipeline.stage_config(config, "train")
    config_utils.write_config_json(ran, tmp_path / "train_config.json")
    pipeline.check_unchanged("train", ran, tmp_path / "train_config.json")  # same settings: skipped quietly
    config.train.steps = 800
    config.train.learning_rate = 1e-4
    with pytest.raises(ValueError, match=r"learning_rate: 0\.0003 -> 0\.0001, steps: 400 -> 800"):
        pipeline.check_unchanged("train", pipeline.stage_config(config, "train"), tmp_path / "train_config.json")


def test_a_config_file_with_a_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                   "    c.steps = (3\n    return c\n")
    rc = cli.main(["train", f"--config={bad}", f"--workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:5:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3
