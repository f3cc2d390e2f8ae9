#!/usr/bin/env bash
# Issue 11's GPU measurements: the default `detect` (LoRA, as --peft auto chooses on a GPU) on all 50,000
# CIFAR-10 train images, seed 0: sym:0.4 by default (the headline target), NOISES="sym:0.4 asym:0.4" for
# both side by side. The baselines they are judged against (inner-CV cleanlab and chosen-k kNN on the same
# frozen features and the same seed-0 noise) are measured on the CPU beforehand and tracked in
# benchmarks/results/fair-50k/, so no device time goes to them.
#
# Why several calls: what travels with one device call is capped at 64 MiB, and the fp16 backbone (55 MB)
# and the images (15 MB) do not fit together. A warm machine keeps /root/stage between calls.
#
#   here:           bash benchmarks/gpu_50k.sh prepare        # .stage/ and .whl/ (ignored by git)
#   device call 1:  bash benchmarks/gpu_50k.sh stage          carry: .stage/offline .whl    (~30 s + start)
#   device call 2:  bash benchmarks/gpu_50k.sh run            carry: .stage/data            timeout_s 600
#   device call 3:  DEADLINE_S=... bash benchmarks/gpu_50k.sh collect    if call 2 says the runs go on
#
# Make each call at once after the last (a machine idle for 30 s is given back, with the stage). `run`
# starts the runs under setsid, so they outlive the call, and returns the finished records and logs under
# $OUT by DEADLINE_S (default 540 s). Before `collect`, read `status` and set DEADLINE_S to the device
# time left minus a minute. The logs have one line per finished phase with its clock time: the gaps
# between the epoch lines (which include each epoch's scoring pass) give the pace.
#
# Rehearse it on the CPU at tiny scale before a lease (.stage/ from `prepare`):
#   export STAGE=/tmp/stage OUT=/tmp/out DEVICE=cpu SUBSET=200 DEFT_OPTS=peft=lora,epochs=2,warmup_epochs=1
#   bash benchmarks/gpu_50k.sh stage; DEADLINE_S=30 bash benchmarks/gpu_50k.sh run
#   DEADLINE_S=600 bash benchmarks/gpu_50k.sh collect
set -euo pipefail

STAGE=${STAGE:-/root/stage}
OUT=${OUT:?OUT must name the folder whose files come back}
DEVICE=${DEVICE:-cuda}
SUBSET=${SUBSET:-}
DEFT_OPTS=${DEFT_OPTS:-}
DEADLINE_S=${DEADLINE_S:-540}
read -ra NOISES <<<"${NOISES:-sym:0.4}"
REPO=$(cd "$(dirname "$0")/.." && pwd)
LOGS=$STAGE/logs

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
    if [[ -f $LOGS/started ]]; then
        echo "runs were already started in $STAGE (running: $(running)): call 'collect'" >&2
        exit 3
    fi
    if [[ ! -f $REPO/.stage/data/cifar10/train.parquet ]]; then
        echo "no .stage/data/cifar10/train.parquet here: carry .stage/data with this call" >&2
        exit 4
    fi
    cp -r "$REPO/.stage/data" "$STAGE/"
    mkdir -p "$LOGS"
    export DEFT_CLEAN_CACHE=$STAGE/cache # decoded images (7.5 GB per run at 50k) stay on the stage
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
    python3 -c "import deft_clean, open_clip, peft, torch; print('torch', torch.__version__, \
'open_clip', open_clip.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())" || exit 4
    local noise name
    for noise in "${NOISES[@]}"; do
        name=${noise/:/-}
        # the wrapper writes the run's exit code, so `running` never mistakes a finished run for a live one
        # shellcheck disable=SC2016  # $@ and $0 are the wrapper's own, expanded by the inner bash
        setsid nohup bash -c 'python3 -m benchmarks.run "$@"; echo $? >"$0"' "$LOGS/$name.rc" \
            --dataset cifar10 --noise "$noise" --method deft --seed 0 ${SUBSET:+--subset "$SUBSET"} \
            --data-root "$STAGE/data" --cache-dir "$STAGE/bc-$name" --results-dir "$STAGE/results" \
            --model offline --pretrained "local-dir:$STAGE/offline" --device "$DEVICE" \
            ${DEFT_OPTS:+--deft-opts "$DEFT_OPTS"} >"$LOGS/$name.log" 2>&1 </dev/null &
        echo $! >"$LOGS/$name.pid"
    done
    date +%s >"$LOGS/started"
    echo "started ${NOISES[*]} at $(date -u +%T)"
}

running() {
    local pid count=0
    for pid in "$LOGS"/*.pid; do
        [[ -f ${pid%.pid}.rc ]] || ! kill -0 "$(cat "$pid")" 2>/dev/null || count=$((count + 1))
    done
    echo "$count"
}

show_new_lines() {
    local log line
    for log in "$LOGS"/*.log; do
        line=$(grep -v '^[[:space:]]*$' "$log" | tail -n1 | cut -c1-110 || true)
        if [[ $line != "${SHOWN[$log]:-}" ]]; then
            echo "  $(basename "$log" .log): $line"
            SHOWN[$log]=$line
        fi
    done
}

wait_and_return() {
    if [[ ! -f $LOGS/started ]]; then
        echo "no runs were started in $STAGE: call 'run'" >&2
        exit 3
    fi
    declare -gA SHOWN=()
    local end=$((SECONDS + DEADLINE_S))
    while (($(running) > 0 && SECONDS < end)); do
        sleep 10
        show_new_lines
    done
    local elapsed=$(($(date +%s) - $(cat "$LOGS/started")))
    # the records, the logs and each finished run's flags (a few MB at 50k), for any later analysis
    (cd "$STAGE" && { find logs results bc-*/*/deft-flags \( -name '*.log' -o -name '*.rc' -o -name '*.json' \
        -o -name '*.parquet' \) 2>/dev/null || true; } | tar -czf "$OUT/gpu50k.tar.gz" -T -)
    if (($(running) > 0)); then
        echo "after ${elapsed}s $(running) run(s) still going: call 'collect' at once"
        return
    fi
    echo "every run ended after ${elapsed}s; exit codes: $(cat "$LOGS"/*.rc 2>/dev/null | tr '\n' ' ')"
    shopt -s nullglob
    local records=("$STAGE"/results/*.json) baselines=("$REPO"/benchmarks/results/fair-50k/*.json)
    if ((${#records[@]} == 0)); then
        echo "no records: read the logs in $OUT/gpu50k.tar.gz" >&2
        exit 1
    fi
    ((${#baselines[@]} > 0)) || echo "benchmarks/results/fair-50k/ is empty: the report has no baselines" >&2
    python3 -m benchmarks.report "${records[@]}" "${baselines[@]}" | tee "$OUT/report.md"
}

case "${1:-}" in
    prepare) prepare ;;
    stage) stage ;;
    run)
        require_stage
        start_runs
        wait_and_return
        ;;
    collect)
        require_stage
        wait_and_return
        ;;
    *) echo "usage: $0 prepare|stage|run|collect (see the header)" >&2 && exit 2 ;;
esac
