"""A PRM head is one registry entry: a head defined and registered here, outside the package, builds, trains,
scores, exports under its own HF names and reloads, with both step layouts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from tiny_policy import make_tiny_policy

from edu_prm_jax import parallel
from edu_prm_jax.commands.common.builders import build_prm
from edu_prm_jax.configs import train as train_configs
from edu_prm_jax.models.config import ConfigError, Qwen2Config
from edu_prm_jax.models.heads import HeadSpec, StepLayout, get_head, head_compute_cfg, head_names, register_head
from edu_prm_jax.models.prm import PRM, load_prm, prm_loss, save_prm
from edu_prm_jax.models.qwen2 import Dense
from edu_prm_jax.scoring.examples import PRMDataError, build_examples, encode_solution, score_solutions
from edu_prm_jax.tokenization import load_tokenizer
from edu_prm_jax.training.loop import TrainConfig, Trainer
from edu_prm_jax.training.optim import OptimConfig
from edu_prm_jax.training.prm_train import PackedStream

WIDTH = 16


class ToyMLPHead(nnx.Module):
    """Linear(h, 16) - tanh - Linear(16, 1): a head the package has never heard of."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.fc1 = Dense(cfg.hidden_size, WIDTH, ("embed", "mlp"), bias=True, cfg=head_compute_cfg(cfg), rngs=rngs)
        self.fc2 = Dense(WIDTH, 1, ("mlp", "head_out"), bias=True, cfg=head_compute_cfg(cfg), rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.fc2(jnp.tanh(self.fc1(hidden.astype(jnp.float32))))[..., 0]


def _toy_spec(name: str, prefix: str, architecture: str, layout: StepLayout) -> HeadSpec:
    return HeadSpec(
        name=name,
        make=ToyMLPHead,
        tensors={f"{prefix}.fc1.weight": ("fc1.kernel", True), f"{prefix}.fc1.bias": ("fc1.bias", False),
                 f"{prefix}.fc2.weight": ("fc2.kernel", True), f"{prefix}.fc2.bias": ("fc2.bias", False)},
        architecture=architecture,
        step_layout=layout,
        hf_config={"toy_head_width": WIDTH},
    )


# Registered at import (registering the same spec again is a no-op, so a re-import is harmless).
TOY_LAST_TOKEN = register_head(_toy_spec("toy_mlp", "reward_mlp", "Qwen2ForToyMLPReward", StepLayout.LAST_TOKEN))
TOY_SEPARATOR = register_head(
    _toy_spec("toy_mlp_sep", "reward_mlp_sep", "Qwen2ForToyMLPSepReward", StepLayout.SEPARATOR_AFTER))
SEPARATOR_TEXT = "<|im_end|>"  # one piece in the toy tokenizer, never inside a step

ITEMS = [
    ("Start with 3. Add 4. What is the result?\n", ["3 + 4 = 7\n", "The result is 7.\n"]),
    ("Start with 5. Multiply by 2.\n", ["5 * 2 = 10\n", "10\n", "\\boxed{10}"]),
]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("policy"))


def _records(tokenizer, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        a, b = rng.integers(1, 9, 2)
        steps = [f"{a} + {b} = {a + b}\n", f"The result is {a + b}.\n"]
        records.append({"id": f"r{i}", "prompt_ids": tokenizer.encode(f"Start with {a}. Add {b}.\n"),
                        "step_ids": [tokenizer.encode(s) for s in steps], "labels": [1.0, float(i % 2)]})
    return records


@pytest.mark.parametrize("spec", [TOY_LAST_TOKEN, TOY_SEPARATOR], ids=lambda s: s.name)
def test_a_head_registered_outside_the_package_trains_scores_exports_and_reloads(tmp_path, policy_dir, spec):
    tokenizer = load_tokenizer(policy_dir)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    config = train_configs.get_config()
    config.update({"policy": str(policy_dir), "head": spec.name, "separator": SEPARATOR_TEXT, "seed": 1})
    prm = build_prm(config, mesh)  # the train command's own builder finds the head in the registry
    assert prm.head_spec is spec and isinstance(prm.head, ToyMLPHead)
    sep = tokenizer.encode(SEPARATOR_TEXT)[0]
    assert prm.separator_id == (sep if spec.inserts_separator else None)

    # the step layout: a separator after each step, or the step's own last token
    prompt, steps = ITEMS[0]
    ex = encode_solution(tokenizer, prompt, steps, head=spec.name, separator_id=prm.separator_id)
    lengths = [len(tokenizer.encode(prompt))] + [len(tokenizer.encode(s)) + spec.inserts_separator for s in steps]
    assert ex.step_ends.tolist() == (np.cumsum(lengths)[1:] - 1).tolist()
    assert (ex.tokens[ex.step_ends] == sep).all() == spec.inserts_separator
    assert (ex.tokens == sep).sum() == (len(steps) if spec.inserts_separator else 0)

    # train: the loss on a fixed batch falls, and only through the parameters the head owns and the backbone
    examples, stats = build_examples(_records(tokenizer, 16, seed=0), head=spec.name, separator_id=prm.separator_id)
    assert stats.examples == 16
    batch = next(PackedStream(examples, 64, 4, seed=0))
    before = np.asarray(prm.head.fc1.kernel[...]).copy()
    trainer = Trainer(prm, prm_loss, OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=6),
                      TrainConfig(steps=6, progress=False, tensorboard=False, async_checkpointing=False),
                      tmp_path / "work", mesh=mesh)
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(6)]
    trained = trainer.model
    trainer.close()
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert not np.array_equal(np.asarray(trained.head.fc1.kernel[...]), before)

    # score: score_solutions reads sigmoid(logit) at the layout's step ends
    scores = score_solutions(trained, tokenizer, ITEMS)
    assert [len(s) for s in scores] == [len(steps) for _, steps in ITEMS]
    plain = jax.nn.sigmoid(trained(jnp.asarray(ex.tokens[None])))[0]
    np.testing.assert_allclose(scores[0], np.asarray(plain)[ex.step_ends], atol=1e-6)

    # export: the head's own tensor names and config fields; the backbone as in Qwen2ForCausalLM
    save_prm(trained, tmp_path / "hf", dtype="float32")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {n for n in tensors if not n.startswith("model.")} == set(spec.tensors)
    fc1 = next(n for n in spec.tensors if n.endswith("fc1.weight"))
    np.testing.assert_array_equal(tensors[fc1], np.asarray(trained.head.fc1.kernel[...]).T)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert raw["architectures"] == [spec.architecture] and raw["edu_prm_head"] == spec.name
    assert raw["toy_head_width"] == WIDTH and raw.get("edu_prm_separator_id") == prm.separator_id

    # reload: the same head, bit-identical parameters, the same scores
    again = load_prm(tmp_path / "hf")
    assert again.head_spec is spec and again.separator_id == prm.separator_id
    assert score_solutions(again, tokenizer, ITEMS) == scores

    # a checkpoint without our config field is recognised by its architecture, then by its tensor names
    for drop in ("edu_prm_head", "architectures"):
        raw.pop(drop)
        (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
        assert load_prm(tmp_path / "hf").head_spec is spec


def test_registry_names_its_heads_and_refuses_clashes(tmp_path):
    assert {"qwen_math", "scalar", "toy_mlp", "toy_mlp_sep"} <= set(head_names())
    assert get_head("qwen_math").inserts_separator and not get_head("scalar").inserts_separator
    with pytest.raises(ValueError, match=r"unknown PRM head 'nope'.*'qwen_math', 'scalar'.*register_head"):
        get_head("nope")
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="unknown PRM head 'nope'"):
        PRM(cfg, "nope", rngs=nnx.Rngs(0))
    assert register_head(TOY_LAST_TOKEN) is TOY_LAST_TOKEN  # the same spec again: a no-op
    with pytest.raises(ValueError, match="already registered as 'toy_mlp'"):
        register_head(_toy_spec("toy_mlp", "other", "Qwen2ForOther", StepLayout.LAST_TOKEN))
    with pytest.raises(ValueError, match="'Qwen2ForProcessRewardModel' already names head 'qwen_math'"):
        register_head(_toy_spec("another", "other", "Qwen2ForProcessRewardModel", StepLayout.LAST_TOKEN))
    assert "another" not in head_names()
    # a separator-inserting head without a separator id is refused where it would be needed
    prm = PRM(cfg, TOY_SEPARATOR.name, rngs=nnx.Rngs(0))
    with pytest.raises(PRMDataError, match="toy_mlp_sep head inserts a separator"):
        score_solutions(prm, None, [("p", ["s"])])
    # an export naming an unregistered head fails on its config field
    save_prm(PRM(cfg, "scalar", rngs=nnx.Rngs(0)), tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw | {"edu_prm_head": "nope"}))
    with pytest.raises(ConfigError, match="edu_prm_head.*unknown PRM head 'nope'"):
        load_prm(tmp_path / "hf")
