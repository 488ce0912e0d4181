#!/bin/bash
# Everything a short GPU session checks, in one command that its timeouts keep under 10 minutes:
#   bash benchmarks/gpu_session.sh [OUT_DIR]
# 1. tests/test_cuda.py and the DDP test (two ranks sharing one GPU through Gloo): 59 s on one H200;
# 2. the rest of the test suite with CUDA visible, so every trainer test trains on the GPU
#    (pytest-xdist's -n 8 where it is installed): 312 of 325 tests in 110 s there, so 150 s here;
# 3. the benchmark suite on the GPU, one round: W1 MMoE and PLE, then W2 MMoE, PLE and ESMM
#    (W2's took 178 s there with these settings), at most 160 s each;
# 4. training throughput in fp32 against bf16 (training.precision), W1 and W2 MMoE, at most 60 s.
# The reference libraries are pure-Python wheels: on a machine without a package index, put
# torch-rechub's and deepctr-torch's wheels in .whl/ (pip download --no-deps ... -d .whl) first.
set -o pipefail
out=${1:-${OUT:-gpu-session}}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/mtlkit-site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/src:$PWD:/tmp/mtlkit-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
step() { local started=$SECONDS; "$@"; echo "[$(( SECONDS - started )) s] $*"; }
step timeout 120 python3 -m pytest -q -p no:cacheprovider -rf tests/test_cuda.py tests/test_distributed.py 2>&1 | tee "$out/pytest_cuda.log" | tail -5
step timeout 150 python3 -m pytest -q -p no:cacheprovider -rf --tb=short $parallel tests --ignore=tests/test_cuda.py \
    --ignore=tests/test_distributed.py > "$out/pytest_rest.log" 2>&1; tail -5 "$out/pytest_rest.log"
for workload in W1:mmoe,ple W2:mmoe,ple,esmm; do
    step timeout 160 python3 -m benchmarks.run --device cuda --workloads "${workload%%:*}" --models "${workload#*:}" --rounds 1 \
        --windows 2 --window-seconds 0.1 --compile '' --out "$out/gpu_${workload%%:*}.json" > "$out/gpu_${workload%%:*}.log" 2>&1
    tail -8 "$out/gpu_${workload%%:*}.log"
done
step timeout 60 python3 -m benchmarks.precision --device cuda --workloads W1,W2 --models mmoe --repeats 1 \
    --out "$out/precision_gpu.json" > "$out/precision_gpu.log" 2>&1
tail -8 "$out/precision_gpu.log"
