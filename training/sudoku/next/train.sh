#!/usr/bin/env bash
# The next Sudoku model: ../train.sh's recipe (data, seed, schedule) with the sliding layers' RoPE
# base at 1696, so that one rotation repeats every 10 positions, the distance between the cells of a
# column. It resumes from the trainer state committed in next/state, and when done it replaces the
# packaged model and benches it, as ../train.sh does.
set -euo pipefail
export STATE=training/sudoku/next/state INIT=${WORK:-/tmp/sudoku-train}/init-next
export INIT_SET='rope_parameters={"sliding_attention":{"rope_type":"default","rope_theta":1696.0},"full_attention":{"rope_type":"proportional","partial_rotary_factor":0.25,"rope_theta":1000000.0}}'
exec "$(dirname "$0")/../train.sh"
