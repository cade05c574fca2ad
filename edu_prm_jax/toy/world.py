"""The embedded synthetic arithmetic world: questions, step-by-step references and a tokenizer.

Why it exists: the whole EDU-PRM pipeline (sample -> label -> train -> eval) must run end to end on a
CPU in minutes, with a policy small enough to train there yet weak enough to make mistakes whose
positions the entropy reveals. Problems are left-to-right chains in a mild word form,

    Start with 23. Add 45. Multiply by 2. Subtract 7. What is the result?

and the reference solution has one explicit computation line per operation, each consuming the
previous line's result (so an early slip propagates, which is what gives Monte-Carlo step labels and
the PRM their signal):

    23 + 45 = 68
    68 * 2 = 136
    136 - 7 = 129
    The answer is \\boxed{129}.

Steps are the solution's lines (the Math-Shepherd baseline splits on "\\n"). The chain is evaluated
left to right, so there is no operator precedence to learn; "/" (off by default) is exact division.

Determinism and splits: everything is driven by `random.Random` seeded from a SHA-256 digest of
(seed, split), never Python's salted `hash()`, so lists are identical across processes. A problem's
split is a pure function of its text (SHA-256 of the text, first 8 bytes, compared with
`test_fraction`), so the same problem can never be in both train and test, whatever the seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterable, Iterator

import sentencepiece as spm
from etils import epath

from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import write_bytes_atomic

EOS = "<|endoftext|>"
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", EOS)
SPLITS = ("train", "test")
_WORDS = {"+": "Add {b}.", "-": "Subtract {b}.", "*": "Multiply by {b}.", "/": "Divide by {b}."}
_MAX_DRAWS_PER_PROBLEM = 10_000


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Difficulty knobs of the toy world (defaults aim a few-M-param policy at 30-80% greedy accuracy)."""

    min_ops: int = 2  # fewest binary operations (= solution steps before the answer line)
    max_ops: int = 4  # most binary operations
    min_operand_digits: int = 1  # digits of the start value and of +/- operands, lower bound
    max_operand_digits: int = 2  # digits of the start value and of +/- operands, upper bound
    max_mul_operand_digits: int = 1  # digits of * and / operands (drawn from 2..10**d - 1)
    operators: str = "+-*"  # subset of "+-*/"; each step draws one uniformly
    max_value: int = 1000  # every intermediate result satisfies |value| < max_value
    allow_negative: bool = False  # if False every intermediate result is >= 0
    test_fraction: float = 0.1  # share of the problem space (by text hash) reserved for the test split
    seed: int = 0  # default seed of generate_split / toy_corpus

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"ToyConfig: need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if not 1 <= self.min_operand_digits <= self.max_operand_digits:
            raise ValueError(
                "ToyConfig: need 1 <= min_operand_digits <= max_operand_digits, got "
                f"{self.min_operand_digits}, {self.max_operand_digits}"
            )
        if self.max_mul_operand_digits < 1:
            raise ValueError(
                f"ToyConfig.max_mul_operand_digits must be >= 1, got {self.max_mul_operand_digits}"
            )
        if not self.operators or set(self.operators) - set(_WORDS):
            raise ValueError(
                f"ToyConfig.operators must be a non-empty subset of '+-*/', got {self.operators!r}"
            )
        if self.max_value <= 10 ** (self.min_operand_digits - 1):
            raise ValueError(f"ToyConfig.max_value={self.max_value} leaves no room for a start value")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"ToyConfig.test_fraction must be in (0, 1), got {self.test_fraction}")


def in_bounds(value: int, cfg: ToyConfig) -> bool:
    """Whether an intermediate value is allowed by `cfg` (|value| < max_value, and >= 0 unless allow_negative)."""
    return abs(value) < cfg.max_value and (cfg.allow_negative or value >= 0)


def apply_op(op: str, a: int, b: int) -> int:
    """a op b for one toy operation ("/" must be exact)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if a % b:
        raise ValueError(f"inexact division {a} / {b}")
    return a // b


def _operand_range(op: str, cfg: ToyConfig) -> range:
    if op in "*/":
        return range(2, 10**cfg.max_mul_operand_digits)
    return range(10 ** (cfg.min_operand_digits - 1), 10**cfg.max_operand_digits)


def _draw_digits_number(rng: random.Random, lo_digits: int, hi_digits: int, low: int) -> int:
    """Digit count uniform first, then the value: keeps short operands as common as long ones."""
    digits = rng.randint(lo_digits, hi_digits)
    return rng.randint(max(low, 10 ** (digits - 1)), 10**digits - 1)


def _draw_operand(rng: random.Random, op: str, value: int, cfg: ToyConfig) -> int | None:
    if op == "*":
        return _draw_digits_number(rng, 1, cfg.max_mul_operand_digits, low=2)
    if op == "/":
        divisors = [d for d in _operand_range(op, cfg) if value and value % d == 0]
        return rng.choice(divisors) if divisors else None
    return _draw_digits_number(rng, cfg.min_operand_digits, cfg.max_operand_digits, low=1)


def _text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_of(problem: str, cfg: ToyConfig) -> str:
    """The split a problem text belongs to: 'test' iff the first 8 bytes of SHA-256(text) fall below
    test_fraction of 2**64. Stable across processes, seeds and machines."""
    bucket = int.from_bytes(_text_digest(problem)[:8], "big") / 2.0**64
    return "test" if bucket < cfg.test_fraction else "train"


def render(start: int, ops: list[tuple[str, int]]) -> dict:
    """Problem text, step-by-step solution and answer of one chain (start, [(op, operand), ...])."""
    problem = " ".join([f"Start with {start}."] + [_WORDS[op].format(b=b) for op, b in ops])
    problem += " What is the result?"
    lines, value = [], start
    for op, b in ops:
        result = apply_op(op, value, b)
        lines.append(f"{value} {op} {b} = {result}")
        value = result
    lines.append(f"The answer is \\boxed{{{value}}}.")
    return {
        "id": "toy-" + _text_digest(problem).hex()[:16],
        "problem": problem,
        "solution": "\n".join(lines),
        "answer": str(value),
        "n_ops": len(ops),
    }


def generate_problem(rng: random.Random, cfg: ToyConfig) -> dict:
    """One problem; its number of operations is uniform in [min_ops, max_ops], and chains whose
    intermediate values leave the bounds are redrawn (with the same number of operations)."""
    n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    for _ in range(_MAX_DRAWS_PER_PROBLEM):
        start = _draw_digits_number(rng, cfg.min_operand_digits, cfg.max_operand_digits, low=1)
        if not in_bounds(start, cfg):
            continue
        value, ops = start, []
        for _ in range(n_ops):
            op = rng.choice(cfg.operators)
            b = _draw_operand(rng, op, value, cfg)
            if b is None:
                break
            value = apply_op(op, value, b)
            if not in_bounds(value, cfg):
                break
            ops.append((op, b))
        if len(ops) == n_ops:
            return render(start, ops)
    raise ValueError(f"ToyConfig {cfg} admits no {n_ops}-operation chain within the value bounds")


def _split_seed(seed: int, split: str) -> int:
    return int.from_bytes(hashlib.sha256(f"edu_prm_toy:{seed}:{split}".encode()).digest()[:8], "big")


def generate_split(split: str, n: int, cfg: ToyConfig, seed: int | None = None) -> list[dict]:
    """n distinct problems of `split` ('train' or 'test'), identical for identical (split, n, cfg, seed)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(_split_seed(cfg.seed if seed is None else seed, split))
    out: list[dict] = []
    seen: set[str] = set()
    misses, max_misses = 0, 1000 + int(200 / min(cfg.test_fraction, 1 - cfg.test_fraction))
    while len(out) < n:
        p = generate_problem(rng, cfg)
        if split_of(p["problem"], cfg) != split or p["problem"] in seen:
            misses += 1
            if misses > max_misses:
                raise ValueError(
                    f"generate_split: found only {len(out)} of {n} distinct {split} problems; the config "
                    f"admits {problem_space_size(cfg)} problems in all (see problem_space_size)"
                )
            continue
        misses = 0
        seen.add(p["problem"])
        out.append(p)
    return out


def problem_space_size(cfg: ToyConfig) -> int:
    """Exact number of distinct problems the generator can emit (both splits together); about
    (1 - test_fraction) of them are train problems. Counted by dynamic programming over values."""
    starts = range(10 ** (cfg.min_operand_digits - 1), 10**cfg.max_operand_digits)
    ways = {v: 1 for v in starts if v > 0 and in_bounds(v, cfg)}
    total = 0
    for n_ops in range(1, cfg.max_ops + 1):
        nxt: dict[int, int] = {}
        for value, count in ways.items():
            for op in cfg.operators:
                for b in _operand_range(op, cfg):
                    if op == "/" and (value == 0 or value % b):
                        continue
                    result = apply_op(op, value, b)
                    if in_bounds(result, cfg):
                        nxt[result] = nxt.get(result, 0) + count
        ways = nxt
        if n_ops >= cfg.min_ops:
            total += sum(ways.values())
    return total


def plain_prompt(problem: str) -> str:
    """The 'plain' chat format's prompt; the model continues with the solution and EOS."""
    return f"Question: {problem}\nAnswer:\n"


def toy_corpus(n_train: int, cfg: ToyConfig, seed: int | None = None) -> Iterator[str]:
    """Training texts `Question: ...\\nAnswer:\\n<solution><|endoftext|>` for tokenizer and LM training."""
    for p in generate_split("train", n_train, cfg, seed):
        yield plain_prompt(p["problem"]) + p["solution"] + EOS


def train_toy_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 256, seed: int = 0
) -> epath.Path:
    """Train a SentencePiece BPE model on `texts`; write out_dir/tokenizer.model and
    out_dir/tokenizer_config.json; return out_dir.

    Digits are split into single pieces (arithmetic is learned digit by digit), "\\n" and the chat/EOS
    strings are user-defined single pieces, normalization is the identity so decode(encode(x)) == x,
    and there is no byte fallback, BOS or EOS id (EOS is the `<|endoftext|>` piece). `vocab_size` is an
    upper bound: the toy text has a small alphabet, so BPE may stop earlier. Training is single-threaded
    and unshuffled, and the model is serialized from memory (no paths in its trainer spec), so two
    trainings on the same texts give byte-identical files.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("train_toy_tokenizer: no texts")
    out = storage.as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        split_digits=True,
        user_defined_symbols=[*SPECIAL_TOKENS, "\n"],
        byte_fallback=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    write_bytes_atomic(out / "tokenizer.model", model.getvalue())
    config = {"eos_token": EOS, "pad_token": EOS, "edu_prm_chat_template": "plain"}
    write_bytes_atomic(out / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())
    return out


_STEP_RE = re.compile(r"^\s*(-?\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)\s*$")
_PROBLEM_RE = re.compile(
    r"^Start with (-?\d+)\.((?: (?:Add|Subtract|Multiply by|Divide by) \d+\.)+) What is the result\?$"
)
_OP_RE = re.compile(r"(Add|Subtract|Multiply by|Divide by) (\d+)\.")
_WORD_OPS = {"Add": "+", "Subtract": "-", "Multiply by": "*", "Divide by": "/"}
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


class ToyTask:
    """Answer checking and exact step verification for toy problems (no dependency on labeling/).

    Because the toy world has a unique reference chain, it also gives ground-truth process labels
    (`first_error_step`), against which Monte-Carlo labels and PRM scores can be checked.
    """

    @staticmethod
    def extract_answer(solution_text: str) -> int | None:
        """The integer in the last \\boxed{...}, or None if there is none or it is not an integer."""
        boxes = _BOXED_RE.findall(solution_text)
        if not boxes:
            return None
        content = boxes[-1].strip()
        return int(content) if re.fullmatch(r"-?\d+", content) else None

    @staticmethod
    def check(solution_text: str, answer: int | str) -> bool:
        """Exact integer match of the last boxed answer against `answer`."""
        got = ToyTask.extract_answer(solution_text)
        return got is not None and got == int(str(answer).strip())

    @staticmethod
    def parse_problem(problem: str) -> tuple[int, list[tuple[str, int]]]:
        """(start, [(op, operand), ...]) of a toy problem text; ValueError naming the text otherwise."""
        m = _PROBLEM_RE.match(problem.strip())
        if not m:
            raise ValueError(f"not a toy problem text: {problem!r}")
        return int(m.group(1)), [(_WORD_OPS[w], int(b)) for w, b in _OP_RE.findall(m.group(2))]

    @staticmethod
    def parse_step(line: str) -> tuple[int, str, int, int] | None:
        """(a, op, b, c) of a computation line 'a op b = c', or None if the line is not one."""
        m = _STEP_RE.match(line)
        return (int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))) if m else None

    @staticmethod
    def first_error_step(problem: str, solution_text: str) -> int:
        """Index of the first solution line (steps = non-empty lines) that differs, ignoring whitespace,
        from the reference line at that position; -1 if none does (a correct but unfinished prefix
        counts as error-free, as in ProcessBench's labels)."""
        start, ops = ToyTask.parse_problem(problem)
        reference = render(start, ops)["solution"].split("\n")
        steps = [s for s in solution_text.split("\n") if s.strip()]
        for i, step in enumerate(steps):
            if i >= len(reference) or "".join(step.split()) != "".join(reference[i].split()):
                return i
        return -1
