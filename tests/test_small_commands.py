"""`edu-prm score` and `edu-prm prepare-data` on small inputs, including bad input that must stop cleanly."""

import json

import jax.numpy as jnp
import numpy as np
from tiny_policy import make_tiny_policy

from edu_prm_jax import cli
from edu_prm_jax.io.tfds import open_tfds_source
from edu_prm_jax.models.checkpoints import load_hf_model
from edu_prm_jax.models.prm import PRM, save_prm
from edu_prm_jax.scoring.examples import build_example, score_examples
from edu_prm_jax.tokenization import load_tokenizer


def test_score_matches_direct_scoring_and_rejects_bad_lines(tmp_path):
    policy = make_tiny_policy(tmp_path / "policy")
    prm = PRM.from_policy(load_hf_model(policy), head="scalar", seed=3)
    save_prm(prm, tmp_path / "prm")
    rows = [{"id": "a", "problem": "Start with 3. Add 4. What is the result?", "steps": ["3 + 4 = 7", "\\boxed{7}"]},
            {"id": "b", "prompt": "Question: 2\nAnswer:\n", "steps": ["2 * 3 = 6"]}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    argv = ["score", f"--workdir={tmp_path}", f"--config.prm={tmp_path / 'prm'}", f"--config.tokenizer={policy}",
            f"--config.input={src}", f"--config.output={out}"]
    assert cli.main(argv) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(g["step_scores"]) for g in got] == [2, 1]
    tok = load_tokenizer(policy)  # independent path: build the inputs by hand and score them directly
    ex = build_example({"prompt_ids": tok.encode(tok.apply_chat_template(rows[0]["problem"])),
                        "step_ids": [tok.encode("3 + 4 = 7\n"), tok.encode("\\boxed{7}")], "labels": [0, 0]},
                       head="scalar")
    np.testing.assert_allclose(got[0]["step_scores"], score_examples(prm, [ex])[0], atol=1e-6)
    # and independently of the scoring helper: one plain forward, sigmoid at the hand-counted step ends
    n_prompt, n_step0, n_step1 = (len(tok.encode(tok.apply_chat_template(rows[0]["problem"]))),
                                  len(tok.encode("3 + 4 = 7\n")), len(tok.encode("\\boxed{7}")))
    ends = [n_prompt + n_step0 - 1, n_prompt + n_step0 + n_step1 - 1]
    assert ex.step_ends.tolist() == ends
    plain = 1.0 / (1.0 + np.exp(-np.asarray(prm(jnp.asarray(ex.tokens[None])), np.float64)[0, ends]))
    np.testing.assert_allclose(got[0]["step_scores"], plain, atol=1e-5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"id": "c", "problem": "x", "steps": []}) + "\n")
    argv[-2:] = [f"--config.input={bad}", f"--config.output={tmp_path / 'bad_out.jsonl'}"]
    assert cli.main(argv) != 0
    assert not (tmp_path / "bad_out.jsonl").exists()


def test_prepare_data_processbench(tmp_path, shared_data):
    argv = ["prepare-data", f"--workdir={tmp_path}", f"--config.source={shared_data / 'processbench' / 'gsm8k.json'}"]
    assert cli.main(argv) == 0
    ds = open_tfds_source(tmp_path / "tfds", "processbench_gsm8k", "train")
    assert len(ds) == 400
