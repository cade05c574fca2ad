"""`edu-prm experiment`: the paper's label-cost vs PRM-quality table in toy form, with error bars over seeds.

A *run* is one labeller (with its settings and number of training questions) and one seed: its own workdir
`<workdir>/runs/<arm>/s<seed>/` holding what `sample`, `label` and `train` write there (the commands themselves,
so each resumes and refuses changed settings as it does alone). Sampled trees that do not depend on the seed
(greedy EDU trees) are shared through `<workdir>/samples/`. Every run's PRM is then scored the same way:

- toy-processbench (`toy/processbench.py`): exact first-error truth, the official ProcessBench metric at
  theta 0.5, at theta tuned on one subset, and at the oracle theta;
- Best-of-N on the toy test questions: HT and EDU candidates sampled once per seed and shared by every PRM
  (`<workdir>/bon/`), PRM (min/last/product/mean) against majority vote and greedy, which need no PRM;
- label quality (`label_stats.json`): agreement of the step labels with exact step correctness, right answers
  through a wrong step; and label cost in tokens, queries and wall seconds.

Arms: each labeller at the same questions; with `matched_budget`, each baseline on as many questions as EDU's
token cost buys it and EDU on as many as each baseline's cost buys (the toy world's train split is large); the
EDU `ablations`. Output (atomic): `results.json` (every run's metrics and the arms' mean ± std), `results.md`
and `quality_vs_cost.png`; `mcts` adds MCTS-EDU against EDU and HT Best-of-N at equal token budgets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import logging

from edu_prm_jax import config_utils, distributed
from edu_prm_jax.commands import registry
from edu_prm_jax.commands.common.paths import prm_dir
from edu_prm_jax.configs import label as label_config
from edu_prm_jax.configs import sample as sample_config
from edu_prm_jax.io import storage
from edu_prm_jax.io.shards import check_fingerprint
from edu_prm_jax.sampling.shards import questions_digest
from edu_prm_jax.toy import processbench as toy_pb
from edu_prm_jax.toy.defaults import load_questions, resolve_policy

DESCRIPTION = "Label cost vs PRM quality: EDU, Math-Shepherd and OmegaPRM labels, matched budgets, ablations."

LABELLERS = ("edu", "shepherd", "omega")


# ---------------------------------------------------------------------------------------------- arms
@dataclasses.dataclass(frozen=True)
class Arm:
    """One labeller setting: `labeller` with `overrides` of its config section on the first `questions`
    training questions. `name` labels it in tables."""

    name: str
    labeller: str
    questions: int
    overrides: tuple[tuple[str, Any], ...] = ()
    group: str = "labellers"  # labellers, matched budget or ablations (the table it belongs to)

    @property
    def slug(self) -> str:
        """The arm's directory name: it differs between arms of one experiment. What else makes a run (the base
        labeller section, the training recipe, the policy) is bound by each run's fingerprint (`label_run`)."""
        key = json.dumps([self.labeller, self.questions, list(self.overrides)], sort_keys=True)
        return f"{self.labeller}-q{self.questions}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def parse_ablations(spec: str) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    """'name:field=value[,field=value];...' -> [(name, ((field, value), ...))]; values parsed as JSON where
    they parse (numbers, true/false), else kept as text. Raises ValueError naming a malformed entry."""
    out = []
    for entry in (e.strip() for e in spec.split(";")):
        if not entry:
            continue
        name, sep, body = entry.partition(":")
        if not sep or not name or not body:
            raise ValueError(f"ablations: {entry!r} is not 'name:field=value[,field=value]'")
        pairs = []
        for item in body.split(","):
            field, eq, raw = item.partition("=")
            if not eq or not field:
                raise ValueError(f"ablations: {item!r} in {entry!r} is not field=value")
            word = {"True": "true", "False": "false"}.get(raw, raw)
            try:
                value = json.loads(word)
            except json.JSONDecodeError:
                value = raw
            pairs.append((field.strip(), value))
        out.append((name.strip(), tuple(pairs)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"ablations: names repeat: {names}")
    return out


def labeller_section(config: ml_collections.ConfigDict, arm: Arm) -> ml_collections.ConfigDict:
    """The arm's labeller config (`config.<labeller>` with the arm's overrides applied); an override naming a
    field the section does not have is an error naming the nearest ones."""
    section = ml_collections.ConfigDict(config[arm.labeller].to_dict())
    keys = config_utils.leaf_keys(section)
    for field, value in arm.overrides:
        if field not in keys:
            near = config_utils.nearest_keys(field, keys)
            raise ValueError(f"arm {arm.name!r}: {arm.labeller}.{field} is not a field (nearest: {near})")
        parent, _, leaf = field.rpartition(".")
        target = section
        for part in parent.split(".") if parent else []:
            target = target[part]
        if field in FIXED_BY_EXPERIMENT:
            raise ValueError(f"arm {arm.name!r}: {arm.labeller}.{field} is set by the experiment for every arm "
                             "(max_new_tokens, the seeds and each labeller's sampling mode); it cannot be ablated")
        target[leaf] = _typed(value, target[leaf], f"arm {arm.name!r}: {arm.labeller}.{field}")
    return section


FIXED_BY_EXPERIMENT = ("sampling.mode", "sampling.seed", "sampling.max_new_tokens")


def _typed(value: Any, current: Any, where: str) -> Any:
    """`value` as the type of the field's current value; a lossy or unparsable conversion is an error."""
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}={value!r}: expected true or false")
        return value
    if isinstance(current, int) and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"{where}={value!r}: expected an integer")
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}={value!r}: expected a number")
        return float(value)
    if isinstance(current, str) and not isinstance(value, str):
        return str(value)
    return value


# ------------------------------------------------------------------------------------- stage configs
def sampling_for(config: ml_collections.ConfigDict, mode: str, num_leaves: int, seed: int,
                 temperature: float, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict((base or sample_config.get_config(mode).sampling).to_dict())
    greedy_tree = mode == "edu" and s.edu_greedy  # greedy between anchors: the seed changes nothing
    s.mode, s.num_leaves, s.seed, s.temperature = mode, num_leaves, 0 if greedy_tree else seed, temperature
    s.max_new_tokens = config.max_new_tokens
    return s


def sample_stage(config: ml_collections.ConfigDict, questions: int, sampling: ml_collections.ConfigDict,
                 output: Any) -> ml_collections.ConfigDict:
    c = sample_config.get_config(sampling.mode)
    c.policy, c.dtype, c.questions, c.limit = config.policy, config.dtype, config.train_questions, questions
    c.sampling, c.output, c.batch_questions = sampling, str(output), config.batch_questions
    return c


def label_stage(config: ml_collections.ConfigDict, method: str, target: str, samples: Any, output: Any,
                seed: int, **fields: Any) -> ml_collections.ConfigDict:
    c = label_config.get_config()
    c.policy, c.dtype, c.method, c.target = config.policy, config.dtype, method, target
    c.samples, c.output, c.batch_questions = str(samples), str(output), config.batch_questions
    c.sampling.seed, c.sampling.max_new_tokens = seed, config.max_new_tokens
    for key, value in fields.items():
        if key == "temperature":
            c.sampling.temperature = value
        elif key in c:
            c[key] = value
        else:
            c.omega[key] = value
    return c


def run_stage(name: str, stage_config: ml_collections.ConfigDict, workdir: Any) -> None:
    config_utils.write_config_json(stage_config, storage.as_path(workdir) / f"{name}_config.json")
    registry.load(name).run(stage_config, storage.as_path(workdir))


def samples_dir(config: ml_collections.ConfigDict, root: Any, sampling: ml_collections.ConfigDict,
                questions: int) -> Any:
    """Shared sample output for one sampler setting on the first `questions` training questions (greedy EDU
    trees do not depend on the seed, so every seed's runs share them)."""
    key = sampling.to_dict()
    asked = questions_digest(load_questions(config.train_questions, limit=questions))
    digest = hashlib.sha256(json.dumps([key, questions, asked, config.policy, config.dtype],
                                       sort_keys=True).encode()).hexdigest()[:8]
    return storage.as_path(root) / "samples" / f"{key['mode']}-q{questions}-{digest}"


def label_run(config: ml_collections.ConfigDict, root: Any, arm: Arm, seed: int) -> Any:
    """Sample (if the labeller labels sampled solutions), label and train one run; returns its workdir."""
    work = storage.as_path(root) / "runs" / arm.slug / f"s{seed}"
    work.mkdir(parents=True, exist_ok=True)
    section = labeller_section(config, arm)
    # everything that makes this run's labels and PRM: a rerun with other settings is refused, never reused
    asked = questions_digest(load_questions(config.train_questions, limit=arm.questions))
    check_fingerprint(work, {"labeller": arm.labeller, "section": section.to_dict(), "train": config.train.to_dict(),
                             "policy": str(storage.resolved(resolve_policy(config.policy))), "dtype": config.dtype,
                             "max_new_tokens": config.max_new_tokens, "seed": seed, "questions": asked},
                      has_outputs=lambda: (work / "labels").exists() or (work / "prm").exists())
    labels = work / "labels"
    if arm.labeller == "edu":
        sampling = sampling_for(config, "edu", section.sampling.num_leaves, seed, section.sampling.temperature,
                                base=section.sampling)
        samples = samples_dir(config, root, sampling, arm.questions)
        run_stage("sample", sample_stage(config, arm.questions, sampling, samples), samples)  # resumes
        run_stage("label", label_stage(config, "edu", section.target, samples, labels, seed), work)
    elif arm.labeller == "shepherd":
        sampling = sampling_for(config, "ht", section.solutions, seed, section.temperature)
        samples = samples_dir(config, root, sampling, arm.questions)
        run_stage("sample", sample_stage(config, arm.questions, sampling, samples), samples)
        run_stage("label", label_stage(config, "shepherd", section.target, samples, labels, seed,
                                       shepherd_k=section.shepherd_k, temperature=section.temperature), work)
    else:
        fields = {k: v for k, v in section.to_dict().items() if k not in ("target", "temperature")}
        run_stage("label", label_stage(config, "omega", section.target, "", labels, seed,
                                       temperature=section.temperature, questions=config.train_questions,
                                       limit=arm.questions, **fields), work)
    train = ml_collections.ConfigDict(config.train.to_dict())
    train.policy, train.dtype, train.seed, train.labels = config.policy, config.dtype, seed, str(labels)
    run_stage("train", train, work)
    return work


# ------------------------------------------------------------------------------------------ metrics
def run_metrics(work: Any, evaluator: Any) -> dict[str, Any]:
    """Every number of one run: its label cost and quality (`label_stats.json`), and its PRM's toy-processbench
    F1 and Best-of-N accuracies (`evaluator`)."""
    stats = json.loads((storage.as_path(work) / "labels" / "label_stats.json").read_text())
    cost = stats["cost"]
    out = {"tokens": cost["tokens"], "queries": cost["queries"], "wall_seconds": cost["wall_seconds"],
           "labelled_steps": stats["labelled_steps"], "solutions": stats["solutions"],
           "label_agreement": stats.get("toy_label_agreement"), "value_agreement": stats.get("toy_step_agreement"),
           "right_through_wrong": stats.get("toy_right_answers_through_a_wrong_step")}
    out.update(evaluator.evaluate(prm_dir(work)))
    return out


# ---------------------------------------------------------------------------------------------- run
def plan_arms(config: ml_collections.ConfigDict, n_questions: int) -> list[Arm]:
    labellers = [x for x in config.labellers.split(",") if x]
    unknown = sorted(set(labellers) - set(LABELLERS))
    if unknown or not labellers:
        raise ValueError(f"labellers={config.labellers!r}: choose from {list(LABELLERS)}")
    if config.tune_subset not in toy_pb.SUBSETS:
        raise ValueError(f"tune_subset={config.tune_subset!r}: toy-processbench's subsets are {list(toy_pb.SUBSETS)}")
    if (config.prune_grid or config.mcts) and "edu" not in labellers:
        raise ValueError("prune_grid and mcts search with the EDU-labelled PRM: add edu to labellers")
    n_grid = config_utils.parse_number_list(config.n_grid, "n_grid")
    missing = [n for n in config_utils.parse_number_list(config.mcts_n, "mcts_n", allow_empty=True)
               if n not in n_grid]
    if config.mcts and missing:
        raise ValueError(f"mcts_n={config.mcts_n!r}: {missing} not in n_grid={config.n_grid!r} (MCTS-EDU takes the "
                         "token budgets of those Best-of-N runs)")
    arms = [Arm(name, name, n_questions) for name in labellers]
    for name, overrides in parse_ablations(config.ablations):
        arms.append(Arm(f"edu {name}", "edu", n_questions, overrides, group="ablations"))
    for arm in arms:  # every override names a real field, before anything runs
        labeller_section(config, arm)
    return arms


def matched_arms(config: ml_collections.ConfigDict, base: dict[str, Arm], tokens_per_question: dict[str, float],
                 n_questions: int, available: int) -> list[Arm]:
    """Each baseline on the questions EDU's token cost buys it; EDU on the questions each baseline's buys (at
    most `available`, the training questions the spec gives)."""
    if "edu" not in base:
        return []
    edu_cost = tokens_per_question["edu"] * n_questions
    arms = []
    for name in base:
        if name == "edu":
            continue
        n_base = max(1, min(available, round(edu_cost / tokens_per_question[name])))
        arms.append(Arm(f"{name} @ EDU's cost", name, n_base, group="matched budget"))
        n_edu = max(1, min(available, round(tokens_per_question[name] * n_questions / tokens_per_question["edu"])))
        arms.append(Arm(f"edu @ {name}'s cost", "edu", n_edu, group="matched budget"))
    return arms


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    from edu_prm_jax.commands.common.experiment import Evaluator, write_results

    seeds = config_utils.parse_number_list(config.seeds, "seeds")
    questions = load_questions(config.train_questions)
    if not questions:
        raise ValueError(f"train_questions={config.train_questions!r}: no questions")
    arms = plan_arms(config, len(questions))
    available = len(questions)
    if config.matched_budget:
        available = len(load_questions(_grown(config.train_questions, 16)))
    evaluator = Evaluator(config, workdir, seeds)
    runs: list[dict[str, Any]] = []

    def do(arm: Arm) -> list[dict[str, Any]]:
        done = []
        for seed in seeds:
            logging.info("experiment: %s (%d questions), seed %d", arm.name, arm.questions, seed)
            cfg = config if arm.questions <= len(questions) else _with_questions(config, arm.questions)
            evaluator.release()  # the evaluation's policy copy is not held while the run trains
            work = label_run(cfg, workdir, arm, seed)
            done.append({"arm": arm.name, "group": arm.group, "labeller": arm.labeller, "questions": arm.questions,
                         "overrides": dict(arm.overrides), "seed": seed,
                         **run_metrics(work, evaluator.for_seed(seed))})
        runs.extend(done)
        return done

    base = {a.name: a for a in arms if a.group == "labellers"}
    per_question = {}
    for arm in base.values():
        arm_runs = do(arm)
        per_question[arm.name] = sum(r["tokens"] for r in arm_runs) / len(arm_runs) / arm.questions
    if config.matched_budget:
        for arm in matched_arms(config, base, per_question, len(questions), available):
            do(arm)
    for arm in (a for a in arms if a.group == "ablations"):
        do(arm)
    extras = {"aggregators": aggregator_table(runs, evaluator.n_grid)}
    baselines = evaluator.baselines()
    if config.prune_grid or config.mcts:
        edu_prms = {r["seed"]: prm_dir(workdir / "runs" / base["edu"].slug / f"s{r['seed']}") for r in runs
                    if r["arm"] == "edu"}
        if config.prune_grid:
            extras["prune"] = evaluator.prune_sweep(edu_prms)
        if config.mcts:
            extras["mcts"] = evaluator.mcts(edu_prms, baselines)
    if distributed.is_lead():  # every process computed the same numbers; process 0 writes them
        print(write_results(workdir, runs, baselines, extras, evaluator.n_grid, config.to_dict()))
    distributed.barrier("experiment: results written")


def aggregator_table(runs: Sequence[dict[str, Any]], n_grid: Sequence[int]) -> str:
    """The EDU-labelled PRM's Best-of-N with each step-score aggregator (an ablation that needs no training)."""
    from edu_prm_jax.commands.common.experiment import HEADLINE_N, mean_std
    from edu_prm_jax.scoring.aggregate import AGGREGATORS

    edu = [r for r in runs if r["arm"] == "edu"]
    if not edu:
        return ""
    n = HEADLINE_N if HEADLINE_N in n_grid else max(n_grid)
    lines = [f"## Aggregator (EDU-labelled PRM, Best-of-{n}; %)", "", "| aggregator | HT | EDU |", "|---|---|---|"]
    for agg in AGGREGATORS:
        cells = []
        for sampler in ("ht", "edu"):
            ms = mean_std([r.get(f"bon_{sampler}{n}_prm_{agg}") for r in edu])
            cells.append("n/a" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}")
        lines.append(f"| {agg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _grown(spec: str, factor: int) -> str:
    """A toy spec with `factor` times the questions (its first n are the original's): EDU at a baseline's cost."""
    parts = spec.split(":")
    if spec.startswith("toy:") and len(parts) >= 3 and parts[2].isdigit():
        parts[2] = str(int(parts[2]) * factor)
        return ":".join(parts)
    return spec


def _with_questions(config: ml_collections.ConfigDict, n: int) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(config.to_dict())
    out.train_questions = _grown(config.train_questions, 16)
    return out
