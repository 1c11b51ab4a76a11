#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent CUDA machine whose python3 has
# torch and transformers: the merge engine's CUDA tests, Concrete TA at ViT-B/32 size,
# and the demo zoo's entropy-objective learned merges on the papers' schedule.
# Wheels for what that python lacks are in .whl/; the demo cache in .gpu/cache.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ZOO_CACHE=$PWD/.gpu/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT/test_cuda.txt"
timeout 150 python3 bench/learned_gpu.py --steps 200 2>&1 | tail -40 | tee "$OUT/learned_gpu.txt"
cp bench/results/learned_gpu.json "$OUT/" 2>/dev/null
timeout "${DEMO_S:-120}" python3 bench/learned_demo.py --device cuda --schedule paper \
  --only am-layer-entropy,concrete-ta-entropy --skip-baselines --result learned_demo_paper 2>&1 | tail -30 | tee "$OUT/learned_demo_paper.txt"
cp bench/results/learned_demo_paper.json "$OUT/" 2>/dev/null
true
