#!/usr/bin/env bash
# One GPU call of the Fashion-MNIST study: one shard per visible GPU, each running the unfinished units that
# fit its budget, then one archive per shard in $OUT (fm0.tgz, fm1.tgz, ...) to bring home with
# `python -m experiments.fashion_mnist.study merge --returned fm*.tgz` before the next call.
# Usage, in the repo root on the GPU machine:
#     OUT=<folder> bash experiments/fashion_mnist/gpu_call.sh COMMIT [BUDGET_MIN]
# Fashion-MNIST's four .gz files are read from $STAR_DATA, by default .fmnist in the repo root. Exits 0 when
# every shard ended well (done, or stopped by its budget with work left), else with the first failing status.
set -uo pipefail
start=$SECONDS
commit=${1:?usage: OUT=<folder> gpu_call.sh COMMIT [BUDGET_MIN]}
if [[ $commit =~ ^[0-9a-f]{40}$ ]]; then commit=${commit:0:7}; fi  # recorded short, as git_commit() does
budget=${2:-9.4}
: "${OUT:?set OUT to the folder the results go to}"
export PYTHONPATH=$PWD/src STAR_DATA=${STAR_DATA:-$PWD/.fmnist} STAR_COMMIT=$commit TQDM_DISABLE=1 PYTHONUNBUFFERED=1
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())") || exit 1
if [ "$gpus" -lt 1 ]; then echo "gpu_call.sh: no CUDA device visible to torch" >&2; exit 1; fi
IFS=, read -ra ids <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((gpus - 1)))}"  # the GPUs this call may use
# Units are planned to end within the budget, counted from each shard's start; one that overruns its estimate
# is stopped 25 s past the budget, counted from this script's start, leaving time to pack the results.
deadline=$(python3 -c "print(int($budget * 60 + 25))")
pids=()
for ((g = 0; g < gpus; g++)); do
    mkdir -p "$OUT/fm$g" && cp -r experiments/fashion_mnist/{results.json,curves,figures} "$OUT/fm$g/"
    cp experiments/fashion_mnist/results.json "$OUT/fm$g/start.json"  # what the shard started from, for merge
    CUDA_VISIBLE_DEVICES=${ids[g]} timeout -k 5 $((deadline - (SECONDS - start))) \
        python3 -m experiments.fashion_mnist.study run --next --shard "$g/$gpus" --budget-min "$budget" \
        --out "$OUT/fm$g" --runs "/tmp/fmruns$g" > "$OUT/log$g.txt" 2>&1 &
    pids+=($!)
done
status=0
for ((g = 0; g < gpus; g++)); do
    wait "${pids[g]}"; rc=$?
    case $rc in
        3) why=" (stopped by its budget, work left)" ;;
        124) why=" (killed at the deadline: its unit is lost)" ;;
        *) why="" ;;
    esac
    echo "shard $g/$gpus: exit $rc$why"
    if [ $rc != 0 ] && [ $rc != 3 ] && [ $status = 0 ]; then status=$rc; fi
done
cd "$OUT" && for ((g = 0; g < gpus; g++)); do tar czf "fm$g.tgz" "fm$g" && rm -rf "fm$g"; done
exit $status
