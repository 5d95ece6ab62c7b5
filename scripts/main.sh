#!/usr/bin/env bash
# The main job: set up if needed, then a real 2-rank data-parallel training on localhost with Top-k 1%, error
# feedback, Nesterov momentum correction without factor masking and a 100-step warm-up of the ratio
# (Fashion-MNIST, 2 epochs; the recipe of README "Results: the main job"). Extra arguments go to the example
# instead, e.g.
#   bash scripts/main.sh --compressor topk:0.01 --error-feedback --server topk:0.01
# NP=4 bash scripts/main.sh runs 4 ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=3   # horovodrun imports TensorFlow; keep its start-up chatter out of the output
args=("$@")
((${#args[@]})) || args=(--compressor topk:0.01 --error-feedback --momentum-correction --no-momentum-masking --nesterov
                          --warmup 100)
exec .venv/bin/horovodrun -np "${NP:-2}" --gloo .venv/bin/python examples/pytorch_fashion_mnist.py "${args[@]}"
