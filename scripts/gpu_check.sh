#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, no network, and a Python with a CUDA build of torch, nvcc,
# CMake and the NCCL wheel (nvidia-nccl-cu*; no TensorFlow needed), build Horovod with NCCL from the sdist in
# .gpu/, run the GPU tests (tests/test_gpu.py) and the GPU kernel benchmark, and write results/gpu/ (copied to
# $OUT too when it is set). Budget: 8 minutes.
#
#   bash scripts/gpu_check.sh --fetch     with network, beforehand: the Horovod sdist into .gpu/ (git-ignored;
#                                         carry it to the GPU machine with the working tree)
#   bash scripts/gpu_check.sh             on the GPU machine: build, test, benchmark
#   bash scripts/gpu_check.sh --reuse     the same on a machine where it already ran: the Horovod it built in
#                                         $HVDC_GPU_WORK (/tmp/hvdc-gpu) again, no build (a rerun on a warm machine)
#   bash scripts/gpu_check.sh --dry-run   on a CPU machine with the set-up's .venv: the same tests and benchmark
#                                         on the CPU (HVD_COMPRESS_GPU_TEST_DEVICE=cpu), no build; nothing of it
#                                         is a GPU result (results/gpu-dry-run/, git-ignored)
# Every step runs even when an earlier one failed (one run should tell all); the exit code is the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
HOROVOD_VERSION=0.28.1
SDIST=$ROOT/.gpu/horovod-$HOROVOD_VERSION.tar.gz
WORK=${HVDC_GPU_WORK:-/tmp/hvdc-gpu}
mode=${1:-check}
log() { printf '[gpu_check %s] %s\n' "$(date +%T)" "$*" >&2; }

case $mode in
    --fetch)
        mkdir -p "$ROOT/.gpu"
        python3 -m pip download -q --no-deps --no-binary :all: -d "$ROOT/.gpu" "horovod==$HOROVOD_VERSION"
        ls -l "$SDIST"
        exit ;;
    --dry-run)
        PY=$ROOT/.venv/bin/python RESULTS=$ROOT/results/gpu-dry-run
        export HVD_COMPRESS_GPU_TEST_DEVICE=cpu HVD_COMPRESS_BENCH_DEVICE=cpu ;;
    check | --reuse)
        PY=${PYTHON:-python3} RESULTS=$ROOT/results/gpu ;;
    *)
        echo "usage: bash scripts/gpu_check.sh [--fetch | --dry-run | --reuse]" >&2
        exit 2 ;;
esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
status=0

step() {   # step NAME COMMAND...: run it, its output into $RESULTS/NAME.log; remember the first failure
    local name=$1 start=$SECONDS rc
    shift
    log "$name ..."
    "$@" > "$RESULTS/$name.log" 2>&1
    rc=$?
    log "$name: exit $rc in $((SECONDS - start)) s (${RESULTS#"$ROOT"/}/$name.log)"
    tail -n 25 "$RESULTS/$name.log" >&2
    [[ -n ${OUT:-} ]] && cp "$RESULTS"/*.log "$RESULTS"/*.json "$RESULTS"/*.xml "$OUT"/ 2>/dev/null   # as they come
    ((rc == 0 || status != 0)) || status=$rc
    return $rc
}

environment() {
    nvidia-smi -L || true
    command -v nvcc && nvcc --version | tail -2
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", "capability", torch.cuda.get_device_capability(0))
EOF
}

build_horovod() {   # Horovod with PyTorch, Gloo and NCCL (no TensorFlow, no MPI) into $WORK/site
    [[ -f $SDIST ]] || { echo "no $SDIST: run 'bash scripts/gpu_check.sh --fetch' where there is network"; return 1; }
    local nvcc src nccl cc
    nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$nvcc")")")}
    export PATH=$CUDA_HOME/bin:$PATH
    "$CUDA_HOME/bin/nvcc" --version | tail -1 || return 1
    "$PY" -c "import sysconfig, os, sys; h = sysconfig.get_paths()['include']; os.path.exists(h + '/Python.h') or sys.exit(
        f'no Python.h in {h}: the PyTorch extension of Horovod needs Python headers (python3-dev)')" || return 1
    rm -rf "$WORK" && mkdir -p "$WORK/nccl-lib"
    tar -xzf "$SDIST" -C "$WORK" || return 1
    src=$WORK/horovod-$HOROVOD_VERSION
    # the set-up's edit (torch's headers need C++17), C++17 for the .cu file too, and Python 3.12 has no
    # distutils (torch's CMake file asks it for Python's headers; horovodrun imports js_run)
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' "$src/horovod/common/ops/cuda/CMakeLists.txt"
    sed -i "s/from distutils.sysconfig import get_python_inc; print(get_python_inc())/import sysconfig; print(sysconfig.get_paths()['include'])/" \
        "$src/horovod/torch/CMakeLists.txt"
    sed -i 's/^from distutils.spawn import find_executable$/from shutil import which as find_executable/' \
        "$src/horovod/runner/js_run.py"
    # NCCL from its wheel (torch's own): nccl.h and libnccl.so.2, but not the libnccl.so that CMake looks for
    nccl=$("$PY" -c "import nvidia.nccl as m; print(list(m.__path__)[0])") || return 1
    ln -sfn "$nccl/lib/libnccl.so.2" "$WORK/nccl-lib/libnccl.so"
    ln -sfn "$nccl/lib/libnccl.so.2" "$WORK/nccl-lib/libnccl.so.2"
    cc=${HOROVOD_BUILD_CUDA_CC_LIST:-}    # else this GPU's compute capability, e.g. 90
    [[ -n $cc ]] || cc=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))") || return 1
    # CMAKE_POLICY_VERSION_MINIMUM: CMake >= 4 refuses third_party/gloo's cmake_minimum_required(2.8.12)
    HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_INCLUDE=$nccl/include HOROVOD_NCCL_LIB=$WORK/nccl-lib \
        HOROVOD_NCCL_LINK=SHARED HOROVOD_BUILD_CUDA_CC_LIST=$cc HOROVOD_CUDA_HOME=$CUDA_HOME \
        HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_MPI=1 \
        HOROVOD_WITH_GLOO=1 CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS=-j"$(nproc)" PIP_NO_INDEX=1 \
        "$PY" -m pip install --no-deps --no-build-isolation --no-cache-dir --target "$WORK/site" "$src" || return 1
    use_horovod
}

use_horovod() {   # the Horovod in $WORK/site, for this script's later steps
    local nccl
    nccl=$("$PY" -c "import nvidia.nccl as m; print(list(m.__path__)[0])") || return 1
    export PATH=$WORK/site/bin:$PATH PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    export LD_LIBRARY_PATH=$nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    horovodrun --check-build || return 1
    "$PY" -c "import horovod.torch as hvd; assert hvd.nccl_built() and hvd.cuda_built(), 'no NCCL'; print('NCCL', hvd.nccl_built())"
}

begin=$SECONDS
step environment environment
# (functions: their exports stay for the steps below)
[[ $mode == check ]] && step build build_horovod
[[ $mode == --reuse ]] && step build use_horovod
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
# time limits, so that a hang in one step still leaves the others' results (the whole check: 8 minutes)
step tests timeout 330 "$PY" -m pytest tests/test_gpu.py -q -p no:cacheprovider --durations=5 \
    --junitxml="$RESULTS/tests.xml"
step bench timeout 150 "$PY" -m scripts.bench gpu --out "$RESULTS" $([[ $mode == --dry-run ]] && echo --quick)
log "done in $((SECONDS - begin)) s, exit $status; results in ${RESULTS#"$ROOT"/}/"
exit $status
