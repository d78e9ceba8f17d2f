#!/usr/bin/env bash
# One GPU call of the long Fashion-MNIST study (long.py): the next units and fine-tunes that fit the budget, then
# long.tgz and the new encoders' files in $OUT, to bring home with
# `python -m experiments.fashion_mnist.long merge --returned <the call's folder>` before the next call.
# Usage, in the repo root on the GPU machine (Fashion-MNIST's .gz files in $STAR_DATA, by default .fmnist):
#     OUT=<folder> bash experiments/fashion_mnist/long_call.sh COMMIT [BUDGET_MIN [units|finetunes|all [RUN_ARGS...]]]
# COMMIT is the commit the results are recorded with: give it literally (the device's copy has no true git
# history). The encoders the call needs (last-snapshot evaluations, fine-tunes) travel in
# experiments/fashion_mnist/long/carry: fill it with `long.py stage` and name it in the call's carry (one
# encoder is 20 MB, beside 30 MB of Fashion-MNIST, in the device's 64 MiB). RUN_ARGS go to `long.py run` as they
# are (e.g. --rebuild, --ft-arms arm_k1).
# Chaining calls on one warm machine (it is given back 30 s after a call ends, too soon to merge and stage at home
# in between): every call leaves its new encoders in the machine's carry folder (listed in carry/.from_machine),
# where a later call finds them unless it carries that folder itself, and FROM_MACHINE=1 starts a call from the
# previous call's results on the machine instead of the tree's. A call that does not start from them drops
# them: they belong to records it does not have. Merge the calls' folders at home (in any order).
set -uo pipefail
commit=${1:?usage: OUT=<folder> long_call.sh COMMIT [BUDGET_MIN [units|finetunes|all [RUN_ARGS...]]]}
if [[ $commit =~ ^[0-9a-f]{40}$ ]]; then commit=${commit:0:7}; fi  # recorded short, as git_commit() does
budget=${2:-9.2}
only=${3:-all}  # one stage alone (long.py run --only), or all
[ "$only" = all ] && only= || only="--only $only"
shift $(( $# < 3 ? $# : 3 ))  # what is left goes to long.py run
: "${OUT:?set OUT to the folder the results go to}"
export PYTHONPATH=$PWD/src STAR_DATA=${STAR_DATA:-$PWD/.fmnist} STAR_COMMIT=$commit TQDM_DISABLE=1 PYTHONUNBUFFERED=1
work=/tmp/long
from=experiments/fashion_mnist/long  # what the call starts from: the tree's results, or (below) the machine's
carry=experiments/fashion_mnist/long/carry
keep_encoders() {  # the call's new encoders (in folder $1) for a later call on this machine
    compgen -G "$1/enc-*" > /dev/null || return 0
    mkdir -p $carry && cp "$1"/enc-* $carry/ && (cd "$1" && ls enc-*) >> $carry/.from_machine
}
if [ "${FROM_MACHINE:-0}" = 1 ]; then
    [ -f $work/results.json ] || { echo "long_call.sh: FROM_MACHINE=1, but no earlier call left its results"; exit 2; }
    rm -rf /tmp/long_previous && mv $work /tmp/long_previous && from=/tmp/long_previous
    keep_encoders $from/encoders  # again: that call may have been stopped before it kept them
elif [ -f $carry/.from_machine ]; then
    (cd $carry && xargs rm -f < .from_machine && rm .from_machine)
fi
rm -rf $work /tmp/longruns && mkdir -p $work  # a warm machine keeps an earlier call's files
for name in results.json curves figures; do
    [ -e $from/$name ] && cp -r $from/$name $work/
done
[ -f $work/results.json ] || echo '{}' > $work/results.json
cp $work/results.json $work/start.json  # what the call started from, for merge
# a unit that overruns its estimate is stopped 20 s past the budget, leaving time to pack what is done
timeout -k 5 "$(python3 -c "print(int($budget * 60 + 20))")" python3 -m experiments.fashion_mnist.long run \
    --budget-min "$budget" --out $work --runs /tmp/longruns --encoders "$PWD/$carry" \
    $only "$@" > "$OUT/log.txt" 2>&1
rc=$?
python3 -m experiments.fashion_mnist.long pack --out $work --dest "$OUT" || exit 1
keep_encoders $work/encoders
echo "long_call.sh: run exited $rc (3: stopped by its budget with work left; 124: killed at the deadline)"
exit $rc
