#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent CUDA machine whose python3 has
# torch and transformers. Sections (default: tests merge):
#   tests    the CUDA tests (merge engine, learned merges, parity);
#   merge    `zoo merge` on CUDA against the CPU on the 1B family (bench/merge_cuda.py);
#   speed    learned merges at ViT-B/32 size: steps/s and peak memory of Concrete TA
#            and layer-wise AdaMerging, bf16 and fp32 (bench/learned_gpu.py; the target,
#            issue 20: Concrete TA at >= 25 steps/s and <= 6 GiB, printed as target_met);
#   learned  speed, then the demo zoo's learned merges on the papers' schedule
#            (bench/learned_demo.py).
# Wheels for what that python lacks are in .whl/; the demo cache and a script that
# writes the 1B family (docs/results.md) in .gpu/ (carry both).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
SECTIONS=${*:-tests merge}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ZOO_CACHE=$PWD/.gpu/cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
for s in $SECTIONS; do case $s in
tests)
  timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_parity.py -k cuda \
    2>&1 | tail -40 | tee "$OUT/test_cuda.txt" ;;
merge)
  fam=${FAMILY:-/tmp/family}
  [ -d "$fam/expert3" ] || timeout "${GEN_S:-240}" python3 .gpu/make_models.py --size medium --experts 3 --out "$fam" \
    2>&1 | tail -3 | tee "$OUT/family.txt"
  timeout "${MERGE_S:-300}" python3 bench/merge_cuda.py --family "$fam" --work /tmp 2>&1 | tail -60 | tee "$OUT/merge_cuda.txt"
  cp bench/results/merge_cuda.json "$OUT/" 2>/dev/null ;;
speed|learned)
  timeout "${SPEED_S:-240}" python3 bench/learned_gpu.py --steps 200 --methods concrete_ta,adamerging 2>&1 | tail -40 \
    | tee "$OUT/learned_gpu.txt"
  cp bench/results/learned_gpu.json "$OUT/" 2>/dev/null
  [ "$s" = speed ] && continue
  timeout "${DEMO_S:-120}" python3 bench/learned_demo.py --device cuda --schedule paper \
    --only am-layer-entropy,concrete-ta-entropy --skip-baselines --result learned_demo_paper 2>&1 | tail -30 \
    | tee "$OUT/learned_demo_paper.txt"
  cp bench/results/learned_demo_paper.json "$OUT/" 2>/dev/null ;;
esac; done
true
