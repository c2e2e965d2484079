#!/usr/bin/env bash
# Run on the lent GPU machine (device tool), from the repo root, with .whl carried:
#   bash bench/run_gpu.sh [tests] [limits] [bench] [quick]
# Installs the carried wheels (confluent-kafka, lmdb: streamhps/__init__ imports the publisher),
# then runs the gpu-marked cache tests, bench/gpu_limits.py and bench/cache.py --gpu,
# writing logs and JSON to $OUT.
set -o pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
QUICK=""
for a in "$@"; do [ "$a" = quick ] && QUICK=--quick; done
for a in "$@"; do
  case "$a" in
    tests) python3 -m pytest tests/cache -m gpu -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest_gpu.txt" ;;
    limits) python3 bench/gpu_limits.py 2>&1 | tee "$OUT/gpu_limits.txt" ;;
    bench) python3 bench/cache.py --gpu --no-cpu $QUICK --out "$OUT/cache.json" 2>&1 | tee "$OUT/bench_cache.txt" ;;
  esac
done
