#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check`): on a CUDA machine, in under 10 minutes,
#   1. an environment: .venv if its torch sees CUDA; else .venv-gpu on top of the machine's CUDA torch
#      (python3 -m venv --system-site-packages), the project installed into it; flash-attn if it builds
#      (WHEELS=dir: install from carried wheels only, for machines without a package index);
#   2. the `gpu`-marked tests (every attention backend in bf16/fp32 forward+backward vs the reference,
#      a 2-GPU NCCL DeepSpeed step, the engine vs HF generate), 2. the GPU benchmarks (attention
#      backends, engine decode on a Qwen3-0.6B-shaped random model, TaH2 M=2 decode against its 1/d̄
#      limit on the small and medium models (#15's target), train step);
#   3. one table: each step, its status and seconds; the benchmark tables follow it under gpu-check/.
# Without CUDA it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
mkdir -p "$OUT"
PY=.venv/bin/python

have_cuda() { "$1" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

if ! have_cuda "$PY"; then
  BASE=$(command -v python3)
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! have_cuda "$BASE"; then
    echo "gpu-check: no CUDA GPU visible here (nvidia-smi / torch.cuda): nothing to check."
    exit 0
  fi
  PY=.venv-gpu/bin/python
  if [ ! -x "$PY" ]; then
    "$BASE" -m venv --system-site-packages .venv-gpu || exit 1
  fi
  # keep the machine's CUDA torch: install the project and what it lacks, never torch itself
  PIPARGS=(-q --upgrade-strategy only-if-needed)
  [ -n "${WHEELS:-}" ] && PIPARGS+=(--no-index --find-links "$WHEELS")
  "$PY" -m pip install "${PIPARGS[@]}" -e ".[dev]" "torch==$("$BASE" -c 'import torch; print(torch.__version__.split("+")[0])')" \
    > "$OUT/install.log" 2>&1 || { echo "gpu-check: install failed, see $OUT/install.log"; exit 1; }
fi
"$PY" -c 'import flash_attn' 2>/dev/null || timeout 300 "$PY" -m pip install -q flash-attn --no-build-isolation \
  > "$OUT/flash-attn.log" 2>&1 || echo "gpu-check: flash-attn did not install (see $OUT/flash-attn.log): flex / sdpa only"

declare -a ROWS
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok; [ $rc -ne 0 ] && status="FAILED ($rc)"; [ $rc -eq 124 ] && status="timed out"
  ROWS+=("| $name | $status | $((SECONDS - t0)) | $OUT/$name.log |")
}
"$PY" -c 'import torch; print("gpu-check:", torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "torch", torch.__version__)'
step tests 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
step bench-attention 120 "$PY" bench/attention.py --seqlens 1024 4096 --repeats 3
step bench-engine 150 "$PY" bench/engine.py --size qwen3-0.6b --batches 1 32 --repeats 3
step bench-tah2-decode 90 "$PY" bench/tah2_decode.py --sizes small medium --batches 1 32 --repeats 2
step bench-train-step 90 "$PY" bench/train_step.py
echo
echo "| step | status | seconds | log |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
for f in tests bench-attention bench-engine bench-tah2-decode bench-train-step; do
  echo "## $f"; grep -E '^\||passed|failed|skipped|error' "$OUT/$f.log" | tail -40; echo
done
