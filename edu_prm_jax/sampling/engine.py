"""Host side of sampling: tokenise and bucket questions, run the jitted loop, turn slots into tree records.

Prompts are right-padded to a multiple of `prompt_bucket` and questions are processed `batch_questions` at a
time (the last batch padded with dummy rows), so a run compiles once per prompt-length bucket. With `refill`
(the default) the batches share one pool of slots: a question's slots go to the next waiting question as soon as
its tree is finished, instead of idling until the slowest question of its batch ends (`decode.decode_refill`);
the trees are the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from edu_prm_jax import distributed, parallel
from edu_prm_jax.sampling.decode import STOP_NAMES, DecodeParams, Tables, decode, decode_refill
from edu_prm_jax.sampling.stopping import build_stop_tables
from edu_prm_jax.sampling.symbols import symbol_token_mask


@dataclasses.dataclass
class Leaf:
    """One root-to-leaf path of a question's tree (one slot)."""

    slot: int
    parent_slot: int  # slot this path forked from (-1 for the root / an HT sample)
    fork_pos: int  # generated-token index where it diverged from its parent (0 for roots)
    token_ids: list[int]
    entropies: list[float]
    logprobs: list[float]
    anchors: list[int]  # generated-token indices where this path (or an ancestor) branched: step boundaries
    stop_reason: str
    high_entropy: list[int] = dataclasses.field(default_factory=list)  # indices that qualified as anchors
    text: str = ""

    @property
    def new_tokens(self) -> int:
        """Tokens this path generated itself (its shared prefix is counted by its ancestors)."""
        return len(self.token_ids) - self.fork_pos

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["entropies"] = [round(x, 5) for x in self.entropies]
        d["logprobs"] = [round(x, 5) for x in self.logprobs]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Leaf:
        """The inverse of `to_json`; fields a labeller does not need may be absent (validated by the reader)."""
        return cls(slot=d["slot"], parent_slot=d.get("parent_slot", -1), fork_pos=d.get("fork_pos", 0),
                   token_ids=list(d["token_ids"]), entropies=list(d.get("entropies", [])),
                   logprobs=list(d.get("logprobs", [])), anchors=list(d["anchors"]),
                   stop_reason=d.get("stop_reason", ""), high_entropy=list(d.get("high_entropy", [])),
                   text=d["text"])


def distinct_tokens(leaves: Sequence[Leaf]) -> int:
    """Tree token cost: each generated token counted once, a shared prefix once (METHOD.md "Token cost")."""
    return sum(leaf.new_tokens for leaf in leaves)


def slots_to_leaves(out: dict[str, np.ndarray], row0: int, num_leaves: int) -> list[Leaf]:
    leaves = []
    for m in range(num_leaves):
        r = row0 + m
        if not out["used"][r]:
            continue
        n = int(out["gen_len"][r])
        parent = int(out["parent"][r])
        leaves.append(Leaf(
            slot=m, parent_slot=parent, fork_pos=int(out["fork_pos"][r]),
            token_ids=out["tokens"][r, :n].tolist(), entropies=out["entropies"][r, :n].tolist(),
            logprobs=out["logprobs"][r, :n].tolist(),
            anchors=[int(a) for a in out["anchors"][r, : int(out["n_anchors"][r])]],
            stop_reason=STOP_NAMES[int(out["stop"][r])],
            high_entropy=np.flatnonzero(out["high_entropy"][r, :n]).tolist()))
    return leaves


@dataclasses.dataclass
class Tree:
    """All leaves of one question, plus the tokens of paths P-EDU pruned (they were generated, so they cost)."""

    leaves: list[Leaf]
    pruned_tokens: int = 0

    @property
    def cost(self) -> int:
        return distinct_tokens(self.leaves) + self.pruned_tokens


class Sampler:
    """Runs HT or EDU sampling for a model + tokenizer; `sample_trees(prompt_ids, question_ids)` yields a Tree per
    question.

    `refill` (default True): decode the batches through one pool of `batch_questions` question blocks whose
    finished blocks take the next waiting question (`decode.decode_refill`). It applies on one device (no mesh,
    or a one-device mesh: each host of a multi-host job samples on its own devices) and to more than one batch;
    otherwise, or with `refill=False`, each batch runs alone (`decode.decode`) and waits for its slowest
    question. The trees are the same either way (floats up to kernel rounding, `decode`'s module docstring).
    `stats` counts loop_steps (loop iterations over all rows, summed over batches or over the refilled pool),
    batches and refilled runs."""

    def __init__(self, model: nnx.Module, tokenizer: Any, params: DecodeParams, *, mesh: Mesh | None = None,
                 batch_questions: int = 8, prompt_bucket: int = 32, stop_strings: Sequence[str] = (),
                 extra_symbols: str = "", disable_symbols: bool = False, prm: nnx.Module | None = None,
                 rules: parallel.RulesLike = None, refill: bool = True):
        self.model, self.tokenizer, self.params, self.mesh, self.prm = model, tokenizer, params, mesh, prm
        self.refill = refill
        self.stats = {"loop_steps": 0, "batches": 0, "refilled_runs": 0}
        self.rules = parallel.as_rules(rules)  # the sampling layout (may differ from training's)
        self.prompt_bucket = prompt_bucket
        split = self.rules.axis_size("rollout", mesh) if mesh is not None else 1  # questions split this many ways
        self.batch_questions = -(-batch_questions // split) * split
        vocab = model.cfg.vocab_size
        texts = tokenizer.decoded_token_texts()
        stop = build_stop_tables(texts, vocab, list(tokenizer.eos_token_ids),
                                 [tokenizer.encode(s) for s in stop_strings])
        symbols = symbol_token_mask(tokenizer, extra_symbols=extra_symbols, disable=disable_symbols, size=vocab)
        self.tables = Tables.build(stop, symbols, vocab, min(tokenizer.vocab_size, vocab))

    def sample_ids(self, prompts: Sequence[Sequence[int]], question_ids: Sequence[int]) -> Iterator[list[Leaf]]:
        """Leaves for each prompt (token ids), in order; question_ids key the randomness."""
        for tree in self.sample_trees(prompts, question_ids):
            yield tree.leaves

    def sample_trees(self, prompts: Sequence[Sequence[int]], question_ids: Sequence[int]) -> Iterator[Tree]:
        """A Tree per prompt (token ids), in order; question_ids key the randomness. In a multi-host job it runs
        on this process's devices (the sampler's mesh) and stops between decode batches when another process
        has failed (`distributed.PeerFailedError`). Raises ValueError for an empty prompt."""
        p, bq = self.params, self.batch_questions
        starts = range(0, len(prompts), bq)
        one_device = self.mesh is None or self.mesh.devices.size == 1
        if self.refill and one_device and len(starts) > 1:
            yield from self._refilled(prompts, question_ids)
            return
        for start, (arr, lens, ids) in zip(starts, self._batches(prompts, question_ids)):
            out = decode(p, self.model, self.tables, arr, lens, ids, self.mesh, prm=self.prm, rules=self.rules)
            self.stats["loop_steps"] += int(out["steps"].max(initial=0))
            for i in range(min(bq, len(prompts) - start)):
                yield self._tree(out, i)

    def _width(self, chunk: Sequence[Sequence[int]]) -> int:
        """The padded prompt width of a batch: its longest prompt rounded up to `prompt_bucket`."""
        longest = max(len(x) for x in chunk)
        return -(-longest // self.prompt_bucket) * self.prompt_bucket

    def _batches(self, prompts: Sequence[Sequence[int]],
                 question_ids: Sequence[int]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(prompts [bq, width] int32 right-padded, prompt_lens [bq], question_ids [bq], -1 for padding rows) per
        batch of `batch_questions`, checking on the other processes before each."""
        bq = self.batch_questions
        for start in range(0, len(prompts), bq):
            distributed.check_peers("sampling")
            chunk = list(prompts[start:start + bq])
            qids = list(question_ids[start:start + bq])
            arr = np.zeros((bq, self._width(chunk)), np.int32)
            lens = np.ones((bq,), np.int32)
            ids = np.full((bq,), -1, np.int32)
            for i, toks in enumerate(chunk):
                if not toks:
                    raise ValueError(f"question {qids[i]}: empty prompt")
                arr[i, :len(toks)] = toks
                lens[i] = len(toks)
                ids[i] = qids[i]
            self.stats["batches"] += 1
            yield arr, lens, ids

    def _refilled(self, prompts: Sequence[Sequence[int]], question_ids: Sequence[int]) -> Iterator[Tree]:
        """`sample_trees` through `decode_refill`: trees come back as their questions finish and are yielded in
        input order (a finished tree waits, on the host, for the ones before it)."""
        bq, done, next_index = self.batch_questions, {}, 0
        self.stats["refilled_runs"] += 1
        for batch, row, out in decode_refill(self.params, self.model, self.tables,
                                             self._batches(prompts, question_ids), prm=self.prm, stats=self.stats):
            done[batch * bq + row] = self._tree(out, 0)
            while next_index in done:
                yield done.pop(next_index)
                next_index += 1

    def _tree(self, out: dict[str, np.ndarray], i: int) -> Tree:
        """Question i's Tree from a decode record (rows i*M .. i*M+M-1), with each leaf's text."""
        m = self.params.num_leaves
        leaves = slots_to_leaves(out, i * m, m)
        for leaf in leaves:
            leaf.text = self.tokenizer.decode(leaf.token_ids)
        return Tree(leaves, int(out["pruned_tokens"][i]))
