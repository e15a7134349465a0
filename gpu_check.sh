#!/usr/bin/env bash
# Everything GPU-side, for a lent GPU machine whose image is not ours (CUDA torch, triton, transformers; no
# `datasets`, no `math-verify`, no network: every model is built from a config, missing packages come as wheels).
#   PARTS=core (under 6 minutes): the kernels' checks against their references and their benchmark (bandwidth
#     against copy and against SDPA, the sampler); a drafter for the tiny preset (bench.py drafter) and the SD engine
#     bench with it (plain vs SD at batch 1, 8, 32); the GPU tests (CUDA graphs on/off, kernels vs references);
#     the end-to-end `bench.py train` on the tiny preset with tail training on, then off, back to back.
#   PARTS=e2e (under 6 minutes): a random-weight model of the Qwen2.5-1.5B shape (saved as a Llama with q/k/v
#     biases, with a stand-in word-level tokenizer) and the SD engine bench on it; `bench.py train` with a model
#     of that shape warmed up on the tiny task (so that its rollouts have the task's long tail).
# QUICK=1: every step on small sizes (a smoke run: does everything start and finish?). DRY=1: QUICK on the CPU, to
# check the plumbing. A lent machine has about 15 minutes of device time per session, its start included.
# What comes back in $OUT: log.txt (every step's output), results.jsonl (a line per step: its exit status, seconds
# and its last line when that is JSON) and timeline*.png. Scratch lives under $SCRATCH (default /tmp/nanotlt_gpu).
# A step that runs past its limit gets SIGABRT first: Python's faulthandler prints every thread's stack to the log.
#     bash gpu_check.sh wheels               # here, once: the missing packages into .whl/ (~55 MB; carry .whl)
#     PARTS=core OUT=gpu_out bash gpu_check.sh
#     DRY=1 OUT=/tmp/dry bash gpu_check.sh   # on the CPU
set -uo pipefail
if [ "${1:-}" = wheels ]; then  # for the image's Python 3.12; pyarrow: datasets needs a newer one than it has
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1 \
        math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
fi
OUT=${OUT:-gpu_out}
DRY=${DRY:-0}
QUICK=${QUICK:-$DRY}
SCRATCH=${SCRATCH:-/tmp/nanotlt_gpu}
mkdir -p "$OUT" "$SCRATCH"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HF_HUB_OFFLINE=1 NANOTLT_CACHE=${NANOTLT_CACHE:-$SCRATCH/cache} DRY
PY=${PY:-python3}
PARTS=${PARTS:-core e2e}
if [ "$QUICK" = 1 ]; then SMALL=(--new_tokens 64 --batch 1,8); STEPS=2; DRAFT=(--steps 40); SHAPE_STEPS=2
else SMALL=(); STEPS=6; DRAFT=(--steps 300); SHAPE_STEPS=4; fi
if [ "$DRY" = 1 ]; then SHAPE=tiny; else SHAPE=qwen2.5-1.5b; fi

step() {  # step NAME LIMIT_S CMD...: run, log, and record a JSON line in results.jsonl
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$OUT/log.txt"
    local t0=$SECONDS
    timeout -s ABRT -k 15 "$limit" "$@" > "$SCRATCH/step.log" 2>&1
    local rc=$? took=$((SECONDS - t0))
    echo "   exit $rc after ${took}s" | tee -a "$OUT/log.txt"
    cat "$SCRATCH/step.log" >> "$OUT/log.txt"
    tail -n 1 "$SCRATCH/step.log" | $PY -c "import json, sys
line = sys.stdin.read().strip()
try:
    result = json.loads(line)
except ValueError:
    result = None
print(json.dumps(dict(step='$name', exit=$rc, seconds=$took, result=result)))" >> "$OUT/results.jsonl"
}

if [ "$DRY" != 1 ] && ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step env 30 $PY -c "import json, subprocess, torch, triton, transformers, datasets, math_verify, tqdm
cuda = torch.cuda.is_available()
smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm', '--format=csv,noheader'],
                     capture_output=True, text=True).stdout.strip() if cuda else None
print(json.dumps({m.__name__: m.__version__ for m in (torch, triton, transformers, datasets, tqdm)} | dict(cuda=cuda,
      capability=torch.cuda.get_device_capability() if cuda else None, nvidia_smi=smi)))"
if [[ " $PARTS " == *" core "* ]]; then
step kernels_check 60 $PY tlt_kernels.py
step drafter_tiny 100 $PY bench.py drafter --out "$SCRATCH/tiny_drafter" "${DRAFT[@]}"  # the tiny preset's drafter
step spec_tiny 100 $PY bench.py engine --drafter "$SCRATCH/tiny_drafter" --batch 1,8,32 "${SMALL[@]}"
TRITON_INTERPRET=0 step gpu_tests 100 $PY -m pytest -q -x test_nanotlt.py -k cuda  # the tiny preset built above
step train_bench_tiny 100 $PY bench.py train --preset tiny --steps $STEPS --cuda_graphs true \
    --tail_training true --out "$SCRATCH/train_bench"
cp "$SCRATCH/train_bench/timeline.png" "$OUT/timeline.png" 2>/dev/null
# the rollout's high-priority stream against the spot trainer's: the same without tail training (compare tail_s)
step train_bench_tiny_no_tail_training 100 $PY bench.py train --preset tiny --steps $STEPS --cuda_graphs true \
    --tail_training false --out "$SCRATCH/train_bench_nt"
[ "$DRY" = 1 ] || step kernels_bench 90 $PY bench.py kernels
fi
if [[ " $PARTS " == *" e2e "* ]]; then
cat > "$SCRATCH/build.py" <<'PYEOF'
import json, os, sys, time, torch
sys.path.insert(0, os.getcwd())
import nanotlt
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
t0 = time.time()
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
print(json.dumps(dict(path=sys.argv[1], seconds=round(time.time() - t0, 1))))
PYEOF
step build_qwen15b 90 $PY "$SCRATCH/build.py" "$SCRATCH/qwen15b"
step spec_qwen15b_ngram 100 $PY bench.py engine --model "$SCRATCH/qwen15b" --drafter ngram --batch 1,8,32 \
    "${SMALL[@]}"
# bench.py train interleaves the SD-off and SD-on runs step by step: both are in memory at once (~30 GB each here)
step train_bench_shape 240 $PY bench.py train --preset tiny --model "tiny:$SHAPE" --steps $SHAPE_STEPS \
    --grad_checkpointing true --cuda_graphs true --tail_training true --out "$SCRATCH/train_bench_shape"
cp "$SCRATCH/train_bench_shape/timeline.png" "$OUT/timeline_shape.png" 2>/dev/null
fi
cat "$OUT/results.jsonl"
