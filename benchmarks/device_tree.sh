#!/usr/bin/env bash
# A lent GPU's call carries the whole working tree (tracked files and untracked ones git does not ignore) and the
# paths it names, 64 MiB in all; mini-AbC's tree is about 58 MiB, so the pool that gpu_check.sh part 5 measures
# (benchmarks/carry_pool.py, about 17 MiB for 20,000 rows) does not fit beside it. `slim` takes out of git's index,
# and ignores, what part 5 does not read (the judge, the counterfactual truth, figures, the models no first test
# model needs); the files stay on disk. `restore` puts them back in the index. Nothing is committed either way:
# run `restore` right after the call, before any commit, and check `git status` is clean.
#   bash benchmarks/device_tree.sh slim     # then the device call, carrying .carry and .whl
#   bash benchmarks/device_tree.sh restore
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP_MODELS="artchive/emojione_monotone bamfg/duotone_0 imagenet/1f62c_grimacing_face imagenet/1f635_face_with_crossed_out_eyes"
EXCLUDE=.git/info/exclude
MARK="# device_tree.sh slim"
paths() {
  echo data/mini_abc/judge data/mini_abc/counterfactual data/mini_abc/grids docs/images benchmarks/results/mini_abc \
    data/mini_abc_build/sets_sheet.png data/mini_abc/abc/synth/looks_style data/mini_abc/abc/synth/looks_object
  for m in $(git ls-files data/mini_abc/abc/models | cut -d/ -f5,6 | sort -u); do
    [[ " $KEEP_MODELS " == *" $m "* ]] || echo "data/mini_abc/abc/models/$m"
  done
}
case "${1:-}" in
  slim)
    mkdir -p .git/info
    for p in $(paths); do git rm -r -q --cached "$p"; echo "/$p $MARK" >> $EXCLUDE; done
    git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | awk '{printf "the tree now: %.1f MiB\n", $1 / 2^20}'
    ;;
  restore)
    git reset -q -- $(grep "$MARK" $EXCLUDE | cut -d' ' -f1 | sed 's|^/||')
    sed -i "/$MARK/d" $EXCLUDE
    git status --short | head
    ;;
  *) echo "usage: bash benchmarks/device_tree.sh slim|restore" >&2; exit 2 ;;
esac
