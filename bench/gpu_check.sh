#!/usr/bin/env bash
# The performance suite on one GPU, sized to finish within SUITE_TIMEOUT_S (default 450 s)
# on an H100/H200: the most important settings run first (bench/suite.py).
# Prepare on a machine with pip access:  bash bench/gpu_prepare.sh
# Then on the GPU machine, from the repo root, with .whl/ and .gpu_carry/ beside it:
#   OUT=/some/dir bash bench/gpu_check.sh
# Writes $OUT/suite.jsonl (every JSON line of python -m bench.suite --preset gpu), $OUT/suite.log
# and $OUT/gpu.txt. The machine needs jax with CUDA, flax, optax, orbax, torch and
# torchvision; the rest is installed from .whl/ into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/clusiam_gpu_check}
mkdir -p "$OUT"
for need in .whl .gpu_carry/CluSiam .gpu_carry/torch_original.py; do
  [ -e "$need" ] || { echo "missing $need: run bash bench/gpu_prepare.sh first" >&2; exit 2; }
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# Same-machine reruns reuse compiled steps (a fresh machine starts empty).
export JAX_COMPILATION_CACHE_DIR=/tmp/clusiam_jax_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" \
  | tee -a "$OUT/gpu.txt"
timeout "${SUITE_TIMEOUT_S:-450}" python3 -m bench.suite --preset gpu \
  --original-repo .gpu_carry/CluSiam --harness .gpu_carry/torch_original.py \
  --out "$OUT/suite.jsonl" "$@" 2>&1 | tee "$OUT/suite.log"
