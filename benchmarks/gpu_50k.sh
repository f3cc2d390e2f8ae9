#!/usr/bin/env bash
# Issue 11's GPU measurements in one lease: the default `detect` (LoRA on a GPU) on all 50,000 CIFAR-10
# train images at sym:0.4 and asym:0.4, seed 0, side by side on one GPU. The baselines they are judged
# against (fair cleanlab / kNN / small-loss on the same frozen features, seed 0) are measured on the CPU
# beforehand and tracked in benchmarks/results/fair-50k/, so no device time goes to them.
#
# Why three steps: what travels with one device call is capped at 64 MiB, and the fp16 backbone (57 MB)
# and the images (15 MB) do not fit together. A warm machine keeps /root/stage between calls.
#
#   here:           bash benchmarks/gpu_50k.sh prepare        # .stage/ and .whl/ (ignored by git)
#   device call 1:  bash benchmarks/gpu_50k.sh stage          carry: .stage/offline .whl       (~1 min)
#   device call 2:  bash benchmarks/gpu_50k.sh run            carry: .stage/data   timeout_s 600
#   device call 3:  bash benchmarks/gpu_50k.sh collect        only if `run` says the runs go on
#
# Make each call at once after the last (a machine idle for 30 s is given back, with the stage).
# `run` starts both detect runs under setsid, so they outlive the call; it returns the finished records
# and logs under $OUT before its deadline (DEADLINE_S, default 540 s) and says whether to `collect`.
# Budget (H100 figures, docs/benchmarks.md): LoRA at batch 64 trains at ~930 img/s alone, 10 epochs of
# 50k ≈ 540 s, plus ~40 s decode; two side by side share a GPU that batch 64 leaves half idle.
#
# Rehearse it on the CPU at tiny scale before a lease (.stage/ from `prepare`):
#   STAGE=/tmp/stage OUT=/tmp/out DEVICE=cpu SUBSET=200 DEFT_OPTS=peft=lora,epochs=2 DEADLINE_S=30 \
#       bash benchmarks/gpu_50k.sh stage && ... run && ... collect
# NOISES="sym:0.4" runs one setting alone (a lease that must end inside one call).
set -euo pipefail

STAGE=${STAGE:-/root/stage}
OUT=${OUT:?OUT must name the folder whose files come back}
DEVICE=${DEVICE:-cuda}
SUBSET=${SUBSET:-}
DEFT_OPTS=${DEFT_OPTS:-}
DEADLINE_S=${DEADLINE_S:-540}
read -ra NOISES <<<"${NOISES:-sym:0.4 asym:0.4}"
REPO=$(cd "$(dirname "$0")/.." && pwd)

prepare() {
    cd "$REPO"
    rm -rf .stage .whl && mkdir -p .stage/data/cifar10 .whl
    deft-clean export-backbone --model offline --half --out .stage/offline
    cp ../shared/data/cifar10/train.parquet ../shared/data/cifar10/classes.txt .stage/data/cifar10/
    # open_clip and its two small needs are the only packages the GPU image lacks (KINDS.md)
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
    du -sh .stage/offline .whl .stage/data
}

stage() {
    mkdir -p "$STAGE"
    cp -r "$REPO/.stage/offline" "$STAGE/"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$STAGE/site" "$REPO"/.whl/*.whl
    echo "staged: $(du -sh "$STAGE" | cut -f1) in $STAGE; next: 'run' at once"
}

require_stage() {
    if [[ ! -d $STAGE/offline || ! -d $STAGE/site ]]; then
        echo "no stage in $STAGE: the machine was replaced; call 'stage' again, then 'run'" >&2
        exit 3
    fi
    export PYTHONPATH="$STAGE/site:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
}

start_runs() {
    cp -r "$REPO/.stage/data" "$STAGE/"
    mkdir -p "$STAGE/logs"
    export DEFT_CLEAN_CACHE=$STAGE/cache  # decoded images (7.5 GB per run at 50k) stay on the stage
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
    python3 -c "import deft_clean, open_clip, peft, torch; print('torch', torch.__version__, \
'open_clip', open_clip.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
    for noise in "${NOISES[@]}"; do
        local name=${noise/:/-}
        setsid nohup python3 -m benchmarks.run --dataset cifar10 --noise "$noise" --method deft --seed 0 \
            ${SUBSET:+--subset "$SUBSET"} --data-root "$STAGE/data" --cache-dir "$STAGE/bc-$name" \
            --results-dir "$STAGE/results" --model offline --pretrained "local-dir:$STAGE/offline" \
            --device "$DEVICE" ${DEFT_OPTS:+--deft-opts "$DEFT_OPTS"} \
            >"$STAGE/logs/$name.log" 2>&1 </dev/null &
        echo $! >"$STAGE/logs/$name.pid"
    done
    date +%s >"$STAGE/logs/started"
    echo "started ${NOISES[*]} at $(date -u +%T)"
}

running() {
    local pid count=0
    for pid in "$STAGE"/logs/*.pid; do
        kill -0 "$(cat "$pid")" 2>/dev/null && count=$((count + 1))
    done
    echo "$count"
}

wait_and_return() {
    if [[ ! -f $STAGE/logs/started ]]; then
        echo "no runs were started in $STAGE: call 'run'" >&2
        exit 3
    fi
    local end=$((SECONDS + DEADLINE_S))
    while (($(running) > 0 && SECONDS < end)); do
        sleep 10
        echo "$(date -u +%T) running: $(running)"
        for log in "$STAGE"/logs/*.log; do
            echo "  $(basename "$log" .log): $(tail -n1 "$log" | cut -c1-110)"
        done
    done
    local elapsed=$(($(date +%s) - $(cat "$STAGE/logs/started")))
    # the records, the logs and each finished run's flags (a few MB at 50k), for any later analysis
    (cd "$STAGE" && find logs results bc-*/*/deft-flags -name '*.log' -o -name '*.json' -o -name '*.parquet' \
        2>/dev/null | tar -czf "$OUT/gpu50k.tar.gz" -T -)
    if (($(running) > 0)); then
        echo "after ${elapsed}s $(running) run(s) still going: call 'collect' at once"
    else
        echo "every run ended after ${elapsed}s"
        shopt -s nullglob
        python3 -m benchmarks.report "$STAGE"/results/*.json "$REPO"/benchmarks/results/fair-50k/*.json \
            | tee "$OUT/report.md"
    fi
}

case "${1:-}" in
    prepare) prepare ;;
    stage) stage ;;
    run) require_stage && start_runs && wait_and_return ;;
    collect) require_stage && wait_and_return ;;
    *) echo "usage: $0 prepare|stage|run|collect (see the header)" >&2 && exit 2 ;;
esac
