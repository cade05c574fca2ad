"""Toy ProcessBench: ProcessBench-format items on held-out toy problems, with exact step labels.

Why: ProcessBench (Zheng et al. 2024) asks a PRM for the earliest wrong step of a solution; its labels come from
human experts and its problems are far beyond what the toy policy can do. The toy world has one reference chain
per problem (`toy.world.render`), so here the earliest wrong step is known exactly, and the same official metric
(`evaluation.processbench`) can be run on CPU in minutes on the PRMs the toy pipeline trains.

Items are ProcessBench records {id, generator, problem, steps, label, final_answer_correct, source, problem_id,
n_ops} on problems of the toy TEST split (never seen by the policy, nor by a PRM trained on `toy:train` questions),
drawn with the ToyConfig the policy was trained on (`toy.defaults.toy_config_of`).

Label convention. A step is one solution LINE ("23 + 45 = 68"; steps are joined with "\\n", as the policy writes
them and as Math-Shepherd steps split). The label is the index of the first line whose text is not the reference
solution's line at that position (`toy.audit.exact_step_correctness` on the "\\n"-joined steps; text compared
exactly), -1 when there is none. The final line "The answer is \\boxed{v}." is a step like any other: it is wrong
iff it differs from the reference's answer line, so a solution whose computation is right but whose box holds
another number has label = its number of operations. Every item ends with exactly one answer line, hence
label == -1 implies final_answer_correct; the converse need not hold (an error whose effect cancels out).

Subsets (by source), each about half erroneous (n // 2 items) and half all-correct, as ProcessBench's are:
- `policy`: the policy's own complete solutions (ended by EOS, no empty line, the answer line last and only
  once), sampled with the project's batched `Sampler` greedily and by HT sampling at each temperature of
  `temperatures` (0 = greedy). Per class at most one item per problem, picked round-robin over the decoding
  settings (so every temperature is represented) in a seeded order. Its errors are the policy's real ones.
- `corrupted`: reference solutions (the all-correct half) and single-line corruptions of other problems'
  references (the erroneous half): a computation line's result changed by a small amount (or the box's number,
  when that line is the answer line), or an operand misread (the start value on line 0); the following lines are
  recomputed from the wrong value, as a real slip propagates, and every value stays within the ToyConfig's
  bounds, so an error is never given away by an out-of-range number.
ProcessBench tunes the 'chosen' theta on one subset (GSM8K) and applies it to all; `edu-prm eval-processbench`
tunes it on `config.toy.theta_split` (default `corrupted`: synthetic slips, transferred to the policy's own).

Determinism: every draw is keyed by SHA-256 of (seed, purpose) and sampling by (seed, question, slot, step), so a
given (n, seed, policy, decoding settings) gives identical items on one machine. `load_or_build` caches the items
under a directory named by a digest of those settings and the policy's weight files (ProcessBench layout: one JSON
array per subset, `<subset>.json`, plus `meta.json` written last): a rerun reuses it, other settings never do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from edu_prm_jax import distributed
from edu_prm_jax.api import load_model, load_tokenizer
from edu_prm_jax.evaluation.processbench_prm import processbench_results, score_items
from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import write_json_atomic
from edu_prm_jax.records.sources import read_processbench
from edu_prm_jax.sampling import DecodeParams, Sampler
from edu_prm_jax.scoring.examples import joined_steps
from edu_prm_jax.toy import world as toy
from edu_prm_jax.toy.audit import exact_step_correctness
from edu_prm_jax.toy.defaults import resolve_policy, toy_config_of

SUBSETS = ("policy", "corrupted")
STEP_JOINER = "\n"  # how a toy solution's lines (the steps) are joined, by the policy and by the reference
DEFAULT_N, DEFAULT_SEED = 64, 0
DEFAULT_TEMPERATURES = (0.0, 0.7, 1.0, 1.3)  # 0 = greedy
FORMAT = "edu_prm_toy_processbench/1"
META = "meta.json"
LABELS = ("steps are solution lines joined with '\\n'; label = index of the first line whose text differs from "
          "the reference solution's line at that position (the answer line included), -1 when none does")
_ANSWER_LINE = re.compile(r"The answer is \\boxed\{-?\d+\}\.")
_RESULT_DELTAS = [d for d in range(-9, 10) if d]  # a result slip: off by 1..9 either way
_MAX_DRAWS = 1000
_MAX_POOL_FACTOR = 16  # the policy subset samples at most this many problems per item before giving up


@dataclasses.dataclass(frozen=True)
class ToyBenchSpec:
    """What a toy benchmark is built from (everything its items depend on, besides the policy's weights)."""

    n: int = DEFAULT_N  # items per subset (n // 2 erroneous, the rest all-correct)
    seed: int = DEFAULT_SEED  # problems, corruptions, sampling and selection
    policy: str = "toy"  # policy dir whose samples fill the `policy` subset ('toy' = the shipped one)
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES  # decoding settings of the policy (0 = greedy)
    samples_per_temperature: int = 2  # HT samples per problem at each temperature > 0
    max_new_tokens: int = 96  # sampling budget per solution (the longest toy solution is ~70 tokens)
    batch_questions: int = 64  # problems per decode batch

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"toy benchmark: n (items per subset) must be >= 2 (both classes), got {self.n}")
        if self.seed < 0:
            raise ValueError(f"toy benchmark: seed must be >= 0, got {self.seed}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"toy benchmark: temperatures must be a non-empty list of values >= 0 (0 = greedy), "
                             f"got {self.temperatures}")
        if self.samples_per_temperature < 1 or self.max_new_tokens < 1 or self.batch_questions < 1:
            raise ValueError("toy benchmark: samples_per_temperature, max_new_tokens and batch_questions must be "
                             f">= 1, got {self.samples_per_temperature}, {self.max_new_tokens}, "
                             f"{self.batch_questions}")


def is_toy_spec(data: str) -> bool:
    """Whether a `data` setting names the toy benchmark ('toy', 'toy:N' or 'toy:N:SEED') rather than a directory
    (a directory literally called 'toy' is passed as './toy')."""
    return data == "toy" or data.startswith("toy:")


def parse_toy_spec(data: str) -> tuple[int, int]:
    """(items per subset, seed) of 'toy' (defaults 64, 0), 'toy:N' or 'toy:N:SEED'; ValueError naming the value."""
    parts = data.split(":")
    if parts[0] != "toy" or len(parts) > 3 or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"data={data!r}: expected toy, toy:<items per subset> or toy:<items per subset>:<seed>")
    n = int(parts[1]) if len(parts) > 1 else DEFAULT_N
    if n < 2:
        raise ValueError(f"data={data!r}: need at least 2 items per subset (one of each class)")
    return n, int(parts[2]) if len(parts) > 2 else DEFAULT_SEED


def parse_temperatures(text: str) -> tuple[float, ...]:
    """'0,0.7,1.0' -> (0.0, 0.7, 1.0); ValueError naming the text for anything else."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"temperatures={text!r}: expected comma-separated numbers (0 = greedy)") from None
    if not values or any(not 0 <= t < float("inf") for t in values):
        raise ValueError(f"temperatures={text!r}: expected comma-separated numbers >= 0 (0 = greedy)")
    return values


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"toy-processbench:{seed}:{purpose}".encode()).digest()[:8],
                                        "big"))


# ------------------------------------------------------------------------------------------------ exact labels
def exact_first_error(problem: str, steps: Sequence[str]) -> int:
    """Index of the first step (line) not on the reference solution, -1 when every step is: the first False of
    `exact_step_correctness(problem, joined_steps(steps, "\\n"))`. ValueError when `problem` is not a toy problem."""
    exact = exact_step_correctness(problem, joined_steps(list(steps), STEP_JOINER))
    if exact is None:
        raise ValueError(f"not a toy problem (or one the toy world cannot evaluate): {problem!r}")
    return next((i for i, ok in enumerate(exact) if not ok), -1)


def _item(problem: dict, steps: list[str], generator: str, subset: str) -> dict[str, Any]:
    return {"id": "", "generator": generator, "problem": problem["problem"], "steps": steps,
            "label": exact_first_error(problem["problem"], steps),
            "final_answer_correct": toy.ToyTask.check(STEP_JOINER.join(steps), problem["answer"]),
            "source": subset, "problem_id": problem["id"], "n_ops": problem["n_ops"]}


# ------------------------------------------------------------------------------------------------ corruptions
CORRUPTION_KINDS = ("result", "operand", "start")


def corrupt_chain(start: int, ops: Sequence[tuple[str, int]], line: int, kind: str, value: int,
                  cfg: toy.ToyConfig | None = None) -> list[str]:
    """The solution lines of chain (start, ops) with one slip at line `line`, later lines recomputed from it.

    kind 'result': line `line` writes `value` as its result (`line == len(ops)`: the answer line boxes `value`);
    'operand': line `line` reads its operand as `value` (and computes with it correctly); 'start': line 0 reads the
    start value as `value`. With `cfg`, every value written must be within its bounds (`toy.world.in_bounds`).
    ValueError when `value` is the correct one (no slip), the line or kind is invalid, a division is inexact, or a
    value leaves the bounds."""
    n = len(ops)
    if kind not in CORRUPTION_KINDS:
        raise ValueError(f"kind must be one of {CORRUPTION_KINDS}, got {kind!r}")
    last = n if kind == "result" else (0 if kind == "start" else n - 1)
    if not 0 <= line <= last:
        raise ValueError(f"a {kind!r} slip needs 0 <= line <= {last}, got {line}")
    lines, a = [], start
    for i, (op, b) in enumerate(ops):
        if i == line and kind == "start":
            if value == a:
                raise ValueError(f"start value {value} is the correct one: no slip")
            a = value
        if i == line and kind == "operand":
            if value == b:
                raise ValueError(f"operand {value} is the correct one: no slip")
            b = value
        c = toy.apply_op(op, a, b)
        if i == line and kind == "result":
            if value == c:
                raise ValueError(f"result {value} is the correct one: no slip")
            c = value
        if cfg is not None and not all(toy.in_bounds(v, cfg) for v in (a, c)):
            raise ValueError(f"line {i} ({a} {op} {b} = {c}) leaves the value bounds")
        lines.append(f"{a} {op} {b} = {c}")
        a = c
    if kind == "result" and line == n:
        if value == a:
            raise ValueError(f"answer {value} is the correct one: no slip")
        a = value
        if cfg is not None and not toy.in_bounds(a, cfg):
            raise ValueError(f"answer {a} leaves the value bounds")
    lines.append(f"The answer is \\boxed{{{a}}}.")
    return lines


def _operand_pool(op: str, cfg: toy.ToyConfig) -> range:
    """The operands the toy world draws for `op` (as `toy.world` does: * and / from 2, +/- by digit count)."""
    if op in "*/":
        return range(2, 10**cfg.max_mul_operand_digits)
    return range(max(1, 10 ** (cfg.min_operand_digits - 1)), 10**cfg.max_operand_digits)


def draw_corruption(problem: str, rng: random.Random, cfg: toy.ToyConfig) -> tuple[list[str], int, str]:
    """(solution lines, slipped line, kind) of one random single-line slip of `problem`'s reference (see
    `corrupt_chain`): kind 'result' (half; line uniform over every line, answer line included, result off by 1..9)
    or a misread operand (half; line uniform over the computation lines; on line 0 the start value half the time,
    kind 'start'), redrawn until every value stays within `cfg`'s bounds. ValueError after 1000 draws."""
    start, ops = toy.ToyTask.parse_problem(problem)
    values = [start]
    for op, b in ops:
        values.append(toy.apply_op(op, values[-1], b))
    for _ in range(_MAX_DRAWS):
        if rng.random() < 0.5:
            kind, line = "result", rng.randrange(len(ops) + 1)
            value = values[min(line + 1, len(ops))] + rng.choice(_RESULT_DELTAS)
        else:
            line = rng.randrange(len(ops))
            kind = "start" if line == 0 and rng.random() < 0.5 else "operand"
            pool, correct = ((_operand_pool("+", cfg), start) if kind == "start"
                             else (_operand_pool(ops[line][0], cfg), ops[line][1]))
            choices = [v for v in pool if v != correct]
            if not choices:
                continue
            value = rng.choice(choices)
        try:
            return corrupt_chain(start, ops, line, kind, value, cfg), line, kind
        except ValueError:
            continue
    raise ValueError(f"no single-line slip of {problem!r} stays within the value bounds after {_MAX_DRAWS} draws")


def corrupted_subset(problems: Sequence[dict], seed: int, cfg: toy.ToyConfig) -> list[dict[str, Any]]:
    """One item per problem: a random n // 2 of them get a slip (`draw_corruption`), the rest their reference.
    RuntimeError if an exact label disagrees with the slipped line (a bug: a slip must change its line)."""
    rng = _rng(seed, "corrupted")
    n = len(problems)
    slipped = set(rng.sample(range(n), n // 2))
    items = []
    for i, p in enumerate(problems):
        if i in slipped:
            steps, line, kind = draw_corruption(p["problem"], rng, cfg)
            item = _item(p, steps, f"corrupt:{kind}", "corrupted")
            if item["label"] != line:
                raise RuntimeError(f"{p['id']}: a {kind} slip at line {line} got the exact label {item['label']}")
        else:
            item = _item(p, p["solution"].split("\n"), "reference", "corrupted")
            if item["label"] != -1:
                raise RuntimeError(f"{p['id']}: the reference solution got the exact label {item['label']}")
        items.append(item)
    return items


# ------------------------------------------------------------------------------------------------ policy samples
def decoding_name(temperature: float) -> str:
    """The `generator` suffix of a decoding setting: 'greedy' or 'T=0.7'."""
    return "greedy" if temperature == 0 else f"T={temperature:g}"


def complete_solution(text: str) -> list[str] | None:
    """The lines of a sampled solution, or None when it is not a complete one: an empty line, no answer line
    ("The answer is \\boxed{<integer>}.") at the end, or a \\boxed before it."""
    lines = text.split(STEP_JOINER)
    if any(not line.strip() for line in lines) or not _ANSWER_LINE.fullmatch(lines[-1]):
        return None
    if any("\\boxed" in line for line in lines[:-1]):
        return None
    return lines


def sample_policy(model: Any, tokenizer: Any, problems: Sequence[dict], question_ids: Sequence[int],
                  spec: ToyBenchSpec, *, mesh: Any = None, rules: Any = None) -> list[list[tuple[str, str, str]]]:
    """Per problem, (decoding name, text without EOS, stop reason) of every sample, decoding setting by setting
    (greedy, then `samples_per_temperature` HT samples per temperature), each setting one batched `Sampler` run
    over all problems. `question_ids` key the randomness (with a seed derived from spec.seed and the setting)."""
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(p["problem"])) for p in problems]
    eos = set(tokenizer.eos_token_ids)
    out: list[list[tuple[str, str, str]]] = [[] for _ in problems]
    for t in spec.temperatures:
        seed = int.from_bytes(hashlib.sha256(f"toy-processbench:{spec.seed}:sample:{t!r}".encode()).digest()[:4],
                              "big")
        params = DecodeParams(mode="greedy" if t == 0 else "ht", num_leaves=1 if t == 0 else
                              spec.samples_per_temperature, temperature=t or 1.0,
                              max_new_tokens=spec.max_new_tokens, stop_at_answer=False, seed=seed)
        sampler = Sampler(model, tokenizer, params, mesh=mesh, batch_questions=spec.batch_questions,
                          prompt_bucket=16, rules=rules)
        for i, leaves in enumerate(sampler.sample_ids(prompts, list(question_ids))):
            for leaf in leaves:
                ids = leaf.token_ids[:-1] if leaf.token_ids and leaf.token_ids[-1] in eos else leaf.token_ids
                out[i].append((decoding_name(t), tokenizer.decode(ids), leaf.stop_reason))
    return out


def _select(candidates: Sequence[dict], k: int, order: Sequence[str], rng: random.Random) -> list[dict]:
    """Up to k candidates, at most one per problem, round-robin over the decoding settings in `order` (each
    setting's candidates in a seeded random order)."""
    order = list(dict.fromkeys(order))
    groups = {name: [c for c in candidates if c["generator"] == f"toy-policy:{name}"] for name in order}
    for g in groups.values():
        rng.shuffle(g)
    chosen: list[dict] = []
    used: set[str] = set()
    while len(chosen) < k and any(groups.values()):
        for name in order:
            g = groups[name]
            while g and g[0]["problem_id"] in used:
                g.pop(0)
            if g and len(chosen) < k:
                c = g.pop(0)
                used.add(c["problem_id"])
                chosen.append(c)
    return chosen


def policy_subset(model: Any, tokenizer: Any, problems_of: Callable[[int], list[dict]], spec: ToyBenchSpec, *,
                  mesh: Any = None, rules: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """n items (n // 2 erroneous) from the policy's complete, distinct solutions, and the pool's statistics.

    `problems_of(m)` returns the first m held-out problems of the pool; the pool starts at n problems and doubles
    (sampling only the new ones) until both classes have enough problems, up to 16 n. ValueError naming the counts
    when the policy still gives too few of a class."""
    n_err, n_corr = spec.n // 2, spec.n - spec.n // 2
    order = [decoding_name(t) for t in spec.temperatures]
    candidates: list[dict] = []
    dropped = {"no_eos": 0, "incomplete": 0, "duplicate": 0}
    samples, size, done = 0, spec.n, 0
    while True:
        problems = problems_of(size)
        new = problems[done:]
        for j, per_problem in enumerate(sample_policy(model, tokenizer, new, range(done, size), spec, mesh=mesh,
                                                      rules=rules)):
            seen: set[str] = set()
            for name, text, stop in per_problem:
                samples += 1
                lines = complete_solution(text) if stop == "eos" else None
                if lines is None:
                    dropped["no_eos" if stop != "eos" else "incomplete"] += 1
                elif text in seen:
                    dropped["duplicate"] += 1
                else:
                    seen.add(text)
                    candidates.append(_item(new[j], lines, f"toy-policy:{name}", "policy"))
        done = size
        err = [c for c in candidates if c["label"] != -1]
        corr = [c for c in candidates if c["label"] == -1]
        have_err, have_corr = len({c["problem_id"] for c in err}), len({c["problem_id"] for c in corr})
        if have_err >= n_err and have_corr >= n_corr:
            break
        if size >= _MAX_POOL_FACTOR * spec.n:
            raise ValueError(f"toy benchmark: on {size} held-out problems the policy {spec.policy!r} wrote complete "
                             f"erroneous solutions for {have_err} problems and all-correct ones for {have_corr}; "
                             f"{n_err} and {n_corr} are needed (lower n, or add temperatures)")
        size *= 2
    rng = _rng(spec.seed, "policy-select")
    items = _select(err, n_err, order, rng) + _select(corr, n_corr, order, rng)
    rng.shuffle(items)
    stats = {"problems_sampled": size, "samples": samples, "candidates": len(candidates),
             "candidates_erroneous": len(err), "candidates_correct": len(corr), "dropped": dropped,
             "by_generator": {g: sum(it["generator"] == g for it in items) for g in
                              sorted({it["generator"] for it in items})}}
    return items, stats


# ------------------------------------------------------------------------------------------------ build / cache
def build_toy_processbench(spec: ToyBenchSpec, *, mesh: Any = None, rules: Any = None,
                           model: Any = None, tokenizer: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(items, build statistics) of the toy benchmark `spec`: `spec.n` items per subset of `SUBSETS`, subset by
    subset, ids '<subset>-<index>'. The policy (`spec.policy`, loaded in float32 on `mesh` unless `model` and
    `tokenizer` are given) samples the `policy` subset; its ToyConfig (training report) draws the problems.
    Corrupted and policy items use disjoint problems of the test split. No network access, no file written."""
    policy_dir = resolve_policy(spec.policy)
    cfg = toy_config_of(policy_dir)
    if model is None:
        model = load_model(policy_dir, mesh=mesh, rules=rules)
    if tokenizer is None:
        tokenizer = load_tokenizer(policy_dir)

    def problems(m: int) -> list[dict]:  # prefix-stable: the first m problems never change with m
        return toy.generate_split("test", m, cfg, seed=spec.seed)

    corrupted = corrupted_subset(problems(spec.n), spec.seed, cfg)
    policy, stats = policy_subset(model, tokenizer, lambda m: problems(spec.n + m)[spec.n:], spec, mesh=mesh,
                                  rules=rules)
    items = []
    for name, subset in (("policy", policy), ("corrupted", corrupted)):
        for i, it in enumerate(subset):
            items.append({**it, "id": f"{name}-{i}"})
    kinds = {}
    for it in corrupted:
        kinds[it["generator"]] = kinds.get(it["generator"], 0) + 1
    stats = {"policy": stats, "corrupted": {"by_generator": dict(sorted(kinds.items()))},
             "subsets": {s: subset_counts([it for it in items if it["source"] == s]) for s in SUBSETS},
             "toy_config": dataclasses.asdict(cfg)}
    return items, stats


def subset_counts(items: Sequence[dict]) -> dict[str, int]:
    """{n_err, n_corr, final_answer_correct, erroneous_with_correct_answer} of a list of items."""
    return {"n_err": sum(it["label"] != -1 for it in items), "n_corr": sum(it["label"] == -1 for it in items),
            "final_answer_correct": sum(bool(it["final_answer_correct"]) for it in items),
            "erroneous_with_correct_answer": sum(it["label"] != -1 and bool(it["final_answer_correct"])
                                                 for it in items)}


def spec_identity(spec: ToyBenchSpec) -> dict[str, Any]:
    """What the cached items depend on: the spec, the builder's format, and the policy's resolved path and
    weight/config files (name, bytes, mtime): a rewritten policy never reuses items built from the old one."""
    policy_dir = resolve_policy(spec.policy)
    files = sorted(list(policy_dir.glob("*.safetensors")) + [p for p in (policy_dir / "config.json",
                                                                          policy_dir / "training_report.json")
                                                              if p.is_file()])
    return {"format": FORMAT, **dataclasses.asdict(spec), "temperatures": list(spec.temperatures),
            "policy_dir": str(storage.resolved(policy_dir)),
            "policy_files": ["{}:{}:{}".format(f.name, *storage.size_and_mtime_ns(f)) for f in files]}


def bench_dir_name(identity: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"toy_n{identity['n']}_seed{identity['seed']}_{digest}"


def write_toy_processbench(items: Sequence[dict], meta: dict[str, Any], out_dir: storage.PathLike) -> None:
    """Write `items` in ProcessBench's layout (`<subset>.json`, one JSON array each, readable by
    `records.sources.read_processbench` and `edu-prm eval-processbench --config.data=DIR`), then `meta.json`
    (its presence marks a complete benchmark). Every file is written atomically."""
    out = storage.as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subsets = list(dict.fromkeys(it["source"] for it in items))
    for name in subsets:
        write_json_atomic(out / f"{name}.json", [it for it in items if it["source"] == name], indent=1)
    write_json_atomic(out / META, {**meta, "subsets_files": [f"{s}.json" for s in subsets]})


def read_toy_processbench(bench_dir: storage.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(items, meta) of a benchmark `write_toy_processbench` wrote; each file is validated as ProcessBench
    (`read_processbench`: errors name the file and item). FileNotFoundError when meta.json is missing."""
    d = storage.as_path(bench_dir)
    if not (d / META).is_file():
        raise FileNotFoundError(f"{d / META}: no such file (not a complete toy benchmark)")
    meta = json.loads((d / META).read_text())
    items = []
    for name in meta["subsets_files"]:
        subset = name.removesuffix(".json")
        for r in read_processbench(d / name):
            items.append({k: v for k, v in r.items() if k not in ("answer", "solution")} | {"source": subset})
    return items, meta


def load_or_build(spec: ToyBenchSpec, cache_root: storage.PathLike, *, mesh: Any = None,
                  rules: Any = None) -> tuple[list[dict[str, Any]], storage.PathLike]:
    """(items, benchmark dir) of `spec`, cached under `cache_root/<toy_n.._seed.._digest>/`: reused when that
    directory is complete and its meta.json has the same identity (`spec_identity`), built and written otherwise.
    Multi-host: process 0 builds and writes, every process reads after a barrier (the root must be shared).
    ValueError when the directory holds a benchmark of another identity (a digest collision; never reused)."""
    identity = spec_identity(spec)
    bench = storage.as_path(cache_root) / bench_dir_name(identity)
    if distributed.is_lead():
        if (bench / META).is_file():
            _, meta = read_toy_processbench(bench)
            if meta.get("identity") != identity:
                raise ValueError(f"{bench / META}: a toy benchmark of other settings ({meta.get('identity')}); "
                                 "remove that directory")
        else:
            items, stats = build_toy_processbench(spec, mesh=mesh, rules=rules)
            write_toy_processbench(items, {"identity": identity, "stats": stats, "label_convention": LABELS},
                                   bench)
    distributed.barrier("toy-processbench: written")
    items, _ = read_toy_processbench(bench)
    return items, bench



# ------------------------------------------------------------------------------------------------ evaluation
def items_by_subset(items: Sequence[dict]) -> dict[str, list[dict]]:
    """Items grouped by their `source` (the subset), subsets in first-seen order."""
    out: dict[str, list[dict]] = {}
    for it in items:
        out.setdefault(it["source"], []).append(it)
    return out


def evaluate_step_scores(items: Sequence[dict], scores: Sequence[Sequence[float]], *, theta: float = 0.5,
                         theta_split: str = "corrupted") -> dict[str, Any]:
    """The official ProcessBench metric of per-step scores (in [0, 1], one list per item, aligned with `items`; a
    list may be shorter than the item's steps: the rest are unscored) on the items' subsets:
    `evaluation.processbench_prm.processbench_results` (fixed theta, theta tuned on `theta_split`, oracle theta,
    trivial predictors) plus {"items": {subset: count}}. ValueError when the lengths differ or a subset lacks a
    class."""
    if len(scores) != len(items):
        raise ValueError(f"{len(scores)} score lists for {len(items)} items")
    by_score: dict[str, list[Sequence[float]]] = {}
    by_label: dict[str, list[int]] = {}
    for it, s in zip(items, scores):
        by_score.setdefault(it["source"], []).append(list(s))
        by_label.setdefault(it["source"], []).append(int(it["label"]))
    return {**processbench_results(by_score, by_label, theta, theta_split),
            "items": {k: len(v) for k, v in by_label.items()}}


def evaluate_prm(prm: Any, tokenizer: Any, items: Sequence[dict], *, theta: float = 0.5,
                 theta_split: str = "corrupted", joiner: str = STEP_JOINER, max_tokens: int = 1024,
                 batch_size: int = 8) -> dict[str, Any]:
    """A loaded PRM on the items, as `edu-prm eval-processbench --config.data=toy` scores them (steps fed by
    `evaluation.processbench_prm.score_items` with `joiner`): `evaluate_step_scores`'s dict plus
    {"items_with_unscored_steps": {subset: count}}. Multi-host: every process calls it with the same items."""
    results_scores: list[list[float]] = []
    ordered: list[dict] = []
    unscored = {}
    for name, subset in items_by_subset(items).items():
        scores, unscored[name] = score_items(prm, tokenizer, subset, joiner=joiner, max_tokens=max_tokens,
                                             batch_size=batch_size, name=name)
        results_scores += scores
        ordered += subset
    return {**evaluate_step_scores(ordered, results_scores, theta=theta, theta_split=theta_split),
            "items_with_unscored_steps": unscored}
