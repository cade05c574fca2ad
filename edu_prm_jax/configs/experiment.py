"""`edu-prm experiment`: label cost vs PRM quality for EDU, Math-Shepherd and OmegaPRM labels on the toy world.

Examples:
  edu-prm experiment --workdir=runs/experiment                              # the labellers, 3 seeds
  edu-prm experiment --config=configs/experiment.py:paper --workdir=runs/paper  # + budgets, ablations, MCTS
  edu-prm experiment --config.seeds=0 --config.train_questions=toy:train:128 --workdir=runs/quick

For one set of training questions each labeller's labels train a PRM with the same recipe (`train`), and each
PRM is scored on toy-processbench (exact first-error truth) and by Best-of-N on toy test questions. Every run is
a workdir under <workdir>/runs/ and resumes as its commands do. `ablations` lists variants of the EDU labeller,
each `name:field=value[,field=value]` over this config's `edu.*` fields, e.g. `tau0.25:sampling.tau=0.25`.
"""

from __future__ import annotations

import ml_collections

from edu_prm_jax.configs import common
from edu_prm_jax.configs import train as train_config

# The paper's ambiguities, as variants of the EDU labeller (edu.* fields): tau in nats and in bits (1 bit =
# ln 2 nats: the paper's tau = 1 read as bits), K, the symbol set, the threshold rule and the label target.
PAPER_ABLATIONS = ";".join([
    "tau0.25:sampling.tau=0.25", "tau1.0:sampling.tau=1.0", "tau2.0:sampling.tau=2.0",
    "tau1bit:sampling.tau=0.69315", "K3:sampling.branch_k=3", "no-symbols:sampling.disable_symbols=True",
    "budget-threshold:sampling.threshold_mode=budget", "hard-labels:target=hard",
])


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """`configs/experiment.py:paper` adds matched budgets, the ablations and MCTS-EDU to the default table."""
    config = ml_collections.ConfigDict()
    config.policy = "toy"  # Policy that every labeller samples from (and the PRM's backbone): 'toy' or a dir.
    config.dtype = "float32"  # Compute dtype of every stage.
    config.train_questions = "toy:train:256"  # Questions whose labels train the PRMs: toy:<split>:<n> or a JSONL.
    config.test_questions = "toy:test:64"  # Best-of-N questions (held out from training by the toy split).
    config.seeds = "0,1,2"  # Seeds: label sampling, PRM initialisation and data order, Best-of-N HT samples.
    config.labellers = "edu,shepherd,omega"  # Labellers compared at equal questions (edu, shepherd, omega).
    config.matched_budget = False  # Also run each baseline at EDU's token cost and EDU at each baseline's.
    config.ablations = ""  # EDU variants 'name:field=value[,field=value]' separated by ';' (edu.* fields).
    config.mcts = False  # Also run MCTS-EDU with each seed's EDU PRM at the token budgets of EDU/HT Best-of-N.
    config.mcts_n = "4,16"  # MCTS-EDU budgets: the tokens HT and EDU Best-of-N spent at these N (of n_grid).
    config.mcts_c = 1.0  # MCTS-EDU exploration constant c of UCT = Q + c * sqrt(ln N_parent / N_child).
    config.edu = ml_collections.ConfigDict()  # The EDU labeller: EDU trees of the questions, tree MC labels.
    config.edu.sampling = common.sampling_config("edu")  # EDU sampler (the pipeline's toy settings).
    config.edu.sampling.tau = 0.5  # Anchor entropy threshold (nats).
    config.edu.target = "edu"  # Label target: edu (v), hard (1[v > 0]) or soft (v).
    config.shepherd = ml_collections.ConfigDict()  # Math-Shepherd: HT solutions, k completions per line step.
    config.shepherd.solutions = 4  # HT solutions per question that get step labels.
    config.shepherd.shepherd_k = 8  # Completions per line-step prefix.
    config.shepherd.temperature = 0.7  # Temperature of the solutions and the completions.
    config.shepherd.target = "hard"  # Math-Shepherd's hard estimate 1[v > 0].
    config.omega = ml_collections.ConfigDict()  # OmegaPRM (OpenR's defaults; labeling/omega.py).
    config.omega.temperature = 0.7  # Temperature of the rollouts.
    config.omega.target = "soft"  # OmegaPRM trains on the MC values (soft labels).
    config.max_new_tokens = 96  # Generation cap of every sampled solution and rollout.
    config.train = train_config.get_config()  # The PRM recipe, the same for every labeller.
    config.train.steps = 150
    config.train.rows = 8
    config.train.learning_rate = 3e-4
    config.train.eval_every = 0
    config.train.checkpoint_every = 0
    config.n_grid = "4,16,64"  # Best-of-N sizes (EDU leaf budget M = N).
    config.ht_temperature = 0.7  # Temperature of the HT Best-of-N candidates.
    config.toy_processbench_n = 100  # toy-processbench items per subset (half erroneous, half all-correct).
    config.tune_subset = "corrupted"  # toy-processbench subset the tuned theta is chosen on (policy, corrupted).
    config.prune_grid = ""  # P-EDU prune thresholds swept with each seed's EDU PRM (e.g. 0.1,0.2,0.3); empty = off.
    config.batch_questions = 16  # Questions decoded together by every sampler.
    if preset == "paper":
        config.matched_budget = True
        config.ablations = PAPER_ABLATIONS
        config.mcts = True
        config.prune_grid = "0.1,0.2,0.3"
    elif preset is not None:
        raise ValueError(f"configs/experiment.py:{preset}: unknown preset (choose 'paper')")
    return config
