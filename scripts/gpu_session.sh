#!/usr/bin/env bash
# One lease on the lent GPU (the `device` tool), in one or two commands so that it fits the lease:
#   1. the serving benchmark at SD v1.5 size (issue 8): stock pipeline vs the edge path, fp16 eager, the step-loop
#      benchmark, and further variants (BENCH2_ARGS, BENCH3_ARGS, e.g. compiled); then the GPU-marked tests
#   2. the default model's training stages (issue 3; TRAIN_STAGES "vae unet" from scratch, or "unet" with a config
#      that starts from the shipped model), the UNet stage given whatever time is left (or UNET_MIN minutes)
#   3. the trained pipeline packed into <= 16 MiB parts, the log, the sample grid and the JSON under $OUT
# Run on the device machine from the repository root, with the wheels the GPU image lacks in .whl/ (git-ignored;
# for Python 3.12: diffusers 0.42.1, open_clip_torch 3.3.0, ftfy 6.3.1, wcwidth 0.9.4, zstandard 0.25.0 cp312,
# torchao 0.18.0; `bash scripts/gpu_wheels.sh` fetches them here in seconds):
#   bash scripts/gpu_session.sh            (BUDGET_S, BENCH_S, VAE_MIN override the time split)
#   STAGES=bench bash scripts/gpu_session.sh; STAGES=train TRAIN_STAGES=unet \
#     SESSION_CONFIG=training/configs/default_model_finetune.yaml bash scripts/gpu_session.sh     (two commands)
# With STAGES=train the GPU-marked tests run beside the training. GPU_TESTS= (empty) skips the GPU-marked tests,
# STEP_LOOP= (empty) the step-loop benchmark, BENCH_S=0 the serving benchmark; FIRST_TESTS="-k fp8" runs those
# GPU-marked tests before everything else (FIRST_TESTS_S seconds). VARIANT_ARGS first times UNet
# variants side by side (benchmarks.bench_variants, VARIANT_S seconds in all); with BEST_ARGS the fastest one then
# runs through the serving benchmark (bench_serving $BEST_ARGS <its flags>, BEST_S seconds).
# The `device` tool sends at most 64 MiB (tracked files + carried .whl); the repository with its model, judges and
# wheels is over that. Before the call, remove what the lease does not read (git restores it afterwards):
#   rm -f training/assets/judges/*.safetensors sage_core/assets/default_model/tokenizer/tokenizer.json
#   rm -rf docs sage_core/assets/sage_adapter      # after the call: git checkout -- training/assets docs sage_core/assets
# Locally it runs too (OUT defaults to runs/gpu_session; WHEELS=none PYTHON=.venv/bin/python SESSION_CONFIG=...
# BENCH_ARGS=... for a smoke test).
set -uo pipefail
START=$(date +%s)
BUDGET_S=${BUDGET_S:-575}
BENCH_S=${BENCH_S:-100}
VAE_MIN=${VAE_MIN:-1.25}
RESERVE_S=${RESERVE_S:-70}
CONFIG=${SESSION_CONFIG:-training/configs/default_model.yaml}
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/session.log"
# The device tool brings back at most 8 files from $OUT (the fifth lease lost its variants' kernel profiles and
# logs that way): on exit every file but the few read first and the model's parts goes into one lease_files.tgz
KEEP='session\.log|variants\.json|variants_kernels\.png|bench_serving_best\.json|pipeline\.tar\.part-.*'
pack_out() { (cd "$OUT" && find . -type f | sed 's|^\./||' | grep -v -x -E "$KEEP|lease_files\.tgz|\.pack_list" >.pack_list
    if [ -s .pack_list ]; then tar -czf lease_files.tgz -T .pack_list && xargs -d '\n' rm -f <.pack_list; fi
    rm -f .pack_list; find . -mindepth 1 -type d -empty -delete); }
trap pack_out EXIT
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
without_bars() { tr '\r' '\n' | sed -u -E 's/\](vae|unet) step/]\n\1 step/g' | grep --line-buffered -v -E "^(vae|unet): +[0-9]+%"; }
say() { echo "[gpu_session +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
TOK_CACHE="$HOME/.cache/sage-edge/clip-tokenizer"  # build_clip_tokenizer's cache: no open_clip import needed
if [ ! -f "$TOK_CACHE/vocab.json" ]; then
    mkdir -p "$TOK_CACHE" && cp sage_core/assets/default_model/tokenizer/{vocab.json,merges.txt} "$TOK_CACHE/"
fi
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  $PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee -a "$LOG"

STAGES=${STAGES:-bench train}
TRAIN_STAGES=${TRAIN_STAGES:-vae unet}
# the GPU-marked tests only, without tests/conftest.py: it imports the gRPC stubs, which need a newer grpcio than
# the GPU image has
# (one line per test as it ends, straight into the file: a command cut short keeps what had finished)
# run_gpu_tests FILE SECONDS [PYTEST ARGS...]
run_gpu_tests() { local out=$1 limit=$2; shift 2; timeout "$limit" $PY -m pytest -v -rA -m gpu --noconftest \
    -p no:cacheprovider -p no:logging "$@" tests/test_fp8.py tests/test_gpu_step_loop.py tests/test_unet_buckets.py \
    >"$out" 2>&1; }  # the float8 kernels' tests first: a time limit cuts the last ones

if [ -n "${FIRST_TESTS:-}" ]; then  # e.g. FIRST_TESTS="-k fp8": those GPU-marked tests before anything else
    say "GPU-marked tests first ($FIRST_TESTS, limit ${FIRST_TESTS_S:-120}s)"
    run_gpu_tests "$OUT/gpu_tests_first.txt" "${FIRST_TESTS_S:-120}" $FIRST_TESTS
    cat "$OUT/gpu_tests_first.txt" | tee -a "$LOG"
fi
if [[ " $STAGES " == *" bench "* ]]; then
if [ -n "${VARIANT_ARGS:-}" ]; then  # e.g. VARIANT_ARGS='--parallel 4 --variant "fp8=--unet-compile ..." ...'
    VARIANT_S=${VARIANT_S:-400}
    say "0/3 UNet variants side by side (budget ${VARIANT_S}s)"
    eval "timeout $((VARIANT_S + 60)) $PY -m benchmarks.bench_variants $VARIANT_ARGS --budget-s $VARIANT_S \
        --json $OUT/variants.json --plot $OUT/variants_kernels.png --best-flags $OUT/best_flags.txt" 2>&1 \
        | grep -v Warning | tee -a "$LOG"
    if [ -n "${BEST_ARGS:-}" ] && [ -s "$OUT/best_flags.txt" ]; then  # the fastest variant through the edge path
        say "0a/3 serving benchmark with the fastest variant's flags: $(cat "$OUT/best_flags.txt") (limit ${BEST_S:-150}s)"
        timeout "${BEST_S:-150}" $PY -m benchmarks.bench_serving $BEST_ARGS $(cat "$OUT/best_flags.txt") \
            --json "$OUT/bench_serving_best.json" 2>&1 | grep -v Warning | tee -a "$LOG"
    fi
fi
if [ "$BENCH_S" != 0 ]; then
say "1/3 serving benchmark (limit ${BENCH_S}s)"
timeout "$BENCH_S" $PY -m benchmarks.bench_serving ${BENCH_ARGS:---model sd15-random --batches 32,64 --steps 20 \
    --windows 1 --repeats 3} --json "$OUT/bench_serving.json" 2>&1 | grep -v Warning | tee -a "$LOG"
fi

if [ -n "${STEP_LOOP-1}" ]; then
    say "1a/3 step loop around a zero-cost UNet: per-trajectory diffusers steps vs the batched DDIM step"
    timeout 90 $PY -m benchmarks.bench_step_loop --device cuda --trajectories 8,32,64 --steps 20 \
        --json "$OUT/step_loop.json" 2>&1 | grep -v Warning | tee -a "$LOG"
fi

for N in 2 3; do  # further variants, e.g. BENCH2_ARGS="--model sd15-random --batches 32,64 --unet-compile
    ARGS_N="BENCH${N}_ARGS" S_N="BENCH${N}_S"  # reduce-overhead --unet-buckets 64", each limited by BENCH<N>_S
    [ -n "${!ARGS_N:-}" ] || continue
    say "1b/3 serving benchmark, variant $N (limit ${!S_N:-$BENCH_S}s)"
    timeout "${!S_N:-$BENCH_S}" $PY -m benchmarks.bench_serving ${!ARGS_N} --json "$OUT/bench_serving_$N.json" 2>&1 \
        | grep -v Warning | tee -a "$LOG"
done
if [ -n "${GPU_TESTS-1}" ] && [[ " $STAGES " != *" train "* ]]; then
    say "GPU-marked tests"
    run_gpu_tests "$OUT/gpu_tests.txt" 300; cat "$OUT/gpu_tests.txt" | tee -a "$LOG"
fi
fi
[[ " $STAGES " == *" train "* ]] || { say "done; $(left)s of the budget left"; exit 0; }
TESTS_PID=
if [ -n "${GPU_TESTS-1}" ]; then
    say "GPU-marked tests, beside the training"
    run_gpu_tests "$OUT/gpu_tests.txt" 300 & TESTS_PID=$!
fi

if [[ " $TRAIN_STAGES " == *" vae "* ]]; then
say "2/3 VAE (${VAE_MIN} min)"
$PY -m training.cli default-model --config "$CONFIG" --stages vae --set "vae.max_minutes=$VAE_MIN" \
    ${SESSION_SET:-} 2>&1 | without_bars | tee -a "$LOG"
fi

UNET_MIN=${UNET_MIN:-$(python3 -c "print(round(max(0.2, ($(left) - $RESERVE_S) / 60), 2))")}
say "3/3 text encoder + UNet (${UNET_MIN} min)"
$PY -m training.cli default-model --config "$CONFIG" --stages unet --set "diffusion.max_minutes=$UNET_MIN" \
    ${SESSION_SET:-} 2>&1 | without_bars | tee -a "$LOG"

WORK=$($PY -c "from training.default_model import load_config; print(load_config('$CONFIG').work_dir)")
say "packing $WORK/pipeline"
if [ -d "$WORK/pipeline" ]; then
    tar -C "$WORK" -cf - --exclude=tokenizer pipeline | split -b 16000000 - "$OUT/pipeline.tar.part-"
    cat "$WORK/result.json" >>"$LOG" 2>/dev/null
    cp "$WORK/samples_final.png" "$OUT/samples_final.png" 2>/dev/null
fi
if [ -n "$TESTS_PID" ]; then
    wait "$TESTS_PID"; say "GPU-marked tests:"; cat "$OUT/gpu_tests.txt" | tee -a "$LOG"
fi
say "done; $(left)s of the budget left"
ls -la "$OUT" | tee -a "$LOG"
