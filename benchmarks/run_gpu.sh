#!/usr/bin/env bash
# jbnn's GPU benchmarks in one command, for a time-limited GPU machine without network.
#
# Usage (repository root, on the GPU machine):
#   bash benchmarks/run_gpu.sh [LOG_DIR]      # LOG_DIR defaults to $OUT, else ./gpu-logs
#
# If a folder .whl holds wheels (captum and ml_collections: the GPU image lacks them;
# see benchmarks/results/*/README.md), they are installed into /tmp/site first. Each
# step has its own time limit, so that a slow step cannot take the later ones with it,
# and writes its log as it goes; the limits add up to under 9.5 minutes (one call of a
# 15-minute device lease, the machine's start included). The steps, most needed first:
#   0_env.log           versions, the card, and a bf16 8192^3 matrix product through
#                       PyTorch (the ceiling actually reached on this card)
#   1_saliency_twin.log SmoothGrad against Captum, twin, float32 and bfloat16, with the
#                       per-copy stem gradient (no split input layer), the kernels
#                       taken once (explain_dataset's form) and those with the
#                       BatchNorms folded as A/B contestants
#   2_train_step.log    training step, BNN against twin, 224 px ImageNet stem (the
#                       model furthest from its target first: a timeout cuts the last)
#   3_saliency_bnn.log  the same as 1 for the BNN (kernels quantized once, and folded)
#   4_profile_twin.log  where the twin's float32 SmoothGrad call spends its time
set -u
LOG=${1:-${OUT:-gpu-logs}}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u
  git log --oneline -1 2>/dev/null || true
  git status --short 2>/dev/null | head -20 || true
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv || true
  python3 -c "import jax, flax, optax, torch, captum; print(jax.__version__, flax.__version__, optax.__version__, torch.__version__, captum.__version__, jax.devices())"
  timeout 60 python3 - <<'PY' || true
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    a @ b
torch.cuda.synchronize()
dt = (time.perf_counter() - t) / 10
print(f"bf16 8192^3 matmul (torch, random data): {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
PY
} >"$LOG/0_env.log" 2>&1
cat "$LOG/0_env.log"

step() {  # step SECONDS LOGNAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$LOG/$name" 2>&1
  echo "   rc $? after $((SECONDS - start)) s"
  grep -v "Delay kernel timed out" "$LOG/$name" | tail -25
}

step 230 1_saliency_twin.log python3 benchmarks/saliency_gpu.py --variants twin \
  --ab no-split,frozen,frozen-fold --rounds 5
step 100 2_train_step.log python3 benchmarks/train_step.py --size 224 --stem imagenet \
  --batch 64 --width 1.0 --num-classes 1000 --models xnornet,quicknet_small,birealnet18 \
  --rounds 5
step 150 3_saliency_bnn.log python3 benchmarks/saliency_gpu.py --variants bnn \
  --ab frozen,frozen-fold --rounds 5
step 60 4_profile_twin.log python3 benchmarks/profile_gpu.py --variants twin \
  --dtype float32 --top 20
