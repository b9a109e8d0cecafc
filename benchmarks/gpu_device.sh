#!/usr/bin/env bash
# The one call for a lent GPU: check and time sparsefx's Triton kernels against cuBLAS
# (benchmarks/gpu.py) on a bare image, in under 5 minutes, everything written into OUT.
#
#   bash benchmarks/gpu_device.sh "$OUT"                  # the full run, --budget-s 270
#   bash benchmarks/gpu_device.sh OUT --tiny --budget-s 20   # a smoke run (CPU: interpreter)
#
# The package is placed, not installed: sparsefx/, kernels/ and passes/ are copied into the
# layout `pip install` gives (sparsefx.kernels, sparsefx.passes) under a temporary folder
# put first on PYTHONPATH, so nothing needs pip, a build or the network. OUT receives the
# results (gpu_<device>.json and .md), gpu.log (stdout), gpu.stderr, nvidia-smi.txt, the
# GPU tests' log where there is a GPU, and the Triton cache as triton-cache.tar.gz.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_device.sh OUT_DIR [gpu.py options]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

site=$(mktemp -d)
mkdir -p "$site/sparsefx"
cp -r "$root/sparsefx/." "$site/sparsefx/"
rm -rf "$site/sparsefx/kernels" "$site/sparsefx/passes"
cp -r "$root/kernels" "$site/sparsefx/kernels"
cp -r "$root/passes" "$site/sparsefx/passes"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="$site/triton-cache" TRITON_CACHE_AUTOTUNING=1
export SPARSEFX_CPU_KERNELS=torch  # no native CPU build: nothing here uses it

(nvidia-smi || echo "no nvidia-smi") > "$out/nvidia-smi.txt" 2>&1
cd "$root"
"$python" benchmarks/gpu.py --out "$out" "$@" 2> "$out/gpu.stderr" | tee "$out/gpu.log"
status=${PIPESTATUS[0]}
if "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    timeout 60 "$python" -m pytest -q -x -p no:cacheprovider tests/test_gpu.py \
        > "$out/test_gpu.log" 2>&1
    echo "tests/test_gpu.py: exit $? ($(tail -n 1 "$out/test_gpu.log"))"
fi
tar -czf "$out/triton-cache.tar.gz" -C "$site" triton-cache 2> /dev/null
echo "gpu.py exit $status; results in $out"
exit "$status"
