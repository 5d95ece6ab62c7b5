#!/usr/bin/env bash
# One idempotent set-up for hvd_compress: system packages, .venv/, pinned Python packages,
# Horovod built from its sdist with TensorFlow + PyTorch + MPI + Gloo, and hvd_compress (editable).
# A second run checks a stamp and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# ---- every pinned version lives here -------------------------------------------------------------
PY_PINS=(torch==2.13.0 tensorflow-cpu==2.21.0 tf-keras==2.21.0 numpy==2.4.6 mpi4py==4.1.2
         tqdm==4.70.1 pytest==9.2.0 hypothesis==6.170.15 matplotlib==3.11.2 scikit-learn==1.9.1)
HOROVOD_VERSION=0.28.1
APT_PKGS=(openmpi-bin libopenmpi-dev cmake dataset-fashion-mnist openssh-server)
# --------------------------------------------------------------------------------------------------

export TF_CPP_MIN_LOG_LEVEL=3  # keep TensorFlow quiet while horovodrun --check-build imports it
VENV=$ROOT/.venv
STAMP=$VENV/.hvd_compress_setup
WANT="$(printf '%s\n' "${PY_PINS[@]}" "horovod==$HOROVOD_VERSION" "${APT_PKGS[@]}")"
log() { printf '[setup] %s\n' "$*" >&2; }

if [[ -f $STAMP && "$(cat "$STAMP")" == "$WANT" ]] && "$VENV/bin/python" -c 'import horovod.torch, hvd_compress' 2>/dev/null; then
    log "already set up (.venv matches the pins)"; exit 0
fi

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
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
"${PIP[@]}" install "${PY_PINS[@]}"

if ! "$VENV/bin/horovodrun" --check-build 2>/dev/null | grep -q "\[X\] TensorFlow" \
   || ! "$VENV/bin/pip" show horovod 2>/dev/null | grep -q "^Version: $HOROVOD_VERSION$"; then
    log "building Horovod $HOROVOD_VERSION from source with TensorFlow, PyTorch, MPI and Gloo (~5 min on 2 cores)"
    BUILD=$(mktemp -d)
    "${PIP[@]}" download --no-deps --no-binary :all: -d "$BUILD" "horovod==$HOROVOD_VERSION"
    tar -xzf "$BUILD"/horovod-*.tar.gz -C "$BUILD"
    SRC=$BUILD/horovod-$HOROVOD_VERSION
    # Horovod 0.28.1 as released does not build against torch >= 2.1 / TF >= 2.16: torch's headers need C++17,
    # and horovod/tensorflow/xla_mpi_ops.cc does not compile against TF >= 2.16 (left out of the build):
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
    sed -i '/xla_mpi_ops.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j"$(nproc)" \
        "${PIP[@]}" install --no-build-isolation --no-cache-dir "$SRC"
    rm -rf "$BUILD"
fi
check=$("$VENV/bin/horovodrun" --check-build)
for fw in TensorFlow PyTorch MPI Gloo; do
    grep -q "\[X\] $fw" <<<"$check" || { echo "$check" >&2; log "ERROR: Horovod was built without $fw"; exit 1; }
done

"${PIP[@]}" install --no-deps -e "$ROOT"
# the fused CPU kernels (a small C library, cached per machine; built on first use if this step is skipped)
"$VENV/bin/python" -c "from hvd_compress.torch import fused; fused.build()" \
    || log "WARNING: the fused kernels did not build; hvd_compress falls back to its slower torch kernels"
printf '%s' "$WANT" > "$STAMP"
log "done: $("$VENV/bin/horovodrun" --version 2>/dev/null | tail -1) with TensorFlow, PyTorch, MPI, Gloo"
