"""Sampling: the jitted HT / EDU / greedy rollout loop (`decode`; the program itself: `decode_fn`) and its
host-side driver (`Sampler`)."""

from edu_prm_jax.sampling.decode import DecodeParams, Tables, decode, decode_fn, decode_in_shardings, split_params
from edu_prm_jax.sampling.engine import Leaf, Sampler, Tree, distinct_tokens

__all__ = ["DecodeParams", "Leaf", "Sampler", "Tables", "Tree", "decode", "decode_fn", "decode_in_shardings",
           "distinct_tokens", "split_params"]
