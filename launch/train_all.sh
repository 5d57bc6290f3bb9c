#!/usr/bin/env bash
# Every run of a preset's default model list (`bonedist models --preset PRESET --runs`), then the ensemble evaluation,
# on one machine (all its GPUs, or 2 CPU processes without any).
#
#   launch/train_all.sh SHARDS [EXPERIMENT] [-- extra `bonedist train` flags]
#   PRESET=tiny launch/train_all.sh shards/phantoms demo -- --epochs 2
#   MODELS="resnet18 xception" REPLICAS=3 PRESET=scratch launch/train_all.sh shards/rsna deep-ensemble
#
# Environment: PRESET (default paper), RUNS_DIR (default runs), MODELS (default: the preset's list), REPLICAS (runs
# of every model, each another seed and ensemble member: MODEL, MODEL-2, ...; default: the preset's), SEED (the
# first run's, default 0; replica k gets SEED + 1000 k, so give seeds here, not in the extra flags), SPLIT (default
# test), BONEDIST_PYTHON (default .venv/bin/python if present, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${1:?usage: launch/train_all.sh SHARDS [EXPERIMENT] [-- train flags]}
EXPERIMENT=${2:-default}
shift $(( $# >= 2 ? 2 : 1 ))
[ "${1:-}" = "--" ] && shift
PRESET=${PRESET:-paper}
RUNS_DIR=${RUNS_DIR:-runs}
if [ -z "${BONEDIST_PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then BONEDIST_PYTHON=.venv/bin/python; else BONEDIST_PYTHON=python; fi
fi
RUNS=$("$BONEDIST_PYTHON" -m bonedist models --runs --preset "$PRESET" ${MODELS:+--models "$MODELS"} \
  ${REPLICAS:+--replicas "$REPLICAS"} --seed "${SEED:-0}")
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
if [ "${GPUS:-0}" -ge 2 ]; then
  LAUNCH=(--config_file launch/accelerate/single_node.yaml --num_processes "$GPUS")
elif [ "${GPUS:-0}" -eq 1 ]; then
  LAUNCH=(--config_file launch/accelerate/single_gpu.yaml)
else
  LAUNCH=(--config_file launch/accelerate/cpu_2proc.yaml)
fi
PORT=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
while IFS=$'\t' read -r model run seed; do
  echo "=== training ${run} (${model}, ${PRESET}, seed ${seed}) on ${GPUS:-0} GPU(s)"
  "$BONEDIST_PYTHON" -m accelerate.commands.launch "${LAUNCH[@]}" --main_process_port "$PORT" -m bonedist.train \
    --model "$model" --shards "$SHARDS" --preset "$PRESET" --experiment "$EXPERIMENT" --runs-dir "$RUNS_DIR" \
    --run-name "$run" --seed "$seed" "$@" < /dev/null
done <<< "$RUNS"
echo "=== evaluating the ensemble on ${SPLIT:-test}"
"$BONEDIST_PYTHON" -m accelerate.commands.launch "${LAUNCH[@]}" --main_process_port "$PORT" -m bonedist evaluate \
  --runs "${RUNS_DIR}/${EXPERIMENT}" --split "${SPLIT:-test}"
