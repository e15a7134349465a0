#!/usr/bin/env bash
# Everything GPU-side, in two calls of under 10 minutes each (a lent GPU machine with CUDA torch, transformers,
# datasets; nothing can be downloaded there, so every model is built from a config):
#   PARTS=core: kernel checks and benchmarks (attention, compaction, the sampler's bandwidth); a drafter for the
#     tiny preset (drafter.py) and the SD engine bench with it; the CUDA-graph test; the SD engine bench on a
#     random-weight model of the Qwen2.5-1.5B shape (saved as a Llama with q/k/v biases, so that AutoTokenizer
#     takes a stand-in word-level tokenizer); the end-to-end `train.py --bench` on the tiny preset, tail training
#     on. Its steps' time limits add up to under 9 minutes.
#   PARTS=e2e: the same tiny bench with tail training off (the tail's step time with and without the spot trainer
#     beside it); the end-to-end `train.py --bench` with a model of the Qwen2.5-1.5B shape, first warmed up on the
#     tiny task (so that its rollouts have the task's long tail). Under 8 minutes.
# A lent machine has about 15 minutes of device time per session, its start included: run core, then e2e.
# What comes back in $OUT: log.txt (every step's output), results.jsonl (a line per step: its exit status and its
# last line when that is JSON) and timeline*.png (the rollout pictures of the end-to-end benches).
# The GPU image lacks `datasets` (and dill, multiprocess; its pyarrow may be too old): fetch them here first, as
# wheels for its Python 3.12, and carry .whl (git-ignored, ~57 MB) with each device call; they are installed there.
#     bash gpu_check.sh wheels               # here, once: downloads into .whl/
#     PARTS=core OUT=gpu_out bash gpu_check.sh
#     DRY=1 OUT=/tmp/dry bash gpu_check.sh   # on the CPU: the same steps on small shapes, to check the plumbing
set -uo pipefail
if [ "${1:-}" = wheels ]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1
fi
OUT=${OUT:-gpu_out}
DRY=${DRY:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NANOTLT_CACHE=${NANOTLT_CACHE:-$OUT/cache} DRY
PY=${PY:-python3}
PARTS=${PARTS:-core e2e}
if [ "$DRY" = 1 ]; then SMALL=(--new_tokens 16 --batch 1,4); STEPS=2; E2E_STEPS=2; SHAPE=tiny
else SMALL=(); STEPS=8; E2E_STEPS=6; SHAPE=qwen2.5-1.5b; fi

step() {
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" > "$OUT/step.log" 2>&1
    rc=$?
    echo "   exit $rc" | tee -a "$OUT/log.txt"
    cat "$OUT/step.log" >> "$OUT/log.txt"
    last=$(tail -n 1 "$OUT/step.log")
    case "$last" in
        \{*) echo "{\"step\": \"$name\", \"exit\": $rc, \"result\": $last}" >> "$OUT/results.jsonl";;
        *) echo "{\"step\": \"$name\", \"exit\": $rc}" >> "$OUT/results.jsonl";;
    esac
}

if [ "$DRY" != 1 ] && ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step imports 20 $PY -c "import json, torch, triton, transformers, datasets, tqdm; print(json.dumps({m.__name__: \
    m.__version__ for m in (torch, triton, transformers, datasets, tqdm)} | {'cuda': torch.cuda.is_available()}))"
if [[ " $PARTS " == *" core "* ]]; then
step kernels_check 40 $PY tlt_kernels.py
step kernels_bench 75 $PY tlt_kernels.py --bench
step drafter_tiny 60 $PY drafter.py --out "$OUT/tiny_drafter"  # the tiny preset's drafter, trained offline
step spec_tiny 75 $PY spec_decode.py --bench --drafter "$OUT/tiny_drafter" --batch 1,8,32 "${SMALL[@]}"
TRITON_INTERPRET=0 step gpu_tests 90 $PY -m pytest -q -x test_nanotlt.py -k cuda  # uses the tiny preset just built
$PY - "$OUT/qwen15b" <<'PYEOF'
import os, sys, torch, nanotlt
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
a = nanotlt.ModelArgs(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128,
                      intermediate_size=8960, rope_theta=1e6, qkv_bias=True, tie_embeddings=True, arch="llama",
                      max_seq_len=32768)
if os.environ["DRY"] == "1":  # the same kind of checkpoint, small
    a.dim, a.n_layers, a.n_heads, a.head_dim, a.intermediate_size, a.vocab_size = 64, 2, 2, 32, 128, 4097
with torch.device("cpu" if os.environ["DRY"] == "1" else "cuda"):
    nanotlt.save_pretrained(nanotlt.Transformer(a).to(torch.bfloat16), sys.argv[1])
vocab = {f"w{i}": i for i in range(4096)} | {"<eos>": 4096}
tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="w0").save_pretrained(sys.argv[1])
PYEOF
step spec_qwen15b_ngram 75 $PY spec_decode.py --bench --model "$OUT/qwen15b" --drafter ngram --batch 1,8,32 "${SMALL[@]}"
step train_bench_tiny 100 $PY train.py --bench --preset tiny --steps $STEPS --cuda_graphs true --tail_training true \
    --out "$OUT/train_bench"
cp "$OUT/train_bench/timeline.png" "$OUT/timeline.png" 2>/dev/null
fi
if [[ " $PARTS " == *" e2e "* ]]; then
# the rollout's high-priority stream against the spot trainer's: core's train_bench_tiny without tail training
# (compare the SD-on tail_s of the two)
step train_bench_tiny_no_tail_training 100 $PY train.py --bench --preset tiny --steps $STEPS --cuda_graphs true \
    --tail_training false --out "$OUT/train_bench_nt"
# --bench interleaves the SD-off and SD-on runs step by step: both are in memory at once (~30 GB each here)
step train_bench_shape 330 $PY train.py --bench --preset tiny --model "tiny:$SHAPE" --steps $E2E_STEPS \
    --grad_checkpointing true --cuda_graphs true --tail_training true --out "$OUT/train_bench_shape"
cp "$OUT/train_bench_shape/timeline.png" "$OUT/timeline_shape.png" 2>/dev/null
fi
rm -rf "$OUT/qwen15b" "$OUT/cache" "$OUT/train_bench" "$OUT/train_bench_nt" "$OUT/train_bench_shape" "$OUT/step.log" \
    "$OUT/tiny_drafter"
cat "$OUT/results.jsonl"
