#!/usr/bin/env bash
# The paper configs' train step on one NVIDIA GPU, in about 10 minutes: installs the package
# with jax[cuda12] (the `cuda` extra), then for bigbigan_resnet50 and biggan_128 times the
# step at the largest batch that fits, trying 64, 32, 16 and 8 images per device in turn
# (each try gets at most 4 minutes; one that runs out of memory falls through to the next),
# and prints images/s and the model-FLOP utilisation against the chip's bf16 dense peak.
#
#   bash launch/gpu_benchmark.sh                      # peak read from nvidia-smi's GPU name
#   PEAK_TFLOPS=989 bash launch/gpu_benchmark.sh      # or given (TFLOP/s per GPU, bf16 dense)
#
# Every figure comes from `python -m bigbigan_jax.tools.benchmark` (median of 5 timed steps).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PEAK_TFLOPS:-}" ]]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
  case "$gpu" in
    *H100*PCIe*) PEAK_TFLOPS=756 ;;
    *H100*|*H200*) PEAK_TFLOPS=989 ;;
    *A100*) PEAK_TFLOPS=312 ;;
    *L4*) PEAK_TFLOPS=121 ;;
    *)
      echo "error: no bf16 peak known for GPU '$gpu'; set PEAK_TFLOPS (TFLOP/s, bf16 dense)" >&2
      exit 2 ;;
  esac
  echo "GPU: $gpu, bf16 dense peak $PEAK_TFLOPS TFLOP/s"
fi

python3 -m pip install -q -e '.[cuda]'
python3 -c "import jax; print('devices:', jax.devices())"

for config in bigbigan_resnet50 biggan_128; do
  fitted=""
  for per_device in 64 32 16 8; do
    echo "== $config at $per_device images per device"
    # One GPU: the global batch is the per-device batch. XLA_PYTHON_CLIENT_MEM_FRACTION lets
    # the step use most of the GPU's memory.
    if XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 240 python3 -m bigbigan_jax.tools.benchmark \
        --config="configs/$config.py" --config.batch_size="$per_device" --steps=5 --warmup=1 \
        --peak_tflops="$PEAK_TFLOPS"; then
      fitted=$per_device
      break
    fi
  done
  echo "== $config: largest batch that ran: ${fitted:-none}"
done
