#!/usr/bin/env bash
# Everything GPU-side in one call, under 10 minutes (a lent GPU machine with CUDA torch, transformers, datasets):
# kernel checks and benchmarks, the SD engine bench on the tiny preset and on a model of real shape
# (Qwen2.5-1.5B shape as a Llama with q/k/v biases, random weights: nothing can be downloaded there; llama so that
# AutoTokenizer takes the stand-in word-level tokenizer), and the end-to-end train.py --bench.
# Three files come back in $OUT: log.txt (every step's output), results.jsonl (each step's last line, its JSON,
# as {"step": name, "result": ...}) and timeline.png (the rollout picture of the end-to-end bench).
#     OUT=gpu_out bash gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NANOTLT_CACHE=${NANOTLT_CACHE:-$OUT/cache}
PY=${PY:-python3}

step() {
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/log.txt"
    timeout 240 "$@" > "$OUT/step.log" 2>&1
    echo "   exit $?" | tee -a "$OUT/log.txt"
    cat "$OUT/step.log" >> "$OUT/log.txt"
    last=$(tail -n 1 "$OUT/step.log")
    case "$last" in \{*) echo "{\"step\": \"$name\", \"result\": $last}" >> "$OUT/results.jsonl";; esac
}

step kernels_check $PY kernels.py
step kernels_bench $PY kernels.py --bench
step spec_tiny $PY spec_decode.py --bench
$PY - "$OUT/qwen15b" <<'PYEOF'
import sys, torch, nanotlt
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
a = nanotlt.ModelArgs(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128,
                      intermediate_size=8960, rope_theta=1e6, qkv_bias=True, tie_embeddings=True, arch="llama",
                      max_seq_len=32768)
with torch.device("cuda"):
    nanotlt.save_pretrained(nanotlt.Transformer(a).to(torch.bfloat16), sys.argv[1])
vocab = {f"w{i}": i for i in range(4096)} | {"<eos>": 4096}
tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="w0").save_pretrained(sys.argv[1])
PYEOF
step spec_qwen15b_ngram $PY spec_decode.py --bench --model "$OUT/qwen15b" --drafter ngram --batch 1,8,32
step train_bench_tiny $PY train.py --bench --preset tiny --steps 8 --cuda_graphs true --tail_training true --out "$OUT/train_bench"
cp "$OUT/train_bench/timeline.png" "$OUT/timeline.png" 2>/dev/null
rm -rf "$OUT/qwen15b" "$OUT/cache" "$OUT/train_bench" "$OUT/step.log"
cat "$OUT/results.jsonl"
