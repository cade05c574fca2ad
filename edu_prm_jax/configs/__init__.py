"""The shipped configs: one file per command (`edu-prm <command>` loads `<command>.py` by default) plus the
model-scale setups (`qwen25_math_7b.py`, `qwen25_72b_prm_tpu.py`) and `common.py`'s shared pieces.

On the command line `--config=configs/<file>.py[:arg]` names one of these files from any directory (a file of
that name under the current directory wins); a user's own config imports the pieces it reuses as
`from edu_prm_jax.configs import common`. Config files import only ml_collections and each other.
"""
