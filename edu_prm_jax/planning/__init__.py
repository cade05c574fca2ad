"""Compile-only planning: the library's programs compiled for a TPU slice or GPU host on a CPU, with their memory,
FLOPs and a step-time bound (`edu-prm plan`). Needs the `[plan]` extra (libtpu) or `[plan-cuda]`; nothing here
runs on an accelerator.

- `hardware`: chips (documented peak FLOP/s, HBM size and bandwidth) and named slices;
- `devices`: a target's compile-only devices (and what to install when its compiler is missing);
- `programs`: the train step, decode loop and scoring forward on abstract inputs, with analytic FLOPs;
- `compiler`: compile one for a target -> `ProgramPlan` (fits or not, HBM, FLOPs, bound), depth extrapolation;
- `search`: the largest batch / slot count, the smallest slice that fits;
- `report`: the table and JSON; `architectures`: model shapes by name (no weights needed).
"""
