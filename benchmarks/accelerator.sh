#!/usr/bin/env bash
# The prepared accelerator check (README "Performance on accelerators"): on a machine with a GPU or TPU, run the
# numerics tests on the accelerator, then the prefill / decode / PRM train-step benchmarks at Qwen2.5 0.5B and
# 1.5B shapes (benchmarks/accelerator.py). Everything lands in $OUT (default: accelerator_out/): tests.log,
# accelerator.json, accelerator.md. About 10 minutes on one H100/H200-class GPU.
#
#   benchmarks/accelerator.sh                 # the platform JAX finds (cuda or tpu)
#   ALL_TESTS=1 benchmarks/accelerator.sh     # the whole suite instead of the numerics files (multi-device
#                                             # tests then need as many accelerators as they simulate: 8)
#   SKIP_TESTS=1 benchmarks/accelerator.sh    # benchmarks only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-accelerator_out}
mkdir -p "$OUT"
platform=$(python -c 'import jax; print(jax.default_backend())' 2>/dev/null)
if [[ "$platform" != "gpu" && "$platform" != "cuda" && "$platform" != "tpu" ]]; then
  echo "accelerator.sh: JAX sees no GPU or TPU here (default backend: ${platform:-none}); install jax[cuda12] or" \
       "jax[tpu] on the accelerator machine" >&2
  exit 2
fi
[[ "$platform" == "gpu" ]] && platform=cuda
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # several test workers share one accelerator
status=0
if [[ -z "${SKIP_TESTS:-}" ]]; then
  # the files whose numbers change with the backend: model vs transformers, attention kernels, scanned layers,
  # sampling, PRM loss/heads, bf16 training, the training loop, the planner's public programs
  tests=(tests/test_model.py tests/test_attention.py tests/test_scan_layers.py tests/test_sampling.py
         tests/test_prm.py tests/test_bf16_train.py tests/test_training_loop.py tests/test_relayout.py
         tests/test_expansion.py tests/test_dtypes.py tests/test_fast_kernels.py)
  [[ -n "${ALL_TESTS:-}" ]] && tests=(tests)
  echo "+ JAX_PLATFORMS=$platform python -m pytest -q -n ${WORKERS:-4} ${tests[*]}"
  JAX_PLATFORMS=$platform timeout "${TEST_TIMEOUT:-360}" python -m pytest -q -n "${WORKERS:-4}" "${tests[@]}" \
    2>&1 | tee "$OUT/tests.log" | tail -25
  status=${PIPESTATUS[0]}
fi
echo "+ python -m benchmarks.accelerator --json $OUT/accelerator.json"
JAX_PLATFORMS=$platform timeout "${BENCH_TIMEOUT:-300}" python -m benchmarks.accelerator \
  --json "$OUT/accelerator.json" "$@" | tee "$OUT/accelerator.md"
bench=${PIPESTATUS[0]}
[[ $status -ne 0 ]] && echo "accelerator.sh: tests failed (exit $status); see $OUT/tests.log" >&2
exit $(( status != 0 ? status : bench ))
