#!/usr/bin/env bash
# Download the AbC benchmark data and the paper's task list (layout: docs/method.md, section 2).
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
SEVEN_ZIP="${SEVEN_ZIP:-7z}"
TASKS_OUT="${ABC_TASKS_OUT:-$REPO_ROOT/tasks/all_tasks.json}"
DEFAULT_TASKS_URL="https://raw.githubusercontent.com/PeterWang512/AttributeByUnlearning/191b6bfeaed016b7b8c85fe7cfa013ddc3324dd9/custom_diffusion/tasks/all_tasks.json"
ALL_STEPS="check hub extract tasks verify"
DATAROOT="data/abc"; ONLY=""; TASKS_SOURCE=""; STEP="setup"

usage() {
  cat <<EOF
usage: bash data/download_abc.sh [--dataroot DIR] [--only STEP[,STEP]] [--tasks-source URL_OR_FILE] [-h|--help]

Steps, in order (default: all):
  check    7z (\$SEVEN_ZIP, default 7z) and python's huggingface_hub are present (run when hub/extract are)
  hub      snapshot_download of HF datasets sywang/GenDataAttribution and sywang/AttributeByUnlearning (abc/*)
  extract  unpack the multi-part 7z archives X/X.7z.001 into DIR, then delete the parts
  tasks    fetch the paper's 400-query task list into \$ABC_TASKS_OUT (default tasks/all_tasks.json)
  verify   check that DIR holds everything the scripts read
--dataroot DIR          data folder (default data/abc)
--tasks-source SRC      URL or local file for the task list (default: the authors' repository, pinned commit)
Finished hub/extract steps leave DIR/.download_done_<step>; reruns skip them (delete the marker to redo).
Environment: PYTHON (default python), SEVEN_ZIP (default 7z), ABC_TASKS_OUT.
EOF
}

die() { echo "error in step '$STEP': $*" >&2; exit 1; }
trap 'echo "error in step $STEP (line $LINENO): see the message above; fix it and rerun (finished steps are skipped)" >&2' ERR

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dataroot) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; DATAROOT="$2"; shift 2 ;;
    --only) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; ONLY="$2"; shift 2 ;;
    --tasks-source) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; TASKS_SOURCE="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

STEPS="$ALL_STEPS"
if [[ -n "$ONLY" ]]; then
  STEPS=""
  for s in ${ONLY//,/ }; do
    [[ " $ALL_STEPS " == *" $s "* ]] || { echo "unknown step '$s' in --only; steps: $ALL_STEPS" >&2; exit 2; }
  done
  for s in $ALL_STEPS; do
    if [[ ",$ONLY," == *",$s,"* ]]; then STEPS="$STEPS $s"; fi
  done
fi
selected() { [[ " $STEPS " == *" $1 "* ]]; }
marker() { echo "$DATAROOT/.download_done_$1"; }
pending() { selected "$1" && [[ ! -f "$(marker "$1")" ]]; }

# --- check -------------------------------------------------------------------
if selected check || pending hub || pending extract; then
  STEP=check
  if selected check || pending extract; then
    command -v "$SEVEN_ZIP" >/dev/null 2>&1 || die "7z binary '$SEVEN_ZIP' not found (needed to unpack the archives).
  Install it with 'sudo apt install p7zip-full' or 'micromamba install -c conda-forge p7zip', or set SEVEN_ZIP=/path/to/7z."
  fi
  if selected check || pending hub; then
    "$PY" -c "import huggingface_hub" 2>/dev/null || die "'$PY' cannot import huggingface_hub; run 'pip install -r requirements.txt'."
  fi
  echo "check: ok"
fi

# --- hub ---------------------------------------------------------------------
if selected hub; then
  STEP=hub
  if [[ -f "$(marker hub)" ]]; then echo "skip hub: done earlier; delete $(marker hub) to redo"
  else
    mkdir -p "$DATAROOT"
    echo "hub: downloading into $DATAROOT (large; an interrupted download resumes on rerun)"
    "$PY" - "$DATAROOT" <<'EOF' || die "download from Hugging Face failed (network, disk space, or rate limit?); rerun to resume"
import os, shutil, sys
from pathlib import Path
from huggingface_hub import snapshot_download

root = Path(os.path.abspath(sys.argv[1]))
cache = root / ".hf_cache"
snapshot_download(repo_id="sywang/GenDataAttribution", repo_type="dataset", local_dir=root, cache_dir=cache,
                  allow_patterns=["exemplar/*", "synth_test/*", "laion_subset/*", "models_test/*", "json/test_*",
                                  "imagenet_class_to_categories.json", "path_to_prompts.json"])

def merge(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = dst / item.name
        if item.is_dir() and target.is_dir():
            merge(item, target)
        else:
            os.replace(item, target)

abu = dict(repo_id="sywang/AttributeByUnlearning", repo_type="dataset", allow_patterns=["abc/*"], cache_dir=cache)
if root.name == "abc":  # the repo's files live under abc/, which is then the dataroot itself
    snapshot_download(local_dir=root.parent, **abu)
else:
    staging = root.parent / (root.name + ".abu_download")
    snapshot_download(local_dir=staging, **abu)
    if not (staging / "abc").is_dir():
        sys.exit(f"{staging} has no abc/ folder after the download")
    merge(staging / "abc", root)
    shutil.rmtree(staging)
EOF
    touch "$(marker hub)"; echo "hub: done"
  fi
fi

# --- extract -----------------------------------------------------------------
if selected extract; then
  STEP=extract
  if [[ -f "$(marker extract)" ]]; then echo "skip extract: done earlier; delete $(marker extract) to redo"
  else
    extracted=0
    for x in exemplar synth_test laion_subset models_test laion_latents_text_embeddings; do
      first="$DATAROOT/$x/$x.7z.001"
      if [[ ! -f "$first" ]]; then echo "extract: no $first (already extracted, or not downloaded)"; continue; fi
      echo "extract: $first"
      "$SEVEN_ZIP" x -y -o"$DATAROOT" "$first" || die "7z failed on $first; the parts are kept.
  Check free disk space and rerun; if a part is damaged, delete $DATAROOT/$x and $(marker hub) and rerun to download it again."
      rm -f "$DATAROOT/$x/$x.7z."*; extracted=$((extracted + 1))
      case "$x" in synth_test|models_test|laion_latents_text_embeddings)
        rmdir "$DATAROOT/$x" 2>/dev/null || echo "extract: note: $DATAROOT/$x is not empty, kept" ;;
      esac
    done
    if [[ $extracted -gt 0 ]]; then touch "$(marker extract)"; echo "extract: done ($extracted archive(s))"
    else echo "extract: no archive found in $DATAROOT (run the hub step first?); no marker written"; fi
  fi
fi

# --- tasks -------------------------------------------------------------------
validate_tasks() {  # $1: task file, $2: required number of entries (0: any), $3: name shown in messages
  PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
import sys
from utils.io import InputError
from utils.tasks import TEST_CASES, load_tasks
try:
    tasks = load_tasks(sys.argv[1])
except InputError as e:
    sys.exit(str(e).replace(sys.argv[1], sys.argv[3]))
n = len(tasks)
unknown = sorted({t.test_case for t in tasks} - set(TEST_CASES))
if unknown:  # the paper'"'"'s list covers AbC'"'"'s four test cases and nothing else
    sys.exit(f"task file {sys.argv[3]} names unknown test_case(s) {unknown}; AbC has {list(TEST_CASES)}")
if int(sys.argv[2]) and n != int(sys.argv[2]):
    sys.exit(f"task file {sys.argv[3]} has {n} entries, expected {sys.argv[2]}")
' "$1" "$2" "${3:-$1}"
}

if selected tasks; then
  STEP=tasks
  if [[ -f "$TASKS_OUT" ]] && validate_tasks "$TASKS_OUT" 0 2>/dev/null; then
    echo "skip tasks: $TASKS_OUT exists and is valid; delete it to fetch again"
  else
    if [[ -f "$TASKS_OUT" ]]; then echo "tasks: $TASKS_OUT exists but is invalid; fetching it again"; fi
    src="${TASKS_SOURCE:-$DEFAULT_TASKS_URL}"; want=0
    if [[ -z "$TASKS_SOURCE" ]]; then want=400; fi
    mkdir -p "$(dirname "$TASKS_OUT")"
    tmp="$TASKS_OUT.tmp.$$"
    trap 'rm -f "$tmp"' EXIT
    "$PY" - "$src" "$tmp" <<'EOF' || die "could not fetch the task list from $src"
import shutil, sys, urllib.request
src, out = sys.argv[1], sys.argv[2]
try:
    if src.startswith(("http://", "https://")):
        with urllib.request.urlopen(src, timeout=60) as r, open(out, "wb") as f:
            shutil.copyfileobj(r, f)
    else:
        shutil.copyfile(src, out)
except Exception as e:
    sys.exit(f"{type(e).__name__}: {e}")
EOF
    validate_tasks "$tmp" "$want" "$src" || die "the task list from $src is invalid (message above); nothing written"
    mv "$tmp" "$TASKS_OUT"
    echo "tasks: wrote $TASKS_OUT"
  fi
fi

# --- verify ------------------------------------------------------------------
if selected verify; then
  STEP=verify
  missing=0
  for d in exemplar synth models laion_subset/images; do
    [[ -d "$DATAROOT/$d" && -n "$(ls -A "$DATAROOT/$d" 2>/dev/null)" ]] || { echo "missing or empty folder: $DATAROOT/$d" >&2; missing=1; }
  done
  for f in laion_subset/captions.txt json/test_artchive.json json/test_bamfg.json json/test_observed_imagenet.json \
           json/test_unobserved_imagenet.json laion_latents.npy laion_text_embeddings.npy; do
    [[ -f "$DATAROOT/$f" ]] || { echo "missing file: $DATAROOT/$f" >&2; missing=1; }
  done
  [[ -f "$DATAROOT/sd_fisher.pt" ]] || echo "warning: $DATAROOT/sd_fisher.pt is missing; build it with 'python compute_fisher.py --dataroot $DATAROOT'" >&2
  [[ $missing -eq 0 ]] || die "$DATAROOT is incomplete (list above); rerun 'bash data/download_abc.sh --dataroot $DATAROOT'"
  echo "verify: $DATAROOT is complete"
fi

if [[ -f "$(marker hub)" && -f "$(marker extract)" ]]; then rm -rf "$DATAROOT/.hf_cache"; fi
