#!/usr/bin/env bash
# One GPU call of issue 15's block-speed comparisons: this tree's steps beside a baseline tree's, in one run on
# one card, every result packed into $OUT/bench.tgz as it lands (so a call cut short still brings back what ran).
# Usage, in the repo root on the GPU machine, with the baseline's src extracted beforehand into base/BASE_COMMIT
# (the device's copy has no git history: `mkdir -p base/C && git archive C src | tar -x -C base/C` here for each
# baseline C, then the calls):
#     OUT=<folder> bash benchmarks/block_speed_call.sh COMMIT BASE_COMMIT eager|compile [SECONDS]
# eager: the K=4 pretraining and the fine-tuning step of both trees (plain, and this tree's recompute mixer),
#        the scan backward's 16-channel tiles (scan_trees.py bwd_d16, bwd_d16_c4: the scan alone, and the
#        fine-tuning step on bwd_d16's tree), then this tree's profiled K=4 step;
# compile: the K=4 pretraining step of both trees under --compile (STAR and the ViT each compiled).
# The baseline's runs time STAR only (--no-vit): the ViT is the same timm model in both.
# COMMIT and BASE_COMMIT are the labels the rows are recorded with; give them literally. SECONDS (default 540)
# stops the steps left at that time, leaving the call time to pack.
set -uo pipefail
commit=${1:?usage: OUT=<folder> block_speed_call.sh COMMIT BASE_COMMIT eager|compile [SECONDS]}
base_commit=${2:?the baseline commit}
what=${3:?eager or compile}
seconds=${4:-540}
[[ $what == eager || $what == compile ]] || { echo "block_speed_call.sh: say eager or compile, not $what"; exit 2; }
: "${OUT:?set OUT to the folder the results go to}"
[ -d base/$base_commit/src/star ] || { echo "block_speed_call.sh: no base/$base_commit/src: extract it first"; exit 2; }
export PYTHONPATH=$PWD/src STAR_COMMIT=$commit PYTHONUNBUFFERED=1
b=/tmp/block_speed && rm -rf $b /tmp/block_speed_trees && mkdir -p $b
nvidia-smi -L > $b/gpu.txt
start=$SECONDS
pack() {  # written aside, then moved: a call killed while packing keeps the last whole archive
    echo "== $(( SECONDS - start ))s $*" >> $b/times.txt
    tar czf "$OUT/bench.tgz.part" -C /tmp block_speed && mv "$OUT/bench.tgz.part" "$OUT/bench.tgz"
}
# each step gets what is left of the call's seconds; none starts past them
timed() {
    local left=$(( seconds - (SECONDS - start) ))
    if (( left > 0 )); then
        timeout -k 5 $left "$@"
        local rc=$?
        if (( rc == 124 || rc == 137 )); then echo "   stopped at ${seconds}s" >> $b/times.txt
        elif (( rc != 0 )); then echo "   exited $rc" >> $b/times.txt; fi
    else
        echo "   skipped: past ${seconds}s" >> $b/times.txt
    fi
}
step() { timed python3 benchmarks/train_step.py --sizes base --impls triton "$@"; }
# the baseline's STAR rows; this tree's run times the ViT (the same timm model in both)
on_base() { PYTHONPATH=$PWD/base/$base_commit/src STAR_COMMIT=$base_commit "$@" --no-vit; }

eager() {
    pack pretrain; step --num-images 4 --recompute none mixer --out $b/pre > $b/pre.log 2>&1
    pack pretrain_base; on_base step --num-images 4 --out $b/pre_base > $b/pre_base.log 2>&1
    pack finetune; step --task finetune --recompute none mixer --out $b/ft > $b/ft.log 2>&1
    pack finetune_base; on_base step --task finetune --out $b/ft_base > $b/ft_base.log 2>&1
    pack trees; timed python3 benchmarks/scan_trees.py /tmp/block_speed_trees bwd_d16 bwd_d16_c4 > $b/trees.txt
    pack scan_variants; timed python3 benchmarks/scan_variants.py --trees main=. $(tr '\n' ' ' < $b/trees.txt) \
        --out $b/var > $b/var.log 2>&1
    pack finetune_bwd_d16; PYTHONPATH=/tmp/block_speed_trees/bwd_d16/src STAR_COMMIT=$commit+bwd_d16 \
        step --task finetune --no-vit --out $b/ft_d16 > $b/ft_d16.log 2>&1
    pack profile; step --num-images 4 --profile --out $b/prof > $b/prof.log 2>&1
}

compile() {
    pack pretrain_compile; step --num-images 4 --compile --out $b/pre_compile > $b/pre_compile.log 2>&1
    pack pretrain_compile_base; on_base step --num-images 4 --compile --out $b/pre_compile_base \
        > $b/pre_compile_base.log 2>&1
}

$what
pack done
