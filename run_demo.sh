#!/usr/bin/env bash
# The whole method on the embedded tiny benchmark, in about a minute on a laptop CPU:
# build it (once), cache pre-unlearning losses, unlearn each query and rank, then score.
# The tiny model is random, so its rankings mean nothing; it shows every step and output.
# Flags after the script name go to both stages (e.g. --device cuda, --overwrite); RESULTS=dir moves the outputs.
set -euo pipefail
cd "$(dirname "$0")"
BENCH=data/tiny_abc
PY=${PYTHON:-python}
[[ -f $BENCH/abc/sd_fisher.pt ]] || $PY data/build_tiny_abc.py --out $BENCH
COMMON=(--sd_version $BENCH/sd-tiny --dataroot $BENCH/abc --task_json $BENCH/tasks.json
        --result_dir "${RESULTS:-results/tiny}" --laion_subset_size 12)
# 12 LAION-like images: B = 20 pairs of (candidate, timestep) with T = 5 timesteps, in both stages
$PY compute_training_loss.py "${COMMON[@]}" --batch_size 20 --time_samples 5 "$@"
# N = 1000 instead of LAION-400M: the tiny model's Fisher is on another scale (see README)
$PY compute_influence.py "${COMMON[@]}" --loss_batch_size 20 --loss_time_samples 5 \
  --fisher_dataset_size 1000 --unlearn_steps 20 "$@"
$PY evaluate.py --task_json $BENCH/tasks.json --result_dir "${RESULTS:-results/tiny}"
echo "pictures: ${RESULTS:-results/tiny}/influence/*/gpt/*/samples/*/visualization.jpg"
