"""Sampling: the jitted HT / EDU / greedy rollout loop (`decode`) and its host-side driver (`Sampler`)."""

from edu_prm_jax.sampling.decode import DecodeParams, Tables, decode
from edu_prm_jax.sampling.engine import Leaf, Sampler, Tree, distinct_tokens

__all__ = ["DecodeParams", "Leaf", "Sampler", "Tables", "Tree", "decode", "distinct_tokens"]
