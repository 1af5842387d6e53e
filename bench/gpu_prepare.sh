#!/usr/bin/env bash
# Run HERE (a machine with pip access) before bench/gpu_check.sh goes to a GPU machine
# that has jax[cuda], flax, optax, orbax, torch and torchvision but no package index.
# It fills two git-ignored folders that the GPU run carries:
#   .whl/        wheels of the packages that machine lacks (Python 3.12, manylinux x86-64)
#   .gpu_carry/  the original's benchmark harness and the authors' repository (never committed)
# Usage: bash bench/gpu_prepare.sh [PATH_TO_CluSiam_GIT]
set -euo pipefail
cd "$(dirname "$0")/.."
ORIGINAL_REPO=${1:-/work/.mirror/wwyi1828+CluSiam/repo}
HARNESS=../shared/bench/torch_original.py
for ignored in /.whl/ /.gpu_carry/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done

pin() { grep -i "^$1==" requirements.txt | cut -d' ' -f1; }
rm -rf .whl && mkdir -p .whl
for pkg in ml_collections grain array_record tensorboardX portpicker; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "$(pin "$pkg")"
done

rm -rf .gpu_carry && mkdir -p .gpu_carry
cp "$HARNESS" .gpu_carry/torch_original.py
# An extracted source tree: the harness takes one where git history cannot travel.
mkdir -p .gpu_carry/CluSiam
git -C "$ORIGINAL_REPO" archive HEAD | tar -x -C .gpu_carry/CluSiam
du -sh .whl .gpu_carry
