"""Is the knowledge a PRM needs in its backbone, and can a reward head read it? Measured on Best-of-N candidates.

    python -m benchmarks.likelihood_rerank --workdir runs/toy --model toy [--model DIR ...]

Reads the HT runs that `edu-prm eval-bon` cached under <workdir>/eval_bon/runs (ht_n<N>_s<seed>) and, for each
`--model` (a causal LM with the policy's tokenizer: 'toy' for the shipped policy, or e.g. a longer-trained toy
model from `edu-prm build-toy --config.steps=3200 --config.misread_rate=0`), teacher-forces every candidate and reports:

- rerank accuracy: the candidate with the highest mean (and highest minimum) token log-probability under the
  model, beside majority vote and pass@N on the same candidates;
- AUROC of the minimum token log-probability for "the answer is right" (pooled over all candidates);
- AUROC of a linear probe on the model's final hidden state at the candidate's last token, i.e. what a freshly
  initialised scalar reward head could read without changing the backbone: a logistic regression fitted on the
  labelled training leaves in <workdir>/labels (their last token and final correctness, train questions only)
  and scored on the candidates (test questions).

Why: if the likelihood reranks well but the probe is near chance, the backbone knows the answer while a reward
head at the step end does not see it, and PRM training has to build that readout from its labels.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from edu_prm_jax.api import load_model  # noqa: E402
from edu_prm_jax.evaluation.bon import Candidate, majority_vote  # noqa: E402
from edu_prm_jax.grading.answers import answers_equal, extract_answer  # noqa: E402
from edu_prm_jax.io.jsonl import DataError  # noqa: E402
from edu_prm_jax.records.steps import read_step_shards  # noqa: E402
from edu_prm_jax.records.trees import read_tree_shards  # noqa: E402
from edu_prm_jax.scoring.metrics import auroc  # noqa: E402
from edu_prm_jax.toy.defaults import resolve_policy  # noqa: E402

PAD_TO = 64  # columns are padded to a multiple of this and rows to ROWS_TO, so each forward compiles once per
ROWS_TO = 16  # (rows, length) bucket


def load_ht_runs(workdir: pathlib.Path, n: int | None = None) -> tuple[int, dict[int, list[dict]]]:
    """(N, seed -> tree records of the HT runs cut to their first N samples). N defaults to the largest N that
    eval-bon drew; a run with fewer samples than the requested N is an error."""
    runs: dict[int, tuple[int, pathlib.Path]] = {}
    for path in (workdir / "eval_bon" / "runs").glob("ht_n*_s*"):
        m = re.fullmatch(r"ht_n(\d+)_s(\d+)", path.name)
        if m and int(m.group(1)) > runs.get(int(m.group(2)), (0, path))[0]:
            runs[int(m.group(2))] = (int(m.group(1)), path)
    if not runs:
        raise SystemExit(f"{workdir}/eval_bon/runs has no ht_n<N>_s<seed> runs: run `edu-prm eval-bon` first")
    drawn = min(size for size, _ in runs.values())
    n = drawn if n is None else n
    if n > drawn:
        raise SystemExit(f"--n {n}: the HT runs in {workdir}/eval_bon/runs hold only {drawn} samples per question")
    out = {}
    for seed, (_, path) in sorted(runs.items()):
        out[seed] = [rec.model_copy(update={"leaves": rec.leaves[:n]}).to_json() for rec in read_tree_shards(path)]
    return n, out


class TeacherForcer:
    """Jitted teacher-forced passes of one causal LM (compiled once per padded batch shape)."""

    def __init__(self, model) -> None:
        graphdef, self.state = nnx.split(model)

        def last_hidden(hidden, lengths):  # gathered on device: only [B, H] comes back to the host
            return jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]

        def hidden(state, tokens, lengths):
            return last_hidden(nnx.merge(graphdef, state).backbone(tokens)[0], lengths)

        def hidden_and_logp(state, tokens, lengths):
            m = nnx.merge(graphdef, state)
            h, _ = m.backbone(tokens)
            logp = jax.nn.log_softmax(m.logits(h), axis=-1)
            return last_hidden(h, lengths), jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]

        self._hidden, self._hidden_and_logp = jax.jit(hidden), jax.jit(hidden_and_logp)

    @staticmethod
    def _pad(rows: list[list[int]]) -> tuple[jax.Array, jax.Array]:
        """Tokens [rows up to ROWS_TO, length up to PAD_TO] and each row's length (padding rows: length 1)."""
        tokens = np.zeros((-(-len(rows) // ROWS_TO) * ROWS_TO, -(-max(map(len, rows)) // PAD_TO) * PAD_TO), np.int32)
        lengths = np.ones(len(tokens), np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
            lengths[i] = len(r)
        return jnp.asarray(tokens), jnp.asarray(lengths)

    def logprobs_and_last_hidden(self, rows: list[list[int]], prompt_len: int
                                 ) -> tuple[list[np.ndarray], np.ndarray]:
        """Per row: the log-probabilities of its tokens after the prompt, and the hidden state at its last token."""
        hidden, logp = (np.asarray(x) for x in self._hidden_and_logp(self.state, *self._pad(rows)))
        return [logp[i, prompt_len - 1:len(r) - 1] for i, r in enumerate(rows)], hidden[:len(rows)]

    def last_hidden(self, rows: list[list[int]], batch: int = 256) -> np.ndarray:
        """The final hidden state at each row's last token (no LM head: cheap on a large vocabulary)."""
        chunks = [rows[b:b + batch] for b in range(0, len(rows), batch)]
        return np.concatenate([np.asarray(self._hidden(self.state, *self._pad(c)))[:len(c)] for c in chunks])


def fit_probe(features: np.ndarray, labels: np.ndarray, steps: int = 2000) -> tuple[np.ndarray, float, tuple]:
    """L2-regularised logistic regression by full-batch gradient descent on standardised features."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        g = 1.0 / (1.0 + np.exp(-(x @ w + b))) - labels
        w -= 0.1 * (x.T @ g / len(x) + 1e-3 * w)
        b -= 0.1 * g.mean()
    return w, b, (mean, std)


def labelled_leaves(workdir: pathlib.Path, limit: int, seed: int = 0) -> tuple[list[list[int]], np.ndarray]:
    """Token rows and final correctness of up to `limit` labelled training solutions."""
    try:
        records = [r.to_json() for r in read_step_shards(workdir / "labels")]
    except DataError as e:
        raise SystemExit(str(e)) from None  # names the directory and, with no shards, the command to run
    order = np.random.default_rng(seed).permutation(len(records))[:limit]
    rows = [records[i]["prompt_ids"] + [t for step in records[i]["step_ids"] for t in step] for i in order]
    return rows, np.asarray([records[i]["final_correct"] for i in order], float)


def evaluate(model_path: str, n: int, runs: dict[int, list[dict]], probe_data: tuple[list[list[int]], np.ndarray]
             ) -> dict:
    forcer = TeacherForcer(load_model(resolve_policy(model_path)))
    train_rows, train_right = probe_data
    w, b, (mean, std) = fit_probe(forcer.last_hidden(train_rows), train_right)
    picks: dict[str, list[bool]] = {"mean_logprob": [], "min_logprob": [], "majority": [], "pass@n": []}
    min_logps, hiddens, right = [], [], []
    records = [rec for trees in runs.values() for rec in trees]
    for rec in tqdm(records, desc=f"rerank {model_path}", unit="q"):
        leaves = [leaf for leaf in rec["leaves"] if leaf["token_ids"]]
        if not leaves:  # nothing generated: no candidate to rerank (pass@N counts it wrong)
            picks["pass@n"].append(False)
            for key in ("mean_logprob", "min_logprob", "majority"):
                picks[key].append(False)
            continue
        rows = [rec["prompt_ids"] + leaf["token_ids"] for leaf in leaves]
        logps, last_hidden = forcer.logprobs_and_last_hidden(rows, len(rec["prompt_ids"]))
        ok = [answers_equal(extract_answer(leaf["text"]), rec["answer"]) for leaf in leaves]
        cands = [Candidate(extract_answer(leaf["text"]), c, []) for leaf, c in zip(leaves, ok)]
        maj = majority_vote(cands)
        picks["mean_logprob"].append(ok[int(np.argmax([lp.mean() for lp in logps]))])
        picks["min_logprob"].append(ok[int(np.argmax([lp.min() for lp in logps]))])
        picks["majority"].append(bool(maj and maj.correct))
        picks["pass@n"].append(any(ok))
        min_logps += [float(lp.min()) for lp in logps]
        hiddens.append(last_hidden)
        right += ok
    right_arr = np.asarray(right, bool)
    return {
        "model": model_path,
        "n": n,
        "questions_x_seeds": len(picks["pass@n"]),
        "rerank_accuracy": {k: round(float(np.mean(v)), 4) for k, v in picks.items()},
        "auroc_min_logprob_right_answer": round(auroc(min_logps, right_arr), 4),
        "probe_train_leaves": len(train_rows),
        "auroc_linear_probe_last_hidden": round(auroc((np.concatenate(hiddens) - mean) / std @ w + b, right_arr), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="an `edu-prm eval-bon` (or pipeline) workdir")
    parser.add_argument("--model", action="append", default=None, help="'toy' or a model dir (repeatable)")
    parser.add_argument("--n", type=int, default=None, help="candidates per question (default: all HT drew)")
    parser.add_argument("--probe-leaves", type=int, default=3000, help="labelled training solutions for the probe")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir)
    n, runs = load_ht_runs(workdir, args.n)
    probe_data = labelled_leaves(workdir, args.probe_leaves)  # read once, probed under every model
    for model_path in args.model or ["toy"]:
        print(json.dumps(evaluate(model_path, n, runs, probe_data), indent=2))


if __name__ == "__main__":
    main()
