#!/usr/bin/env bash
# AbU on one mini-AbC query, from a fresh clone, in about 2 minutes on 2 CPU cores: derive the arrays that are
# not committed (once), cache the model's pre-unlearning losses, unlearn the query, rank, score, and print
# where the picture (query + top 10) is. Settings are the comparison's (benchmarks/mini_abc_comparison.py).
#   bash run_demo.sh                 # mini-AbC (default)
#   BENCH=tiny bash run_demo.sh      # the random tiny benchmark: every step and output, meaningless rankings
# Flags after the script name go to both stages (e.g. --device cuda, --overwrite); RESULTS=dir moves the outputs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

if [[ ${BENCH:-mini} == tiny ]]; then
  B=data/tiny_abc
  RES=${RESULTS:-results/tiny}
  [[ -f $B/abc/sd_fisher.pt ]] || $PY -m data.build_tiny_abc --out $B
  COMMON=(--sd_version $B/sd-tiny --dataroot $B/abc --task_json $B/tasks.json --result_dir "$RES"
          --laion_subset_size 12)
  # 12 LAION-like images: B = 20 pairs of (candidate, timestep) with T = 5 timesteps, in both stages
  $PY compute_training_loss.py "${COMMON[@]}" --batch_size 20 --time_samples 5 "$@"
  # N = 1000 instead of LAION-400M: the tiny model's Fisher is on another scale (see README)
  $PY compute_influence.py "${COMMON[@]}" --loss_batch_size 20 --loss_time_samples 5 \
    --fisher_dataset_size 1000 --unlearn_steps 20 "$@"
  $PY evaluate.py --task_json $B/tasks.json --result_dir "$RES" --dataroot $B/abc
  echo "pictures: $RES/influence/*/gpt/*/samples/*/visualization.jpg"
  exit 0
fi

B=data/mini_abc
RES=${RESULTS:-results/mini_abc/demo}
TASKS=$B/tasks/demo.json
# laion_latents.npy, laion_text_embeddings.npy and sd_fisher.pt are derived here on first use (~1 min)
$PY -m data.build_mini_abc --out $B --stage derive --no_all_weights_fisher
COMMON=(--sd_version $B/sd-mini --dataroot $B/abc --task_json $TASKS --result_dir "$RES" --laion_subset_size 600)
$PY compute_training_loss.py "${COMMON[@]}" --batch_size 240 --time_samples 3 "$@"
# N is the mini-AbC value chosen on the validation split (docs/mini_abc.md); the sizing is the comparison's
$PY compute_influence.py "${COMMON[@]}" --loss_batch_size 240 --loss_time_samples 3 \
  --fisher_dataset_size 100000 --unlearn_steps 25 --unlearn_grad_accum_steps 4 "$@"
$PY evaluate.py --task_json $TASKS --result_dir "$RES" --dataroot $B/abc
echo "picture (query, then its top 10; exemplars outlined in red): $(ls "$RES"/influence/*/gpt/*/samples/*/visualization.jpg)"
