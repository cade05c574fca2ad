"""`benchmarks/accelerator.py` (the prepared accelerator check) runs end to end at its tiny shape on the CPU, and
its derived figures follow from hand counts: the bytes a decode step reads, tokens per second, and MFU and the
roofline share once the chip is known."""

import json

import pytest

from benchmarks import accelerator
from edu_prm_jax.planning import hardware


def test_tiny_run_and_its_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(accelerator, "environment", lambda: {
        "backend": "cpu", "device_kind": "test", "devices": 1, "jax": "-", "chip": "H100", "date": "-",
        "load_1m": 0.0, "peak_flops": hardware.H100.peak_flops, "hbm_bandwidth": hardware.H100.hbm_bandwidth})
    out = tmp_path / "acc.json"
    assert accelerator.main(["--shapes", "tiny", "--prompt-len", "16", "--decode-batches", "2", "--new-tokens", "8",
                             "--train-rows", "2", "--train-len", "32", "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["shapes"]["tiny"]
    # tiny: vocab 512, hidden 64, 2 layers, 4 heads x 16, 2 kv heads, mlp 128, tied embedding, bf16 weights
    per_layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    weights = 2 * (512 * 64 + 2 * per_layer + 64)
    d = r["decode"][0]
    kv = 2 * 2 * 2 * (16 + 8 / 2) * 2 * 16 * 2  # k+v x layers x rows x mean cache x kv heads x head_dim x 2 B
    assert d["bytes_per_step"] == weights + kv
    assert d["tokens_per_s"] == pytest.approx(2 * 8 / d["median_s"])
    step_s = d["median_s"] / 8
    assert d["hbm_roofline_share"] == pytest.approx((weights + kv) / hardware.H100.hbm_bandwidth / step_s)
    t = r["train"]
    n = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # q, o (64 x 64) + k, v (64 x 32) + gate, up, down
    flops = 6 * n + 12 * 2 * 4 * 16 * 32
    assert t["mfu"] == pytest.approx(t["tokens_per_s"] * flops / hardware.H100.peak_flops)
    assert 0 < r["prefill"]["mfu"] < 1


def test_device_kinds_name_chips():
    assert hardware.chip_of_device_kind("NVIDIA H200") is hardware.H200
    assert hardware.chip_of_device_kind("TPU v5 lite") is hardware.TPU_V5E
    assert hardware.chip_of_device_kind("NVIDIA H100 80GB HBM3") is hardware.H100
    assert hardware.chip_of_device_kind("cpu") is None
