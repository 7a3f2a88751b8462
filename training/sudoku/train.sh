#!/usr/bin/env bash
# Trains the packaged Sudoku model (mlx_diffgemma/sudoku/model) from scratch with `mlxdg lora
# --fine-tune-type full`, or resumes it from the committed state in training/sudoku/state.
#
#   training/sudoku/train.sh            # start, or resume when state/adapters.safetensors exists
#   ITERS=4000 training/sudoku/train.sh # the schedule's length (keep it when resuming)
#   STATE=DIR INIT=DIR INIT_SET="KEY=JSON ..." train.sh  # another architecture (it too ends by
#                                                         # replacing the packaged model)
#
# Then it exports the weights into the package and benches them. Data and init are rebuilt from
# their seeds, so nothing but the trainer's state needs committing.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-/tmp/sudoku-train}
STATE=${STATE:-training/sudoku/state}
ITERS=${ITERS:-4000}
INIT=${INIT:-$WORK/init}
read -r -a init_set <<< "${INIT_SET:-}"

[ -f "$WORK/data/train.jsonl" ] || mlxdg sudoku data "$WORK/data" --train 60000 --valid 200 --test 200 \
    --givens 45-50 --seed 100
# Always rebuilt (seconds, the same bits from the same seed): a kept one may predate the architecture.
mlxdg sudoku init "$INIT" --seed 0 "${init_set[@]/#/--set=}" > /dev/null

resume=()
[ -f "$STATE/adapters.safetensors" ] && resume=(--resume-adapter-file "$STATE/adapters.safetensors")
mlxdg lora --model "$INIT" --train --data "$WORK/data" --fine-tune-type full \
    --optimizer adamw --batch-size 16 --iters "$ITERS" --learning-rate 1e-3 \
    --lr-schedule "{\"name\": \"cosine_decay\", \"warmup\": 100, \"arguments\": [1e-3, $ITERS, 1e-4]}" \
    --steps-per-report 10 --steps-per-eval 200 --val-batches 4 --save-every 50 \
    --adapter-path "$STATE" --seed 0 "${resume[@]}"

python -m mlx_diffgemma.sudoku.checkpoint export "$INIT" "$STATE/adapters.safetensors" \
    mlx_diffgemma/sudoku/model
cp "$STATE/train_log.jsonl" mlx_diffgemma/sudoku/model/training_log.jsonl
mlxdg bench --task sudoku --fast --json mlx_diffgemma/sudoku/model/bench.json --plot training/sudoku/bench.png
mlxdg bench --task sudoku --fast --givens 36-46 --json training/sudoku/bench-36-46.json
