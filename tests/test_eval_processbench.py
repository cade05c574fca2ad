"""`edu-prm eval-processbench` on the real ProcessBench files with a tiny random PRM: harness exactness."""

import json

from tiny_policy import make_tiny_policy

from edu_prm_jax import cli
from edu_prm_jax.models.checkpoints import load_hf_model
from edu_prm_jax.models.prm import PRM, save_prm


def test_processbench_harness_on_real_files(tmp_path, shared_data):
    policy = make_tiny_policy(tmp_path / "policy")
    save_prm(PRM.from_policy(load_hf_model(policy), head="scalar", seed=2), tmp_path / "w" / "prm" / "hf")
    argv = ["eval-processbench", f"--workdir={tmp_path / 'w'}", f"--config.tokenizer={policy}",
            f"--config.data={shared_data / 'processbench'}", "--config.limit=24", "--config.max_tokens=512"]
    assert cli.main(argv) == 0
    res = json.loads((tmp_path / "w" / "processbench" / "results.json").read_text())
    assert res["items"] == {"gsm8k": 24, "math": 24, "olympiadbench": 24, "omnimath": 24}
    for name in ("fixed", "chosen", "best"):
        assert set(res[name]["subsets"]) == {"gsm8k", "math", "olympiadbench", "omnimath"}
    # the oracle threshold can only be at least as good as any fixed one
    assert res["best"]["average"]["f1"] >= res["fixed"]["average"]["f1"] - 1e-9
    # "always -1" gets every all-correct item and no erroneous one: F1 = 0 by the official formula
    assert res["trivial"]["always -1"]["average_f1"] == 0.0
    report = (tmp_path / "w" / "processbench" / "report.md").read_text()
    assert f"PRM: `{tmp_path / 'w' / 'prm' / 'hf'}`" in report  # the PRM's path, not a Python object
