#!/usr/bin/env bash
# A lent GPU's call carries the working tree and the paths it names, 64 MiB in all, and it counts every file the
# checked-out commit tracks (untracking in the index alone is not enough: seen refused 2026-12-04). mini-AbC's tree
# is about 58 MiB, so the pool that gpu_check.sh part 5 measures (benchmarks/carry_pool.py, 13.6 MiB for 20,000
# rows) does not fit beside it. `slim` checks out a throw-away branch, device-slim, whose one commit untracks (and
# ignores) what part 5 does not read: the judge, the counterfactual truth, figures, the models that are no test
# case's first; the files stay on disk. `restore` goes back to the branch you were on and deletes device-slim.
# Nothing reaches main: run `restore` right after the call and check `git status`.
#   bash benchmarks/device_tree.sh slim     # then the device call, carrying .carry and .whl (about 57 MiB in all)
#   bash benchmarks/device_tree.sh restore
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP_MODELS="artchive/emojione_monotone bamfg/duotone_0 imagenet/1f62c_grimacing_face imagenet/1f635_face_with_crossed_out_eyes"
EXCLUDE=.git/info/exclude
BEGIN="# device_tree.sh slim: begin"
END="# device_tree.sh slim: end"
paths() {
  echo data/mini_abc/judge data/mini_abc/counterfactual data/mini_abc/grids docs/images benchmarks/results/mini_abc \
    data/mini_abc_build/sets_sheet.png data/mini_abc/abc/synth/looks_style data/mini_abc/abc/synth/looks_object
  for m in $(git ls-files data/mini_abc/abc/models | cut -d/ -f5,6 | sort -u); do
    [[ " $KEEP_MODELS " == *" $m "* ]] || echo "data/mini_abc/abc/models/$m"
  done
}
case "${1:-}" in
  slim)
    [[ -z "$(git status --porcelain --untracked-files=no)" ]] || { echo "error: commit or stash your changes first" >&2; exit 2; }
    git rev-parse --abbrev-ref HEAD > .git/device_tree_branch
    git checkout -q -b device-slim
    mkdir -p .git/info && echo "$BEGIN" >> $EXCLUDE  # a pattern line cannot carry a comment: marker lines around
    for p in $(paths); do git rm -r -q --cached "$p"; echo "/$p" >> $EXCLUDE; done
    echo "$END" >> $EXCLUDE
    git commit -q -m "device-slim: throw-away, for one device call (benchmarks/device_tree.sh)"
    git ls-files -z | du -cb --files0-from=- | tail -1 | awk '{printf "tracked now: %.1f MiB\n", $1 / 2^20}'
    ;;
  restore)
    git checkout -q "$(cat .git/device_tree_branch)" && git branch -q -D device-slim && rm .git/device_tree_branch
    sed -i "/^$BEGIN\$/,/^$END\$/d" $EXCLUDE
    git status --short | head
    ;;
  *) echo "usage: bash benchmarks/device_tree.sh slim|restore" >&2; exit 2 ;;
esac
