"""Peak host memory of `edu-prm export`: parameters-only partial restore vs rebuilding the whole Trainer.

    python -m benchmarks.export_memory [--hidden 768 --layers 12 --vocab 32000 --inter 2048]

Builds a training workdir for a random Qwen2 PRM (default ~100M parameters: hidden 768, 12 layers, vocab 32000)
whose checkpoint is written by the project's own Trainer (params + AdamW moments, the layout `edu-prm train`
saves), then exports it twice, each in a fresh subprocess that reports its RSS after the imports and its peak
RSS during the export (VmRSS, VmHWM reset after the imports):

- `trainer`: what `edu-prm export` did before it restored parameters alone (`export_via_trainer` below): build
  the PRM from the policy's weights, a whole Trainer (optimizer state included), restore the full train state;
- `partial`: the `edu-prm export` command as it is now (abstract PRM, partial Orbax restore of the params).

Both exports must be bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks.model_args import add_model_args  # noqa: E402


def _proc_status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB. Not ru_maxrss: a child exec'd from a large parent reports at least
    the parent's peak there (Linux carries it across fork + exec), which would hide the export's own peak."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak_rss() -> None:
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def export_via_trainer(workdir: pathlib.Path, out: pathlib.Path) -> None:
    """The export before parameters-only restore: a whole Trainer (PRM built from the policy's weights, AdamW
    state, the train state restored in full) just to write the parameters."""
    import ml_collections

    from edu_prm_jax import parallel
    from edu_prm_jax.commands.common.builders import build_prm, make_trainer
    from edu_prm_jax.commands.common.paths import tokenizer_source
    from edu_prm_jax.models.checkpoints import tokenizer_files
    from edu_prm_jax.models.prm import save_prm

    train_cfg = ml_collections.ConfigDict(json.loads((workdir / "train_config.json").read_text()))
    mesh = parallel.make_mesh(train_cfg.mesh.data, train_cfg.mesh.fsdp, train_cfg.mesh.tensor)
    trainer = make_trainer(train_cfg, workdir, build_prm(train_cfg, mesh), None, mesh)
    try:
        ckpt = trainer.checkpointer
        trainer.state, _, _ = ckpt.restore(ckpt.latest_step(), trainer.state)
        save_prm(trainer.model, out, dtype="float32", overwrite=True,
                 copy_files=tokenizer_files(tokenizer_source(train_cfg)))
    finally:
        trainer.close()


def child(mode: str, workdir: pathlib.Path, out: pathlib.Path) -> None:
    """Run one export (or only the imports) in this process and print its peak RSS as the last line."""
    import jax

    from edu_prm_jax import cli
    from edu_prm_jax.commands.common import builders  # noqa: F401 - the imports both exports pay

    jax.devices()  # the backend's own memory, paid by both exports before they read anything
    after_imports = _proc_status_mb("VmRSS")
    _reset_peak_rss()
    t = time.perf_counter()
    if mode == "trainer":
        export_via_trainer(workdir, out)
    elif mode == "partial":
        if cli.main(["export", f"--workdir={workdir}", "--config.which=latest", f"--config.output={out}",
                     "--config.overwrite=True", "--log_level=warning"]) != 0:
            raise SystemExit("edu-prm export failed")
    print(json.dumps({"after_imports_mb": after_imports, "peak_rss_mb": _proc_status_mb("VmHWM"),
                      "seconds": time.perf_counter() - t}))


def make_workdir(args: argparse.Namespace, workdir: pathlib.Path) -> int:
    """A policy in HF format, the train config `edu-prm train` would leave, and one Trainer checkpoint."""
    from flax import nnx

    from edu_prm_jax import config_utils, parallel
    from edu_prm_jax.commands.common.builders import build_prm, make_trainer
    from edu_prm_jax.configs import train as train_configs
    from edu_prm_jax.models.checkpoints import flat_params, save_hf_model
    from edu_prm_jax.models.config import Qwen2Config
    from edu_prm_jax.models.qwen2 import Qwen2

    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads, rope_theta=10000.0,
                      tie_word_embeddings=True, torch_dtype="float32")
    save_hf_model(Qwen2(cfg, nnx.Rngs(args.seed)), workdir / "policy")
    config = train_configs.get_config()
    config.policy = str(workdir / "policy")
    config.steps = 1
    config_utils.write_config_json(config, workdir / "train_config.json")
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    prm = build_prm(config, mesh)
    n_params = sum(v.size for v in flat_params(nnx.state(prm)).values())
    trainer = make_trainer(config, workdir, prm, None, mesh)
    try:
        trainer.step = 1
        trainer.save(data=None)  # the train state as `edu-prm train` checkpoints it: params + AdamW moments
    finally:
        trainer.close()
    return n_params


def measure(mode: str, workdir: pathlib.Path, out: pathlib.Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.export_memory", "--child", mode,
                           f"--workdir={workdir}", f"--out={out}"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} export failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, vocab=32000, hidden=768, layers=12, heads=12, kv_heads=2, inter=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["trainer", "partial"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=pathlib.Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=pathlib.Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.workdir, args.out)
        return
    with tempfile.TemporaryDirectory(prefix="export_memory_") as tmp:
        workdir = pathlib.Path(tmp) / "w"
        n_params = make_workdir(args, workdir)
        results = {mode: measure(mode, workdir, pathlib.Path(tmp) / mode) for mode in ("trainer", "partial")}
        from edu_prm_jax.models.safetensors_io import SafetensorsFile

        a, b = (SafetensorsFile(pathlib.Path(tmp) / mode / "model.safetensors") for mode in ("trainer", "partial"))
        assert sorted(a.keys()) == sorted(b.keys()) and all((a.array(k) == b.array(k)).all() for k in a.keys()), \
            "the two exports differ"
    params_mb = n_params * 4 / 2**20
    print(f"PRM: {n_params / 1e6:.1f}M parameters ({params_mb:.0f} MiB in float32; AdamW state 2x that); "
          f"hidden={args.hidden} layers={args.layers} vocab={args.vocab}; exports bitwise equal")
    print(f"{'export':<36}{'RSS after imports':>18}{'peak RSS':>10}{'peak - imports':>16}{'seconds':>9}  (MiB)")
    for mode, label in (("trainer", "whole Trainer (before)"), ("partial", "params-only partial restore (now)")):
        r = results[mode]
        print(f"{label:<36}{r['after_imports_mb']:>18.0f}{r['peak_rss_mb']:>10.0f}"
              f"{r['peak_rss_mb'] - r['after_imports_mb']:>16.0f}{r['seconds']:>9.1f}")
    before, now = results["trainer"], results["partial"]
    print(f"ratio before/now: {before['peak_rss_mb'] / now['peak_rss_mb']:.2f} (peak RSS), "
          f"{(before['peak_rss_mb'] - before['after_imports_mb']) / (now['peak_rss_mb'] - now['after_imports_mb']):.2f}"
          f" (peak above the RSS after imports), in units of the float32 parameters: "
          f"{(before['peak_rss_mb'] - before['after_imports_mb']) / params_mb:.1f} vs "
          f"{(now['peak_rss_mb'] - now['after_imports_mb']) / params_mb:.1f}")


if __name__ == "__main__":
    main()
