"""What `edu-prm experiment` measures each run's PRM with, and the table and plot it writes.

Candidates are sampled once per seed and shared by every PRM (`<workdir>/bon/<run>/`, cached as tree shards
like eval-bon's): HT at max(N) samples (its first N for each N) and EDU trees with leaf budget N (greedy between
anchors, so sampled once for all seeds). toy-processbench is built once (`<workdir>/toy_processbench/`). A run's
metrics are cached in `<run>/metrics.json` with the identity of its PRM files and the evaluation settings, so a
rerun of the experiment recomputes only what changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from edu_prm_jax import parallel
from edu_prm_jax.api import load_model, load_tokenizer
from edu_prm_jax.commands.common.builders import checkpoint_dtype, decode_params, sampler_options, sampling_fingerprint
from edu_prm_jax.config_utils import parse_number_list
from edu_prm_jax.evaluation.bon import Candidate, selector_accuracies
from edu_prm_jax.evaluation.candidates import score_records
from edu_prm_jax.grading.answers import answers_verdict, extract_answer, solution_verdict
from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from edu_prm_jax.models.prm import load_prm
from edu_prm_jax.records.trees import read_tree_shards
from edu_prm_jax.sampling.engine import Sampler
from edu_prm_jax.sampling.shards import sample_to_shards
from edu_prm_jax.toy import processbench as toy_pb
from edu_prm_jax.toy.defaults import load_questions, resolve_policy

HEADLINE_N = 16  # the Best-of-N size the main table shows (the JSON has every N)


class Evaluator:
    """Scores PRMs on toy-processbench and Best-of-N candidates that are sampled once and shared."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Any, seeds: Sequence[int]):
        self.config, self.workdir, self.seeds = config, storage.as_path(workdir), list(seeds)
        self.n_grid = parse_number_list(config.n_grid, "n_grid")
        self.questions = load_questions(config.test_questions)
        if not self.questions or any(q.get("answer") in (None, "") for q in self.questions):
            raise ValueError(f"test_questions={config.test_questions!r}: Best-of-N needs questions with gold answers")
        self.mesh = parallel.local_mesh(-1, 1, 1)  # questions split over this host's devices, as eval-bon does
        self._policy = None
        self._candidates: dict[str, list[dict]] = {}
        self._benchmark = None

    # ---------------------------------------------------------------------------------- shared inputs
    def release(self) -> None:
        """Drop the policy copy (reloaded when next needed), so it holds no device memory while a run trains."""
        self._policy = None

    @property
    def policy(self) -> tuple[Any, Any]:
        if self._policy is None:
            path = resolve_policy(self.config.policy)
            model = load_model(path, dtype=self.config.dtype, param_dtype=checkpoint_dtype(path), mesh=self.mesh)
            self._policy = (model, load_tokenizer(path))
        return self._policy

    def sampling(self) -> ml_collections.ConfigDict:
        s = ml_collections.ConfigDict(self.config.edu.sampling.to_dict())  # the anchor rule EDU labels use
        s.max_new_tokens = self.config.max_new_tokens
        return s

    def sampled(self, name: str, seed: int, prm: Any = None, prm_identity: Any = None, **override: Any
                ) -> list[dict]:
        """Tree records of one candidate run, sampled once into <workdir>/bon/<name> (resumable; a P-EDU run,
        sampled with `prm`, is bound to `prm_identity`, so a retrained PRM resamples it)."""
        if name in self._candidates:
            return self._candidates[name]
        model, tokenizer = self.policy
        s = self.sampling()
        params = decode_params(s, seed=seed, **override)
        sampler = Sampler(model, tokenizer, params, mesh=self.mesh, batch_questions=self.config.batch_questions,
                          prm=prm, **sampler_options(s))
        fingerprint = {**sampling_fingerprint(resolve_policy(self.config.policy), self.config.dtype, s),
                       "prm": prm_identity, "sampling": s.to_dict(), "params": dataclasses.asdict(params),
                       "questions": self.config.test_questions}
        # what made the candidates is in the directory's name: other settings (or a retrained PRM for P-EDU) get
        # a directory of their own, never a refused or stale one
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:8]
        out = self.workdir / "bon" / f"{name}-{digest}"
        sample_to_shards(sampler, self.questions, out, 1, desc=f"experiment/{name}", fingerprint=fingerprint)
        records = [t.to_json() for t in read_tree_shards(out)]
        if prm is None:
            self._candidates[name] = records
        return records

    def ht(self, seed: int) -> list[dict]:
        return self.sampled(f"ht_n{max(self.n_grid)}_s{seed}", seed, mode="ht", num_leaves=max(self.n_grid),
                            temperature=self.config.ht_temperature)

    def edu(self, n: int, seed: int) -> list[dict]:
        return self.sampled(f"edu_n{n}_s{self.tree_seed(seed)}", self.tree_seed(seed), mode="edu", num_leaves=n)

    def tree_seed(self, seed: int) -> int:
        """EDU trees greedy between anchors do not depend on the seed: sampled once (seed 0) for all seeds."""
        return 0 if self.config.edu.sampling.edu_greedy else seed

    def greedy(self) -> list[dict]:
        return self.sampled("greedy", 0, mode="greedy", num_leaves=1)

    @property
    def benchmark(self) -> list[dict]:
        """toy-processbench items (built once with the policy, cached under <workdir>/toy_processbench)."""
        if self._benchmark is None:
            spec = toy_pb.ToyBenchSpec(n=self.config.toy_processbench_n, seed=0, policy=self.config.policy,
                                       max_new_tokens=self.config.max_new_tokens)
            self._benchmark, _ = toy_pb.load_or_build(spec, self.workdir / "toy_processbench")
        return self._benchmark

    # -------------------------------------------------------------------------------------- one PRM
    def load_prm(self, path: Any) -> Any:
        return load_prm(path, self.mesh, param_dtype=checkpoint_dtype(path), dtype=self.config.dtype)

    def evaluate(self, prm_path: Any, seed: int) -> dict[str, float]:
        """toy-processbench F1 (theta 0.5, tuned, oracle) and Best-of-N accuracy of every selector for HT and
        EDU candidates at every N, as flat keys (`bon_<sampler><N>_<selector>`); cached beside the PRM."""
        prm_path = storage.as_path(prm_path)
        cache = prm_path.parent.parent / "metrics.json"
        # the run's fingerprint (commands/experiment.py `label_run`) binds its policy and dtype, which evaluate it
        identity = {"prm": prm_files(prm_path), "seed": seed, "n_grid": self.n_grid,
                    "test_questions": self.config.test_questions,
                    "items": self.config.toy_processbench_n, "tune_subset": self.config.tune_subset,
                    "sampling": self.sampling().to_dict(), "ht_temperature": self.config.ht_temperature}
        if cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("identity") == identity:
                return saved["metrics"]
        prm = self.load_prm(prm_path)
        pb = toy_pb.evaluate_prm(prm, self.policy[1], self.benchmark, theta_split=self.config.tune_subset)
        metrics = {"pb_f1_05": pb["fixed"]["average"]["f1"], "pb_f1_tuned": pb["chosen"]["average"]["f1"],
                   "pb_f1_oracle": pb["best"]["average"]["f1"]}
        metrics.update(self.bon_metrics(prm, seed))
        write_json_atomic(cache, {"identity": identity, "metrics": metrics})
        return metrics

    def bon_metrics(self, prm: Any, seed: int) -> dict[str, float]:
        out: dict[str, float] = {}
        ht = score_records(prm, self.ht(seed), "high_entropy")
        for n in self.n_grid:
            out.update(_accuracies(f"bon_ht{n}", [c[:n] for c in ht]))
            out.update(_accuracies(f"bon_edu{n}", score_records(prm, self.edu(n, seed), "anchors")))
        return out

    def prune_sweep(self, prms: Mapping[int, Any]) -> str:
        """P-EDU Best-of-N at each `prune_grid` threshold with each seed's EDU-labelled PRM pruning in lockstep,
        against plain EDU trees of the same leaf budget: accuracy (PRM min) and distinct tokens per question."""
        n = HEADLINE_N if HEADLINE_N in self.n_grid else max(self.n_grid)
        rows: dict[str, list[tuple[float, float]]] = {}
        for seed, path in sorted(prms.items()):
            prm = self.load_prm(path)
            edu = self.edu(n, seed)
            rows.setdefault("EDU (no pruning)", []).append(
                (_accuracies("x", score_records(prm, edu, "anchors"))["x_prm_min"],
                 sum(r["distinct_tokens"] for r in edu) / len(edu)))
            for threshold in parse_number_list(self.config.prune_grid, "prune_grid", float):
                trees = self.sampled(f"p-edu_n{n}_t{threshold}_s{seed}", self.tree_seed(seed), prm=prm,
                                     prm_identity=prm_files(path),
                                     mode="edu", num_leaves=n, prune_below=threshold)
                rows.setdefault(f"P-EDU, prune below {threshold:g}", []).append(
                    (_accuracies("x", score_records(prm, trees, "anchors"))["x_prm_min"],
                     sum(r["distinct_tokens"] for r in trees) / len(trees)))
        lines = [f"## P-EDU prune threshold (EDU-labelled PRM, leaf budget {n})", "",
                 "| sampler | PRM (min) accuracy, % | distinct tokens / question | seeds |", "|---|---|---|---|"]
        for name, values in rows.items():
            acc, tokens = mean_std([v[0] for v in values]), mean_std([v[1] for v in values])
            lines.append(f"| {name} | {_pm(acc)} | {_pm(tokens, 1, 0)} | {len(values)} |")
        return "\n".join(lines)

    def mcts(self, prms: Mapping[int, Any], baselines: Mapping[str, Any]) -> str:
        """MCTS-EDU (`evaluation.mcts`) with each seed's EDU-labelled PRM, at the token budgets HT and EDU
        Best-of-N spent at each N of `mcts_n` (mean distinct tokens per question), against those Best-of-N runs
        with the same PRM (min). Also writes bon_vs_tokens.png: accuracy vs tokens for the three."""
        from edu_prm_jax.evaluation.mcts import MCTSConfig, mcts_edu

        model, tokenizer = self.policy
        ns = [n for n in parse_number_list(self.config.mcts_n, "mcts_n") if n in self.n_grid]
        if not ns:
            raise ValueError(f"mcts_n={self.config.mcts_n!r}: no N of it is in n_grid={self.n_grid}")
        s = self.sampling()
        cfg = MCTSConfig(c_uct=self.config.mcts_c)
        prompts = [tokenizer.apply_chat_template(q["problem"]) for q in self.questions]
        golds = [str(q["answer"]) for q in self.questions]
        rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for seed, path in sorted(prms.items()):
            prm = self.load_prm(path)
            metrics = self.evaluate(path, seed)
            free = baselines["by_seed"][seed]
            for n in ns:
                for name in ("ht", "edu"):
                    budget = free[f"tokens_{name}{n}"]
                    rows.setdefault((f"{name.upper()} Best-of-{n}", n), []).append(
                        (metrics[f"bon_{name}{n}_prm_min"], budget))
                    results = self._mcts_cached(
                        f"mcts_b{round(budget)}_s{seed}", path,
                        lambda b=budget, p=prm, sd=seed: mcts_edu(
                            model, p, tokenizer, prompts, golds, budget_tokens=max(1, round(b)),
                            params=decode_params(s, seed=sd), config=cfg, mesh=self.mesh, **sampler_options(s)))
                    rows.setdefault((f"MCTS-EDU at {name.upper()}@{n}'s budget", n), []).append(
                        (sum(r["correct"] for r in results) / len(results),
                         sum(r["tokens"] for r in results) / len(results)))
        lines = ["## MCTS-EDU vs Best-of-N at equal token budgets (EDU-labelled PRM, min)", "",
                 "MCTS-EDU's budget is the mean distinct tokens per question of the Best-of-N run named; a search "
                 "stops once past it, so it may spend up to one expansion (K paths) more: its column gives what "
                 "it spent.", "",
                 "| search | accuracy, % | distinct tokens / question | seeds |", "|---|---|---|---|"]
        for (name, _), values in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            lines.append(f"| {name} | {_pm(mean_std([v[0] for v in values]))} | "
                         f"{_pm(mean_std([v[1] for v in values]), 1, 0)} | {len(values)} |")
        plot_search(rows, self.workdir / "bon_vs_tokens.png")
        return "\n".join(lines) + "\n\n![accuracy vs tokens](bon_vs_tokens.png)"

    def _mcts_cached(self, name: str, prm_path: Any, search: Any) -> list[dict[str, Any]]:
        """Per question {correct, tokens} of one MCTS-EDU run, cached in <workdir>/mcts/<name>.json with the
        PRM's identity (a retrained PRM searches again)."""
        cache = self.workdir / "mcts" / f"{name}.json"
        identity = {"prm": prm_files(prm_path), "sampling": self.sampling().to_dict(), "c": self.config.mcts_c,
                    "questions": self.config.test_questions, "dtype": self.config.dtype,
                    "policy": str(storage.resolved(resolve_policy(self.config.policy)))}
        if cache.is_file() and json.loads(cache.read_text()).get("identity") == identity:
            return json.loads(cache.read_text())["results"]
        results = [{"correct": r.correct, "tokens": r.tokens_spent, "candidates": len(r.candidates)}
                   for r in search()]
        write_json_atomic(cache, {"identity": identity, "results": results})
        return results

    def for_seed(self, seed: int) -> _SeedEvaluator:
        return _SeedEvaluator(self, seed)

    # ------------------------------------------------------------------------- what needs no PRM
    def baselines(self) -> dict[str, Any]:
        """Greedy accuracy, and per seed and N the PRM-free selectors (majority vote, policy log-prob, pass@N)
        of the same candidates, with their token cost: what every PRM has to beat."""
        greedy = [bool(r["leaves"]) and solution_verdict(r["leaves"][0]["text"], r["answer"]) is True
                  for r in self.greedy()]
        out: dict[str, Any] = {"greedy": sum(greedy) / len(greedy), "by_seed": {}}
        for seed in self.seeds:
            row: dict[str, float] = {}
            ht = self.ht(seed)
            for n in self.n_grid:
                for name, records, limit in (("ht", ht, n), ("edu", self.edu(n, seed), None)):
                    cands = [[_plain_candidate(leaf, r["answer"]) for leaf in r["leaves"][:limit]] for r in records]
                    acc = _accuracies(f"bon_{name}{n}", cands)
                    free = {k: v for k, v in acc.items() if not k.split("_", 2)[-1].startswith(("prm", "weighted"))}
                    row.update(free)
                    tokens = [sum(len(leaf["token_ids"]) for leaf in r["leaves"][:n]) if name == "ht"
                              else r["distinct_tokens"] for r in records]
                    row[f"tokens_{name}{n}"] = sum(tokens) / len(tokens)
            out["by_seed"][seed] = row
        return out


class _SeedEvaluator:
    def __init__(self, parent: Evaluator, seed: int):
        self.parent, self.seed = parent, seed

    def evaluate(self, prm_path: Any) -> dict[str, float]:
        return self.parent.evaluate(prm_path, self.seed)


def prm_files(prm_path: Any) -> list[str]:
    """Identity of an exported PRM: its weight files' names, sizes and modification times."""
    return ["{}:{}:{}".format(w.name, *storage.size_and_mtime_ns(w))
            for w in sorted(storage.as_path(prm_path).glob("*.safetensors"))]


def _plain_candidate(leaf: dict, gold: str) -> Candidate:
    """A candidate for the PRM-free selectors (no step scores)."""
    answer = extract_answer(leaf["text"])
    logprobs = leaf.get("logprobs") or []
    return Candidate(answer=answer, correct=answers_verdict(answer, gold) is True, step_scores=[],
                     mean_logprob=sum(logprobs) / len(logprobs) if logprobs else None)


def _accuracies(prefix: str, cands_per_q: Sequence[Sequence[Any]]) -> dict[str, float]:
    """`bon.selector_accuracies` with each key prefixed (`bon_ht16_prm_min`)."""
    return {f"{prefix}_{k}": v for k, v in selector_accuracies(cands_per_q).items()}


# ---------------------------------------------------------------------------------------- results
def mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
    """Mean and sample std (ddof 1; 0 for one value); None when a value is missing or NaN (never a number
    from part of the runs) or there is none."""
    if not values or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm (in order of first appearance): its group, labeller, questions, seeds and mean ± std of every
    numeric metric."""
    arms: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        arms.setdefault(r["arm"], []).append(r)
    out = {}
    for name, rs in arms.items():
        numeric = [k for k, v in rs[0].items() if k not in ("seed", "questions")
                   and (v is None or (isinstance(v, int | float) and not isinstance(v, bool)))]
        out[name] = {"group": rs[0]["group"], "labeller": rs[0]["labeller"], "questions": rs[0]["questions"],
                     "seeds": len(rs), **{k: mean_std([r.get(k) for r in rs]) for k in numeric}}
    return out


def _pm(ms: tuple[float, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if ms is None:
        return "n/a"
    return f"{scale * ms[0]:.{digits}f} ± {scale * ms[1]:.{digits}f}"


def cost_to_reach(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The token cost at which a labeller's quality first reaches `target`, interpolated linearly in log cost
    between its measured (cost, quality) points (sorted by cost); None when no point reaches it. When its
    cheapest point already reaches it, that point's cost is returned: an upper bound (`reach_lines` says so)."""
    pts = sorted(points)
    for i, (cost, quality) in enumerate(pts):
        if quality >= target:
            if i == 0:
                return cost
            (c0, q0) = pts[i - 1]
            frac = (target - q0) / (quality - q0) if quality != q0 else 1.0
            return math.exp(math.log(c0) + frac * (math.log(cost) - math.log(c0)))
    return None


def quality_measures(n: int) -> tuple[tuple[str, str, float], ...]:
    """(metric key, title, display scale) of the two quality measures costs are compared on."""
    return (("pb_f1_tuned", "toy-processbench F1 (tuned theta)", 1.0),
            (f"bon_ht{n}_prm_min", f"HT Best-of-{n}, PRM (min), %", 100.0))


def results_markdown(summary: Mapping[str, Mapping[str, Any]], baselines: Mapping[str, Any],
                     extras: Mapping[str, Any], n_grid: Sequence[int]) -> str:
    n = HEADLINE_N if HEADLINE_N in n_grid else max(n_grid)
    head = ("| arm | questions | label tokens | queries | wall s | label agreement | right answer through a wrong "
            f"step | PB F1 θ=0.5 | PB F1 tuned | PB F1 oracle | HT@{n} PRM | EDU@{n} PRM | seeds |")
    rule = "|" + "---|" * 13

    def row(name: str, s: Mapping[str, Any]) -> str:
        return (f"| {name} | {s['questions']} | {_pm(s['tokens'], 1e-3, 1)}k | {_pm(s['queries'], 1, 0)} | "
                f"{_pm(s['wall_seconds'], 1, 0)} | {_pm(s['label_agreement'])} | {_pm(s['right_through_wrong'])} | "
                f"{_pm(s['pb_f1_05'], 1)} | {_pm(s['pb_f1_tuned'], 1)} | {_pm(s['pb_f1_oracle'], 1)} | "
                f"{_pm(s.get(f'bon_ht{n}_prm_min'))} | {_pm(s.get(f'bon_edu{n}_prm_min'))} | {s['seeds']} |")

    by_seed = list(baselines["by_seed"].values())
    free = {k: mean_std([b[k] for b in by_seed]) for k in by_seed[0]}
    md = ["# Label cost vs PRM quality (toy world)", "",
          "Mean ± std over seeds. Label tokens / queries / wall s: what producing the labels cost the policy "
          "(sampled trees or solutions plus every rollout). Label agreement (%): share of steps whose label "
          "(>= 0.5) matches exact step correctness; right answer through a wrong step (%): share of the labelled "
          "right answers whose path has a wrong line. PB: toy-processbench F1 (exact first-error truth). "
          "HT/EDU@N: Best-of-N accuracy (%) on the toy test questions with PRM (min) selection.", ""]
    for group in ("labellers", "matched budget", "ablations"):
        rows = [row(name, s) for name, s in summary.items() if s["group"] == group]
        if rows:
            md += [f"## {group.capitalize()}", "", head, rule, *rows, ""]
    md += [f"PRM-free baselines on the same candidates: greedy {100 * baselines['greedy']:.1f}%; majority vote HT@{n} "
           f"{_pm(free.get(f'bon_ht{n}_majority'))}, EDU@{n} {_pm(free.get(f'bon_edu{n}_majority'))}; pass@{n} "
           f"HT {_pm(free.get(f'bon_ht{n}_pass@n'))}, EDU {_pm(free.get(f'bon_edu{n}_pass@n'))}.", ""]
    md += reach_lines(summary, n)
    md += bon_curve_table(summary, free, n_grid)
    for key in ("aggregators", "prune", "mcts"):
        if extras.get(key):
            md += [extras[key], ""]
    return "\n".join(md) + "\n"


def reach_lines(summary: Mapping[str, Mapping[str, Any]], n: int = HEADLINE_N) -> list[str]:
    """For each baseline and quality measure: the cost ratio (vs EDU's cost) at which it reaches EDU's quality."""
    if "edu" not in summary:
        return []
    out = ["## Cost to reach EDU's quality", "",
           "Each labeller's measured (label tokens, quality) points (its arms at equal questions and at matched "
           "budgets), interpolated in log cost; the ratio is that cost over EDU's.", "",
           "| baseline | measure | EDU's quality | cost ratio to reach it |", "|---|---|---|---|"]
    edu = summary["edu"]
    for labeller in sorted({s["labeller"] for s in summary.values()} - {"edu"}):
        for key, title, scale in quality_measures(n):
            if edu.get(key) is None or edu["tokens"] is None:
                continue
            points = [(s["tokens"][0], s[key][0]) for s in summary.values()
                      if s["labeller"] == labeller and s["group"] != "ablations" and s.get(key) and s["tokens"]]
            if not points:
                continue
            cost = cost_to_reach(points, edu[key][0])
            best = max(points, key=lambda p: p[1])
            bound = cost is not None and cost == min(points)[0]  # reached at its cheapest measured point
            verdict = (f"{'<= ' if bound else ''}{cost / edu['tokens'][0]:.2f}x" if cost is not None else
                       f"not reached (best {scale * best[1]:.1f} at {best[0] / edu['tokens'][0]:.2f}x)")
            out.append(f"| {labeller} | {title} | {scale * edu[key][0]:.1f} | {verdict} |")
    return [*out, ""] if len(out) > 6 else []  # no baseline measured: no table


def bon_curve_table(summary: Mapping[str, Mapping[str, Any]], free: Mapping[str, Any], n_grid: Sequence[int]
                    ) -> list[str]:
    lines = ["## Best-of-N by N (PRM min; %)", "",
             "| arm | " + " | ".join(f"HT@{n}" for n in n_grid) + " | " + " | ".join(f"EDU@{n}" for n in n_grid)
             + " |", "|" + "---|" * (1 + 2 * len(n_grid))]
    for name, s in summary.items():
        if s["group"] != "labellers":
            continue
        cells = [_pm(s.get(f"bon_{sampler}{n}_prm_min")) for sampler in ("ht", "edu") for n in n_grid]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for sel in ("majority", "pass@n"):
        cells = [_pm(free.get(f"bon_{sampler}{n}_{sel}")) for sampler in ("ht", "edu") for n in n_grid]
        lines.append(f"| {sel} (no PRM) | " + " | ".join(cells) + " |")
    return [*lines, ""]


def save_png(fig: Any, path: Any) -> None:
    """Render a matplotlib figure in memory and write it atomically (any storage path), then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())


def plot_quality_vs_cost(summary: Mapping[str, Mapping[str, Any]], path: Any, n: int = HEADLINE_N) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = quality_measures(n)
    fig, axes = plt.subplots(1, len(measures), figsize=(11, 4.2))
    for ax, (key, title, scale) in zip(axes, measures):
        for labeller in sorted({s["labeller"] for s in summary.values()}):
            pts = sorted((s["tokens"][0], scale * s[key][0], scale * s[key][1], name)
                         for name, s in summary.items() if s["labeller"] == labeller and s["group"] != "ablations"
                         and s.get(key) and s["tokens"])
            if not pts:
                continue
            xs, ys, es, _ = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, fmt="-o", capsize=3, label=labeller)
        ablations = [(s["tokens"][0], scale * s[key][0], scale * s[key][1]) for s in summary.values()
                     if s["group"] == "ablations" and s.get(key) and s["tokens"]]
        if ablations:
            xs, ys, es = zip(*ablations)
            ax.errorbar(xs, ys, yerr=es, fmt="x", color="gray", capsize=2, label="EDU ablations")
        ax.set_xscale("log")
        ax.set_xlabel("label cost (policy tokens generated)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_png(fig, path)


def plot_search(rows: Mapping[tuple[str, int], Sequence[tuple[float, float]]], path: Any) -> None:
    """Accuracy vs distinct tokens per question: HT and EDU Best-of-N and MCTS-EDU at their budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, prefix in (("HT Best-of-N", "HT Best"), ("EDU Best-of-N", "EDU Best"),
                          ("MCTS-EDU", "MCTS-EDU")):
        pts = sorted((mean_std([v[1] for v in vs])[0], 100 * mean_std([v[0] for v in vs])[0],
                      100 * mean_std([v[0] for v in vs])[1]) for (name, _), vs in rows.items()
                     if name.startswith(prefix))
        if pts:
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, fmt="-o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("distinct generated tokens per question")
    ax.set_ylabel("accuracy (%), PRM (min)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def write_results(workdir: Any, runs: Sequence[Mapping[str, Any]], baselines: Mapping[str, Any],
                  extras: Mapping[str, Any], n_grid: Sequence[int], config: Mapping[str, Any]) -> str:
    """results.json, results.md and quality_vs_cost.png in `workdir` (atomic); returns the markdown."""
    workdir = storage.as_path(workdir)
    summary = summarise(runs)
    write_json_atomic(workdir / "results.json", {"config": dict(config), "runs": list(runs), "summary": summary,
                                                 "baselines": baselines, "extras": dict(extras)})
    plot_quality_vs_cost(summary, workdir / "quality_vs_cost.png", HEADLINE_N if HEADLINE_N in n_grid else max(n_grid))
    text = results_markdown(summary, baselines, extras, n_grid) + "\n![quality vs cost](quality_vs_cost.png)\n"
    write_text_atomic(workdir / "results.md", text)
    return text
