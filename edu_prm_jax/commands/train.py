"""`edu-prm train`: PRM training on labelled steps; exports the final PRM to <workdir>/prm/hf."""

from __future__ import annotations

import json
import pathlib

import ml_collections
from absl import logging

from edu_prm_jax import parallel
from edu_prm_jax.commands.common.builders import build_prm, check_trainable, make_trainer
from edu_prm_jax.commands.common.paths import prm_dir, tokenizer_source, train_finished, train_started
from edu_prm_jax.io import storage
from edu_prm_jax.io.atomic import write_json_atomic
from edu_prm_jax.io.shards import check_fingerprint, content_digest
from edu_prm_jax.models.checkpoints import tokenizer_files
from edu_prm_jax.models.prm import save_prm
from edu_prm_jax.training.loop import PreemptedError, preemptible
from edu_prm_jax.training.prm_train import PackedStream, load_label_records, make_eval_fn, split_records, to_examples

DESCRIPTION = "Train a PRM (policy backbone + reward head) on MC-labelled steps; Orbax checkpoints, resume."


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    labels_dir = storage.as_path(config.labels) if config.labels else workdir / "labels"
    export_dir = prm_dir(workdir)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = parallel.rules_from_config(config.mesh.rules)
    label_files = sorted(labels_dir.glob("steps-*.jsonl"))
    check_trainable(config)
    # the input is read and validated before the workdir is bound to it, so a run that fails here (no labels
    # yet, a bad shard) leaves no fingerprint that would refuse the corrected run
    records = load_label_records(labels_dir)
    check_fingerprint(workdir / "prm", {  # a resumed run must train on the same data (by content) and model
        "labels": str(storage.resolved(labels_dir)), "label_shards": content_digest(label_files),
        **{k: config[k] for k in ("policy", "init_prm", "head", "separator", "seq_len", "rows", "seed",
                                  "eval_fraction")},
        **{k: config[k] for k, default in (("supervise", "step_end"), ("expand_layers", 0), ("trainable", "all"),
                                           ("accum_steps", 1), ("clip_norm", 1.0))
           if config[k] != default}},  # runs written before these options existed still resume
        has_outputs=lambda: train_started(workdir))
    if (done := train_finished(workdir)) is not None and done >= config.steps:
        # finished: redoing eval and export would only lose its training metrics
        logging.info("train: finished earlier at step %d (%s); nothing to do", done, workdir / "prm")
        return
    with preemptible("train"):  # SIGTERM while the model loads, the optimizer state is built or during export
        train_records, held = split_records(records, config.eval_fraction)
        prm = build_prm(config, mesh, rules)
        train_ex = to_examples(train_records, prm, config.seq_len, config.supervise)
        eval_kept = [(ex, r.get("question_id", i)) for i, r in enumerate(held)  # metrics read step ends, like scoring
                     for ex in to_examples([r], prm, config.seq_len)]
        eval_ex = [ex for ex, _ in eval_kept]
        dropped = len(train_records) + len(held) - len(train_ex) - len(eval_ex)
        logging.info("PRM data: %d train / %d eval solutions (%d longer than seq_len=%d dropped)", len(train_ex),
                     len(eval_ex), dropped, config.seq_len)
        stream = PackedStream(train_ex, config.seq_len, config.rows, config.seed)
        eval_fn = make_eval_fn(eval_ex, config.rows, config.pos_weight,
                               groups=[question for _, question in eval_kept])
        trainer = make_trainer(config, workdir, prm, eval_fn, mesh, rules)
        try:
            metrics = trainer.train(stream)
        finally:
            trainer.close()
        if metrics.get("preempted"):  # stops a pipeline too: no later stage may read a half-trained PRM
            raise PreemptedError(f"stopped by SIGTERM at step {trainer.step} of {config.steps}, checkpoint saved; "
                                 "rerun with the same --workdir to resume")
        # the run's own export (replaced on rerun); scoring needs the policy's tokenizer beside it
        save_prm(trainer.model, export_dir, overwrite=True, copy_files=tokenizer_files(tokenizer_source(config)))
        summary = {"train_solutions": len(train_ex), "eval_solutions": len(eval_ex), "dropped_too_long": dropped,
                   **metrics}
        write_json_atomic(workdir / "prm" / "train_summary.json", summary)
    logging.info("PRM exported to %s\n%s", export_dir, json.dumps(summary, indent=2))
