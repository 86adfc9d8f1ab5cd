#!/usr/bin/env bash
# The prepared GPU run (one device call): (1) both stages on CUDA over the tiny benchmark in fp32, compared
# with the CPU results made here by `BENCH=tiny bash run_demo.sh`; (2) the loss-tracking benchmark on SD v1.4's UNet;
# (3) the precision agreement of AbU on mini-AbC's validation split on CUDA (fp32 against bf16 and fp16);
# (4) the CLIs themselves on a random model of SD v1.4's shapes: both stages, exact and the recommended two-stage
# setting (no stage 1, one flip screened, keep the top K), bf16 and bf16 + compile, each with its steady-state rate read inside the run after its
# warm-up batches (benchmarks/cli_timing.py, utils/batch_clock.py); about 8 minutes by the 2026-11-28 H200 figures,
# not yet run (alone: SKIP_DEMO=1 SKIP_TRACKING=1 SKIP_AGREEMENT=1); (5) two-stage against exact AbU on mini-AbC's
# candidate pool at growing sizes up to the whole pool (benchmarks/two_stage_pool.py), the table rewritten after each model it
# finishes, POOL_SECONDS (default 240) in all. SKIP_DEMO, SKIP_TRACKING, SKIP_AGREEMENT, SKIP_CLI, SKIP_POOL skip a part.
# Carry data/tiny_abc, results/tiny (part 1), .whl (diffusers, which the machine lacks: a wheel, or the wheel's contents
# as a .tar.xz, a third of its size) and, for part 5, .carry (the pool's first rows packed by
# `python -m benchmarks.carry_pool pack --rows 20000`: the machine cannot reach npm to render them, and the pool's
# PNGs do not fit in a call's 64 MiB; `bash benchmarks/device_tree.sh slim` makes room, `restore` after). Part 5
# packs its per-model records into $OUT/two_stage_pool_records.tgz (a call brings back 8 files at most) and starts
# from those committed in benchmarks/results/h200_pool/ (unpack the tgz there to continue). On one H200 (2026-12-04)
# a model at N = 20,000 took 3-4 minutes after a minute of deriving and encoding: part 5 alone
# (SKIP_DEMO=1 SKIP_TRACKING=1 SKIP_AGREEMENT=1 SKIP_CLI=1 POOL_SIZES=20000 POOL_SECONDS=480) finishes 2-3 models a call;
# see docs/performance.md.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
if ls .whl/*.tar.xz >/dev/null 2>&1; then
  mkdir -p /tmp/site && for t in .whl/*.tar.xz; do tar xJf "$t" -C /tmp/site; done && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

if [[ -z "${SKIP_DEMO:-}" ]]; then
echo "== 1. tiny benchmark on CUDA vs CPU"
BENCH=tiny PYTHON=python3 RESULTS=results/tiny_cuda bash run_demo.sh --device cuda --precision fp32 > "$OUT/cuda_demo.log" 2>&1
echo "run_demo.sh --device cuda --precision fp32: exit $?"
tail -8 "$OUT/cuda_demo.log"
python3 - <<'PY'
import glob, pickle, numpy as np
from pathlib import Path
worst = 0.0
for f in sorted(glob.glob("results/tiny/orig_loss/*/*/*_loss.npy")):
    a, b = np.load(f), np.load(f.replace("results/tiny/", "results/tiny_cuda/"))
    worst = max(worst, float(np.abs(a - b).max()))
print(f"stage 1 losses, CPU vs CUDA: max |diff| {worst:.2e}")
for f in sorted(glob.glob("results/tiny/influence/**/influence.pkl", recursive=True)):
    a = pickle.loads(Path(f).read_bytes())
    b = pickle.loads(Path(f.replace("results/tiny/", "results/tiny_cuda/")).read_bytes())
    top = len(set(a["rank"][:5]) & set(b["rank"][:5])) / 5
    print(f"{f.split('influence/')[1]}: influence max |diff| {np.abs(a['influence'] - b['influence']).max():.2e}, "
          f"top-5 overlap {top:.1f}, query loss CPU {a['query_loss']} CUDA {b['query_loss']}")
PY
fi

if [[ -z "${SKIP_TRACKING:-}" ]]; then
echo "== 2. loss-tracking benchmark, SD v1.4 UNet (random weights)"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m benchmarks.loss_tracking --model sd14 --device cuda ${BENCH_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/benchmark_sd14.txt"
fi

if [[ -z "${SKIP_AGREEMENT:-}" ]]; then
echo "== 3. precision agreement on mini-AbC (val), CUDA"
python3 -m data.build_mini_abc --out data/mini_abc --stage derive --no_all_weights_fisher > "$OUT/derive.log" 2>&1
python3 -m benchmarks.precision_agreement --split val --precisions bf16,fp16 --device cuda > "$OUT/agreement.log" 2>&1
echo "precision_agreement.py: exit $?"; tail -8 "$OUT/agreement.log"
cp results/mini_abc/val/precision/agreement.md "$OUT/agreement_cuda_val.md" 2>/dev/null
fi

if [[ -z "${SKIP_CLI:-}" ]]; then
echo "== 4. the CLIs on a random SD v1.4-shaped model"
SD=/tmp/sd_shaped
python3 -m benchmarks.sd_shaped --out $SD --images ${CLI_IMAGES:-200} > "$OUT/sd_shaped.log" 2>&1 || { echo "sd_shaped.py failed"; tail -20 "$OUT/sd_shaped.log"; }
python3 -m benchmarks.cli_timing --bench $SD --images ${CLI_IMAGES:-200} --unlearn_steps ${CLI_STEPS:-5} \
  --rescore_top ${CLI_RESCORE:-10} \
  --runs "${CLI_RUNS:-1:bf16,2:bf16:exact,2:bf16:recommended,1:bf16 + compile,2:bf16 + compile:exact,2:bf16 + compile:recommended}" \
  2>&1 | tee "$OUT/cli_timing.md"
fi

if [[ -z "${SKIP_POOL:-}" ]]; then
echo "== 5. two-stage against exact AbU as the candidate pool grows (mini-AbC test, 8 queries)"
P=data/mini_abc/pool
[[ -f .carry/pool/pack.json && ! -d $P/laion_subset/images ]] && python3 -m benchmarks.carry_pool unpack
if [[ -d $P/laion_subset/images ]]; then
  for link in models synth exemplar json sd_fisher.pt; do [[ -e $P/$link || -L $P/$link ]] || ln -s ../abc/$link $P/$link; done
  python3 -m data.build_mini_abc --out data/mini_abc --stage derive --no_all_weights_fisher --device cuda > "$OUT/pool_derive.log" 2>&1
  python3 -m data.encode_candidates --dataroot $P --sd_version data/mini_abc/sd-mini --device cuda --batch_size 1024 \
    > "$OUT/pool_encode.log" 2>&1 || { echo "encoding the pool failed"; tail -5 "$OUT/pool_encode.log"; }
  # a later GPU session continues from the committed records (two_stage_pool.py skips the models they hold)
  [[ -d benchmarks/results/h200_pool/two_stage_pool_test ]] && cp -r benchmarks/results/h200_pool/two_stage_pool_test "$OUT/"
  timeout "${POOL_SECONDS:-240}" python3 -m benchmarks.two_stage_pool --split test --device cuda \
    --sizes "${POOL_SIZES:-1444,20000,all}" --results_dir /tmp/pool_runs --out "$OUT" > "$OUT/pool.log" 2>&1
  echo "two_stage_pool.py: exit $? (124: POOL_SECONDS ran out; the sizes finished are in the table)"
  tar czf "$OUT/two_stage_pool_records.tgz" -C "$OUT" two_stage_pool_test 2>/dev/null && rm -r "$OUT/two_stage_pool_test"
  cat "$OUT/two_stage_pool_test.md" 2>/dev/null || tail -20 "$OUT/pool.log"
else
  echo "no $P/laion_subset: build it here (python -m data.build_mini_abc --out data/mini_abc --stage pool) and carry it"
fi
fi
