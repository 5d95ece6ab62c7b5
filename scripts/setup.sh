#!/usr/bin/env bash
# One idempotent set-up for hvd_compress: system packages, .venv/, pinned Python packages,
# Horovod built from its sdist with TensorFlow + PyTorch + MPI + Gloo, and hvd_compress (editable).
# On a GPU machine (nvidia-smi lists a GPU and nvcc is on PATH or in $CUDA_HOME; HVDC_GPU=1 or 0 decides
# instead) torch is PyPI's CUDA build and Horovod gets NCCL for CUDA tensors (NCCL from torch's own wheel).
# A second run checks a stamp and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# ---- every pinned version lives here -------------------------------------------------------------
# tensorflow, not tensorflow-cpu: tf-keras requires the tensorflow wheel, and the two would share one folder
PY_PINS=(torch==2.13.0 tensorflow==2.21.0 tf-keras==2.21.0 numpy==2.4.6 mpi4py==4.1.2
         tqdm==4.70.1 pytest==9.2.0 hypothesis==6.170.15 matplotlib==3.11.2 scikit-learn==1.9.1)
HOROVOD_VERSION=0.28.1
# build-essential: the C/C++ compilers and make, for Horovod's build and the fused kernels
APT_PKGS=(build-essential openmpi-bin libopenmpi-dev cmake dataset-fashion-mnist openssh-server)
# --------------------------------------------------------------------------------------------------

export TF_CPP_MIN_LOG_LEVEL=3  # keep TensorFlow quiet while the build check below imports it
VENV=$ROOT/.venv
STAMP=$VENV/.hvd_compress_setup
log() { printf '[setup] %s\n' "$*" >&2; }

GPU=${HVDC_GPU:-auto}
if [[ $GPU == auto ]]; then
    GPU=0
    # (never `| grep -q` in this script: grep stops reading at the first match, the writer then fails on the
    # closed pipe, and under pipefail the whole test reads as false)
    if nvidia-smi -L 2>/dev/null | grep '^GPU' >/dev/null && { command -v nvcc || [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]]; } >/dev/null
    then GPU=1; fi
fi
FRAMEWORKS=(TensorFlow PyTorch MPI Gloo)
if [[ $GPU == 1 ]]; then
    FRAMEWORKS+=(NCCL)
    NVCC=${CUDA_HOME:+$CUDA_HOME/bin/nvcc}   # the toolkit of CUDA_HOME, else the nvcc on PATH
    NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$NVCC")")")}
    export PATH=$CUDA_HOME/bin:$PATH
fi
WANT="$(printf '%s\n' "${PY_PINS[@]}" "horovod==$HOROVOD_VERSION" "${APT_PKGS[@]}" "gpu=$GPU")"

if [[ -f $STAMP && "$(cat "$STAMP")" == "$WANT" ]] && "$VENV/bin/python" -c 'import horovod.torch, hvd_compress' 2>/dev/null; then
    log "already set up (.venv matches the pins)"; exit 0
fi

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=; [[ $(id -u) == 0 ]] || SUDO=sudo
    log "installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[[ -x $VENV/bin/python ]] || { log "creating .venv"; python3 -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
log "installing Python packages (${#PY_PINS[@]} pins)"
if [[ $GPU == 1 ]]; then
    # PyPI's torch for Linux is the CUDA build (its CUDA libraries and NCCL come as nvidia-* wheels); a local
    # CPU wheel of the same version must not win: find-links/extra indexes still apply with --index-url, and
    # 2.13.0+cpu sorts above 2.13.0, so pin with === (exact string: no local version label)
    "${PIP[@]}" install --index-url https://pypi.org/simple --no-cache-dir "$(printf '%s\n' "${PY_PINS[@]}" | grep '^torch==' | sed 's/==/===/')"
fi
"${PIP[@]}" install "${PY_PINS[@]}"
if [[ $GPU == 1 ]]; then
    torch_cuda=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')")
    nvcc_cuda=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
    if [[ -z $torch_cuda || ${torch_cuda%%.*} != "${nvcc_cuda%%.*}" ]]; then
        log "ERROR: torch is built for CUDA '${torch_cuda:-none}' but nvcc ($NVCC) is CUDA $nvcc_cuda: Horovod's CUDA"
        log "       parts must be built with the same major version. Point CUDA_HOME at a toolkit of torch's CUDA"
        log "       (module load cuda/...), or run with HVDC_GPU=0 for the CPU build."
        exit 1
    fi
fi

# what the installed Horovod was built with, as words ("TensorFlow PyTorch MPI Gloo"): `horovodrun --check-build`
# tells the same in 30 s on 2 cores, because it imports each framework several times; this imports each once (8 s)
horovod_built() {
    "$VENV/bin/python" - 2>/dev/null <<'EOF' || true
import importlib
built = []
for framework, module in (("TensorFlow", "horovod.tensorflow"), ("PyTorch", "horovod.torch")):
    try:
        hvd = importlib.import_module(module)   # loads the framework's Horovod library, or fails
    except Exception:
        continue
    built.append(framework)
if built:
    built += [name for name in ("MPI", "Gloo", "NCCL") if getattr(hvd, name.lower() + "_built")()]
print(*built)
EOF
}
built=$(horovod_built)
if ! grep -qw TensorFlow <<<"$built" || { [[ $GPU == 1 ]] && ! grep -qw NCCL <<<"$built"; } \
   || { [[ $GPU == 0 ]] && grep -qw NCCL <<<"$built"; } \
   || ! "$VENV/bin/pip" show horovod 2>/dev/null | grep "^Version: $HOROVOD_VERSION$" >/dev/null; then
    log "building Horovod $HOROVOD_VERSION from source with ${FRAMEWORKS[*]} (~4 min on 2 cores, ~20 with NCCL)"
    BUILD=$(mktemp -d)
    "${PIP[@]}" download --no-deps --no-binary :all: -d "$BUILD" "horovod==$HOROVOD_VERSION"
    tar -xzf "$BUILD"/horovod-*.tar.gz -C "$BUILD"
    SRC=$BUILD/horovod-$HOROVOD_VERSION
    # Horovod 0.28.1 as released does not build against torch >= 2.1 / TF >= 2.16: torch's headers need C++17,
    # and horovod/tensorflow/xla_mpi_ops.cc does not compile against TF >= 2.16 (left out of the build):
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
    sed -i '/xla_mpi_ops.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
    # built without debug info (Release, not RelWithDebInfo; both -O3): 4.1 min instead of 5.2 on 2 cores
    sed -i "s/else 'RelWithDebInfo'/else 'Release'/" "$SRC/setup.py"
    GPU_ENV=()
    if [[ $GPU == 1 ]]; then
        # NCCL from torch's nvidia-nccl wheel, which has libnccl.so.2 but not the libnccl.so CMake looks for:
        # the link goes beside it (HOROVOD_NCCL_LIB ends up in the RUNPATH, and TF does not load NCCL itself);
        # compute capabilities of the GPUs here (HOROVOD_BUILD_CUDA_CC_LIST overrides; none known: every one
        # nvcc knows); CMake >= 4 needs the policy floor for third_party/gloo; the .cu file gets C++17 as the rest
        NCCL=$("$VENV/bin/python" -c "import nvidia.nccl as m; print(list(m.__path__)[0])")
        ln -sfn libnccl.so.2 "$NCCL/lib/libnccl.so"
        CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d . | sort -u | paste -sd, || true)}
        sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' "$SRC/horovod/common/ops/cuda/CMakeLists.txt"
        # TF 2.21 no longer exports stream_executor::gpu::AsGpuStreamValue, which mpi_ops.cc only declares:
        # define it (a template, so Stream may still be incomplete here) from Stream::platform_specific_handle()
        sed -i 's|^GpuStreamHandle AsGpuStreamValue(Stream\* stream);$|template <class S> GpuStreamHandle AsGpuStreamValue(S* stream) { return static_cast<GpuStreamHandle>(stream->platform_specific_handle().stream); }|' \
            "$SRC/horovod/tensorflow/mpi_ops.cc"
        GPU_ENV=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_INCLUDE="$NCCL/include" HOROVOD_NCCL_LIB="$NCCL/lib"
                 HOROVOD_NCCL_LINK=SHARED ${CC_LIST:+HOROVOD_BUILD_CUDA_CC_LIST=$CC_LIST} HOROVOD_CUDA_HOME="$CUDA_HOME"
                 CMAKE_POLICY_VERSION_MINIMUM=3.5)
    fi
    env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j"$(nproc)" "${GPU_ENV[@]}" \
        "${PIP[@]}" install --no-build-isolation --no-cache-dir "$SRC"
    rm -rf "$BUILD"
fi
built=$(horovod_built)
for fw in "${FRAMEWORKS[@]}"; do
    grep -qw "$fw" <<<"$built" || { log "ERROR: Horovod was built without $fw (built with: ${built:-nothing that loads})"; exit 1; }
done

"${PIP[@]}" install --no-deps -e "$ROOT"
# the fused CPU kernels (a small C library, cached per machine; built on first use if this step is skipped)
"$VENV/bin/python" -c "from hvd_compress import fused; fused.build()" \
    || log "WARNING: the fused kernels did not build; hvd_compress falls back to its slower torch kernels"
printf '%s' "$WANT" > "$STAMP"
log "done: $("$VENV/bin/horovodrun" --version 2>/dev/null | tail -1) with ${FRAMEWORKS[*]}"
