#!/usr/bin/env bash
# Builds .devsite.tar.xz for bench/run_device.sh: the device machine has python 3.12 and no
# PyPI, and .whl (the project's wheels for it) plus numba's (llvmlite alone is 60 MB) do not
# fit into one call's 64 MiB of carried files. This installs all of them for python 3.12 into
# one folder and packs it as an xz tar (~62 MB; takes ~3 minutes on 2 cores). Carry it instead
# of .whl:  run(carry=[".devsite.tar.xz"], command="OUT=$OUT bash bench/run_device.sh tests")
#   bash bench/devsite.sh        (needs .whl and PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
ls .whl/*.whl >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux2014_x86_64 manylinux_2_17_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
target=(--python-version 3.12 "${platforms[@]}" --only-binary=:all:)
python3 -m pip download -q --no-deps "${target[@]}" -d "$tmp/whl" numba==0.68.0 llvmlite==0.50.0
python3 -m pip install -q --no-index --no-deps --no-compile "${target[@]}" --target "$tmp/site" \
    .whl/*.whl "$tmp"/whl/*.whl
rm -rf "$tmp/site/numba/tests" "$tmp/site/llvmlite/tests" "$tmp/site/bin"
tar -C "$tmp/site" -cf - . | xz -9 -T0 >.devsite.tar.xz
ls -l .devsite.tar.xz
