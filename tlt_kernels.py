"""Tree-verify attention over a static KV cache, KV compaction and the lossless sampler, in Triton (each with a
plain-PyTorch reference).

One attention kernel serves decode (T=1), chunks (causal among the T new tokens) and speculative tree
verification (a T x T ancestor mask). The new tokens' K/V are already in the cache at positions len..len+T-1 of the
row's slot; each query sees all `len` cached tokens and the new tokens its mask allows. Flash-style online softmax
in fp32; the query heads of one GQA group share a program, so each row's cache is read once: the roofline.
When there are too few (row, kv-head) programs to fill the GPU, the cache is split across programs
(flash-decoding) and a small kernel merges the partial results. The sampler draws a token per row from
softmax(logits / T) by Gumbel-max with noise that is a pure function of (seed, sequence, step), in one pass over
the logits, bit-identical to its reference on every device.

    python tlt_kernels.py             # correctness: kernel vs reference vs SDPA (CPU: Triton interpreter)
    TRITON_INTERPRET=0 python tlt_kernels.py --compile   # every launch variant compiled for sm_90 and sm_80, no GPU
                                                         # needed: registers, spills, shared memory per variant
"""
import functools, json, math, os, re, sys, time
import numpy as np
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the @triton.jit decorators below
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _attend(acc, m_i, l_i, q, k_ptrs, v_ptrs, kv_ok, vis, qk_scale, UPCAST: tl.constexpr, PREC: tl.constexpr):
    k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)  # [BLOCK_N, D]
    v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is wrong
        k, v = k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i starts finite, so a fully masked block gives no NaN
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _tree_attn_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, lens_ptr, mask_ptr, o_ptr, lse_ptr, qk_scale, T, n_splits,
                      sq_b, sq_h, sq_t, sk_s, sk_h, sk_l, sv_s, sv_h, sv_l, sm_b, sm_i, sm_j, so_b, so_h, so_t, so_s,
                      GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    n_m = tl.cdiv(GROUP * T, BLOCK_M)
    m_blk, split = tl.program_id(0) % n_m, tl.program_id(0) // n_m  # m fastest: programs sharing KV run together
    kvh, b = tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)  # int64: a layer's cache can pass 2**31 elements
    cache_len = tl.load(lens_ptr + b)
    # tile row r = (query head g of the group, new token t); rows past GROUP*T are padding
    r = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    g, t, row_ok = r // T, r % T, r < GROUP * T
    h = kvh * GROUP + g
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + (h * sq_h + t * sq_t)[:, None] + d[None, :],
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + slot * sk_s + kvh * sk_h + d[None, :]
    v_base = v_ptr + slot * sv_s + kvh * sv_h + d[None, :]
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    # cached tokens, all visible: this split's share, rounded to whole blocks
    chunk = tl.cdiv(tl.cdiv(cache_len, n_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, cache_len)
    for start in range(lo, hi, BLOCK_N):
        pos = start + n
        ok = pos < hi
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base + pos[:, None] * sk_l, v_base + pos[:, None] * sv_l,
                                ok, ok[None, :], qk_scale, UPCAST, PREC)
    # the new tokens, under the tree (or causal) mask: done by the last split only
    n_new = tl.where(split == n_splits - 1, T, 0)
    for j0 in tl.range(0, n_new, BLOCK_N, num_stages=1):  # usually one block: nothing to pipeline
        j = j0 + n
        ok = j < T
        if HAS_MASK:
            vis = tl.load(mask_ptr + b * sm_b + t[:, None] * sm_i + j[None, :] * sm_j,
                          mask=row_ok[:, None] & ok[None, :], other=0) != 0
        else:
            vis = j[None, :] <= t[:, None]
        pos = cache_len + j
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base + pos[:, None] * sk_l, v_base + pos[:, None] * sv_l,
                                ok, vis & ok[None, :], qk_scale, UPCAST, PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only an empty split has l == 0 (else l >= 1)
    o_off = b.to(tl.int64) * so_b + h * so_h + t * so_t + split * so_s
    tl.store(o_ptr + o_off[:, None] + d[None, :], (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    if SPLIT:
        tl.store(lse_ptr + o_off // D, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _combine_kernel(o_part, lse_part, out, n_splits, D: tl.constexpr, NS_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (b, head, t)
    s, d = tl.arange(0, NS_P), tl.arange(0, D)
    lse = tl.load(lse_part + row * n_splits + s, mask=s < n_splits, other=-1e30)
    w = tl.exp2(lse - tl.max(lse, 0))
    o = tl.load(o_part + (row * n_splits + s[:, None]) * D + d[None, :], mask=s[:, None] < n_splits, other=0.0)
    tl.store(out + row * D + d, (tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)).to(out.dtype.element_ty))


def _config(B, Hkv, G, T, L, D, dtype, device):
    """Block sizes and the KV split from shapes only (no device->host sync: CUDA-graph safe)."""
    if INTERPRET:  # small blocks so tiny tests still cover several blocks; splits only when asked
        return 16, 16, 1, 4, 1
    wide = dtype == torch.float32  # fp32 tiles take twice the registers: no spills on sm_90 (tlt_kernels --compile)
    block_n = 32 if wide or D < 64 else 64
    block_m = min(max(16, triton.next_power_of_2(G * T)), 32 if wide else 128)
    progs = B * Hkv * triton.cdiv(G * T, block_m)
    n_sm = _sm_count(device)
    splits = 1 if progs >= n_sm else min(triton.cdiv(2 * n_sm, progs), max(1, L // (2 * block_n)), 64)
    return block_m, block_n, splits, (8 if wide or block_m * D >= 8192 else 4), (2 if wide else 3)


@functools.lru_cache
def _sm_count(device):
    return AOT_SMS or torch.cuda.get_device_properties(device).multi_processor_count


AOT_SMS = 0  # compile_variants: the SM count of the GPU it compiles for


def tree_attention(q, k_cache, v_cache, slots, cache_lens, tree_mask=None, sm_scale=None, num_splits=None):
    """q [B, Hq, T, D]; caches [S, Hkv, L, D]; slots, cache_lens [B]; tree_mask bool [B, T, T] or None (causal).
    num_splits overrides how many programs share a row's cache (default: from shapes and the SM count)."""
    B, Hq, T, D = q.shape
    S, Hkv, L, _ = k_cache.shape
    G = Hq // Hkv
    assert Hq == G * Hkv and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and D == triton.next_power_of_2(D)
    q = q if q.stride(-1) == 1 else q.contiguous()
    slots, cache_lens = slots.contiguous(), cache_lens.contiguous()  # read as plain arrays (a column view is not)
    block_m, block_n, splits, warps, stages = _config(B, Hkv, G, T, L, D, q.dtype, q.device)
    splits = num_splits or splits
    qk_scale = (sm_scale if sm_scale is not None else D ** -0.5) * math.log2(math.e)
    out = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)  # [B, Hq, T, D]
    if splits > 1:
        o = torch.empty(B, Hq, T, splits, D, device=q.device, dtype=torch.float32)  # per-split, normalised
        lse = torch.empty(B, Hq, T, splits, device=q.device, dtype=torch.float32)  # log2-sum-exp per split
        o_strides = o.stride()[:4]
    else:
        o, lse, o_strides = out, out, (*out.stride()[:3], 0)
    mask = tree_mask.view(torch.uint8) if tree_mask is not None else cache_lens  # bool as bytes; dummy if None
    m_strides = mask.stride() if tree_mask is not None else (0, 0, 0)
    grid = (triton.cdiv(G * T, block_m) * splits, Hkv, B)
    _tree_attn_kernel[grid](
        q, k_cache, v_cache, slots, cache_lens, mask, o, lse, qk_scale, T, splits,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *m_strides, *o_strides,
        GROUP=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, HAS_MASK=tree_mask is not None, SPLIT=splits > 1,
        UPCAST=INTERPRET, PREC="tf32x3" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    if splits > 1:
        _combine_kernel[(B * Hq * T,)](o, lse, out, splits, D=D, NS_P=triton.next_power_of_2(splits))
    return out


def dense_mask(cache_lens, tree_mask, T, L):
    """[B, T, L] bool: query i of row b sees cache position p. The definition the kernel implements."""
    B = cache_lens.shape[0]
    j = torch.arange(L, device=cache_lens.device)[None, :] - cache_lens[:, None].long()  # [B, L] new-token index
    if tree_mask is None:  # causal: query i sees new tokens up to itself
        return j[:, None, :] <= torch.arange(T, device=cache_lens.device)[:, None]
    new_vis = torch.gather(tree_mask, 2, j.clamp(0, T - 1)[:, None, :].expand(B, T, L))  # [B, T, L]
    return (j < 0)[:, None, :] | ((j < T)[:, None, :] & new_vis)


def cache_index(shape, slots, cache_lens, T):
    """Rows of a cache [S, H, L, D] seen as [S * H * L, D] where new K/V [B, H, T, D] go: row b's token t at
    position cache_lens[b] + t of slot slots[b]. [B * H * T] int64."""
    _, H, L, _ = shape
    pos = cache_lens[:, None, None].long() + torch.arange(T, device=slots.device)  # [B, 1, T]
    return ((slots[:, None, None].long() * H + torch.arange(H, device=slots.device)[:, None]) * L + pos).flatten()


def tree_attention_ref(q, k_cache, v_cache, slots, cache_lens, tree_mask=None, sm_scale=None, max_len=None,
                       memo=None):
    """What tree_attention computes, in plain PyTorch: gather the rows, dense mask, attention in fp32. Also the
    CPU path of the engine, so it is lean: at most one copy of the rows' K/V (none while they sit in consecutive
    slots), fused SDPA with the GQA heads mapped, not repeated, and the mask built once per forward (`memo`, a
    dict the layers share). It attends over the first `max_len` cache positions; by default max(cache_lens) + T,
    nothing later is visible (a host read)."""
    B, Hq, T, D = q.shape
    memo = {} if memo is None else memo
    if "bias" not in memo:
        if max_len is None:
            lo, hi = cache_lens.aminmax()
            lo, L = int(lo) + T, min(k_cache.shape[2], int(hi) + T)  # positions < lo: every row wrote them
        else:
            lo, L = 0, max_len
        mask = dense_mask(cache_lens, tree_mask, T, L)  # [B, T, L]
        memo["bias"] = torch.zeros(B, 1, T, L, device=q.device).masked_fill_(~mask[:, None], -math.inf)  # SDPA adds it
        # a shorter row's unused cache may hold NaN: NaN - inf = NaN and 0 * NaN = NaN, so it is zeroed in the copy
        memo["unseen"] = (lo, ~mask[..., lo:].any(1)[:, None, :, None]) if lo < L else None  # [B, 1, L - lo, 1]
        # rows in consecutive slots (a batch before any row finished) are read in place, without a copy
        run = max_len is None and torch.equal(slots, slots[0] + torch.arange(B, device=slots.device))
        memo["first"] = int(slots[0]) if run else None
    L, first = memo["bias"].shape[-1], memo["first"]
    if first is None:
        k = k_cache[:, :, :L].index_select(0, slots)  # [B, Hkv, L, D], a copy
        v = v_cache[:, :, :L].index_select(0, slots)
    else:  # views: zeroing a row's unused positions below changes nothing it reads, it writes them before that
        k, v = k_cache[first:first + B, :, :L], v_cache[first:first + B, :, :L]
    if memo["unseen"] is not None:
        lo, unseen = memo["unseen"]
        k[:, :, lo:].masked_fill_(unseen, 0.0), v[:, :, lo:].masked_fill_(unseen, 0.0)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=memo["bias"], scale=sm_scale,
                                         enable_gqa=True)
    return out.to(q.dtype)  # [B, Hq, T, D]


def compact_kv(k_cache, v_cache, slots, cache_lens, accept_idx, accept_len):
    """Caches [n_layers, S, Hkv, L, D]: move each row's accepted new tokens to be contiguous, all layers at once."""
    A = accept_idx.shape[1]
    i = torch.arange(A, device=accept_idx.device)  # [A]
    dst = cache_lens[:, None].long() + i  # [B, A]
    src = torch.where(i < accept_len[:, None], cache_lens[:, None].long() + accept_idx, dst)  # padding: onto itself
    s = slots[:, None].long()  # [B, 1]
    for cache in (k_cache, v_cache):
        cache[:, s, :, dst] = cache[:, s, :, src]  # the gather is a copy made before any write: no race


# ---------------------------------------------------------------- lossless sampling by position-keyed Gumbel noise
# Token t of sequence s is argmax(logits * (1 / temperature) + g(seed, s, t)) with g a Gumbel vector that is a pure
# function of its key: a counter-based hash gives a uniform u per vocabulary entry, g = -log(-log(u)). Every step
# is an exactly rounded IEEE operation (integer ops, fp32 +, -, *, / and a log built from them, no fused multiply-
# add), so the PyTorch reference, the Triton kernel, the interpreter and any GPU compute the same bits, and the same
# tokens come out on every device. The kernel does it in one pass over the logits: the hash and the noise stay in
# registers, and each program keeps a running argmax over its row.

M32 = 0xFFFFFFFF
LN2 = 0.6931471805599453  # as fp32 constants, on both sides
SQRT2 = 1.4142135623730951


def mix32(x):  # a 32-bit integer hash on int64 tensors (every product fits: 32 x 32 bits)
    x = ((x ^ (x >> 16)) * 0x2C1B3C6D) & M32
    x = ((x ^ (x >> 12)) * 0x297A2D39) & M32
    return x ^ (x >> 15)


def _log_ref(x):
    """log of positive normal fp32 x from exactly rounded operations: x = m * 2^e with m in [sqrt(1/2), sqrt(2)),
    log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, to the s^7 term (absolute error < 1e-7)."""
    bits = x.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # [1, 2)
    big = m > SQRT2
    m = torch.where(big, m * 0.5, m)
    e = (e + big.int()).float()
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    p = ((z * (2 / 7) + 2 / 5) * z + 2 / 3) * z + 2.0
    return e * LN2 + s * p


def gumbel_ref(seed, seq_ids, steps, vocab):
    """The noise: seq_ids [N], steps [N] -> [N, vocab] fp32."""
    key = mix32((mix32((seq_ids + mix32(torch.full_like(seq_ids, seed & M32))) & M32) ^ (steps & M32)) & M32)
    h = mix32(key[:, None] ^ ((torch.arange(vocab, device=seq_ids.device) * 0x9E3779B1) & M32))  # [N, V]
    u = ((h >> 9).float() + 0.5) * 2.0 ** -23  # 23 bits: exact in fp32, strictly inside (0, 1)
    return -_log_ref(-_log_ref(u))


def nucleus_drop(scaled_logits, top_p):
    """[..., V] bool, in vocabulary order: the tokens outside the top-p nucleus of softmax(scaled_logits), the
    smallest set of most likely tokens whose probability reaches top_p (what top-p sampling keeps)."""
    probs, order = scaled_logits.float().softmax(-1).sort(-1, descending=True)
    drop = (probs.cumsum(-1) - probs) >= top_p  # in sorted order
    return drop.scatter(-1, order, drop)


def gumbel_argmax_ref(logits, seq_ids, steps, temperature, seed, chunk=1 << 16):
    """What gumbel_argmax computes: logits [N, V] (any float dtype; -inf = excluded), seq_ids, steps [N] -> [N].
    In chunks of rows of about `chunk` entries, so that the int64 hash tensors stay small (and in cache)."""
    N, V = logits.shape
    inv_t = float(np.float32(1.0 / temperature))  # fp32, as the kernel receives it
    out, n = [], max(1, chunk // V)
    for i in range(0, N, n):
        g = gumbel_ref(seed, seq_ids[i:i + n].long(), steps[i:i + n].long(), V)
        out.append((logits[i:i + n].float() * inv_t + g).argmax(-1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=logits.device)


@triton.jit
def _mix32(x):  # uint32 arithmetic wraps: the same bits as mix32 on int64 with & M32
    x = (x ^ (x >> 16)) * 0x2C1B3C6D
    x = (x ^ (x >> 12)) * 0x297A2D39
    return x ^ (x >> 15)


@triton.jit
def _log(x):  # _log_ref, op for op
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > 1.4142135623730951
    m = tl.where(big, m * 0.5, m)
    e = (e + big.to(tl.int32)).to(tl.float32)
    s = tl.div_rn(m - 1.0, m + 1.0)  # `/` compiles to an approximate division on NVIDIA GPUs
    z = s * s
    p = ((z * 0.2857142857142857 + 0.4) * z + 0.6666666666666666) * z + 2.0
    return e * 0.6931471805599453 + s * p


@triton.jit
def _key(seq, step, seed):  # the first line of gumbel_ref; arguments int64, any sign
    return _mix32(_mix32(seq.to(tl.uint32) + _mix32(seed.to(tl.uint32))) ^ step.to(tl.uint32))


@triton.jit
def _gumbel(key, v):  # the noise of vocabulary entries v (int32) under one key
    h = _mix32(key ^ (v.to(tl.uint32) * tl.full([], 0x9E3779B1, tl.uint32)))
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
    return -_log(-_log(u))


@triton.jit(do_not_specialize=["seed"])  # a GPU launch makes an int argument equal to 1 a constant
def _gumbel_argmax_kernel(logits_ptr, seq_ptr, step_ptr, out_ptr, V, stride, inv_t, seed, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    key = _key(tl.load(seq_ptr + row), tl.load(step_ptr + row), seed)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride
    for v0 in range(0, V, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        x = tl.load(base + v, mask=v < V, other=float("-inf")).to(tl.float32)
        z = x * inv_t + _gumbel(key, v)
        m = tl.max(z, 0)
        i = v0 + tl.argmax(z, 0)  # the first index of the block's max
        better = m > best  # strictly: an earlier block wins a tie, as torch.argmax takes the first
        best_i = tl.where(better, i, best_i)
        best = tl.where(better, m, best)
    tl.store(out_ptr + row, best_i.to(tl.int64))


def gumbel_argmax(logits, seq_ids, steps, temperature, seed, block=None):
    """argmax(logits * (1 / temperature) + gumbel(seed, seq_ids, steps)) per row in one pass over the logits:
    logits [N, V] (bf16/fp16/fp32, -inf entries never win unless all are), seq_ids, steps [N] -> [N] int64.
    Bit-identical to gumbel_argmax_ref."""
    N, V = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    out = torch.empty(N, dtype=torch.long, device=logits.device)
    if N:
        block = block or (1024 if INTERPRET else 2048)
        inv_t = float(np.float32(1.0 / temperature))
        _gumbel_argmax_kernel[(N,)](logits, seq_ids.contiguous(), steps.contiguous(), out, V, logits.stride(0),
                                    inv_t, seed & M32, BLOCK=block, num_warps=8 if block >= 2048 else 4,
                                    enable_fp_fusion=False)  # a fused multiply-add rounds once: other bits
    return out


# ---------------------------------------------------------------- checks and benchmark
def random_tree_mask(B, T, device):
    """[B, T, T] ancestor-or-self masks of random trees rooted at node 0 (parent[i] < i)."""
    m = torch.eye(T, dtype=torch.bool, device=device).repeat(B, 1, 1)
    for i in range(1, T):
        parent = torch.randint(0, i, (B,), device=device)
        m[:, i] |= m[torch.arange(B, device=device), parent]
    return m


def _case(B, Hq, Hkv, T, L, D, dtype, device):
    S = B + 1
    k, v = (torch.randn(S, Hkv, L, D, device=device, dtype=dtype) for _ in range(2))  # [S, Hkv, L, D]
    q = torch.randn(B, Hq, T, D, device=device, dtype=dtype)
    slots = torch.randperm(S, device=device)[:B].int()
    lens = torch.randint(0, L - T + 1, (B,), device=device).int()
    return q, k, v, slots, lens, (random_tree_mask(B, T, device) if T > 1 else None)


def masked_sdpa(q, k, v, slots, lens, mask):
    """SDPA as HF-style code runs it: rows gathered, KV heads repeated (not timed), a dense bool mask."""
    G, T, L = q.shape[1] // k.shape[1], q.shape[2], k.shape[2]
    kk = k[slots.long()].repeat_interleave(G, 1)  # [B, Hq, L, D]
    vv = v[slots.long()].repeat_interleave(G, 1)
    dense = dense_mask(lens, mask, T, L)[:, None]  # [B, 1, T, L]
    return lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=dense)


def check():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [(2, 4, 2, 5, 48, 32, torch.float32, 1), (2, 4, 1, 1, 40, 16, torch.float32, 2),
             (3, 2, 2, 8, 64, 16, torch.float32, 3), (2, 4, 2, 4, 48, 32, torch.float16, 1)]
    if dev == "cuda":
        cases += [(4, 28, 4, 1, 4096, 128, torch.bfloat16, None), (3, 28, 4, 48, 3000, 128, torch.bfloat16, None),
                  (2, 32, 8, 64, 2048, 64, torch.float16, None), (2, 8, 8, 7, 1000, 128, torch.float32, None)]
    for B, Hq, Hkv, T, L, D, dtype, ns in cases:
        q, k, v, slots, lens, mask = _case(B, Hq, Hkv, T, L, D, dtype, dev)
        out = tree_attention(q, k, v, slots, lens, mask, num_splits=ns).float()
        ref = tree_attention_ref(q, k, v, slots, lens, mask).float()
        sd = masked_sdpa(q.float(), k.float(), v.float(), slots, lens, mask)()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        e1, e2 = (out - ref).abs().max().item(), (out - sd).abs().max().item()
        print(f"B={B} Hq={Hq} Hkv={Hkv} T={T} L={L} D={D} {str(dtype)[6:]:8} splits={ns}: "
              f"|kernel-ref| {e1:.2e}  |kernel-sdpa| {e2:.2e}  {'ok' if max(e1, e2) < tol else 'FAIL'}")
        assert max(e1, e2) < tol
    print("all attention checks passed")
    logits = torch.randn(8, 3001, device=dev)
    seq, steps = torch.arange(8, device=dev), torch.arange(8, device=dev) * 7
    assert torch.equal(gumbel_argmax(logits, seq, steps, 0.7, 3), gumbel_argmax_ref(logits, seq, steps, 0.7, 3))
    print("sampler: kernel and reference give the same tokens")


# ---------------------------------------------------------------- ahead of time, for NVIDIA GPUs, without one
ARCHS = {90: (132, 227 * 1024), 80: (108, 163 * 1024)}  # capability: SMs (H100/H200, A100), shared memory per block
MAX_GRID = (2 ** 31 - 1, 65535, 65535)
SHAPES = {"tiny": (4, 2, 32), "smollm2-135m": (9, 3, 64), "qwen2.5-1.5b": (12, 2, 128)}  # (Hq, Hkv, head_dim)


def aot_launches(full=False):
    """The launches the engine issues, as (label, launch()) pairs: per model shape, decode (T = 1), a prefill chunk
    (T = 512, causal), a drafter window (T = 9, causal), tree verification (T = 6, 16, 48) and a draft's first depth
    (an expanded mask, stride 0), each on 1 row (KV split across programs) and on 256 (not split), with int64 slots
    and lengths as the engine passes them (int32 in fp32, as the benchmarks do); in bf16 for every shape, and
    decode, prefill and the 48-token tree in fp16 and fp32 for the last (`full`: everything for every shape). The
    sampler: seeds 0, 1 and 2**32 - 1, vocabularies of 16, 32,001 and 151,936 (multiples of 16 get a hint), each
    logits dtype. CPU tensors: only their dtypes, strides and alignment reach the compiler."""
    L, out, dtypes = 4096, [], (torch.bfloat16, torch.float16, torch.float32)
    cases = ((1, None), (512, None), (9, None), (6, "tree"), (16, "tree"), (48, "tree"), (4, "expanded"))
    for name, (Hq, Hkv, D) in SHAPES.items():
        for dtype in dtypes if full or name == list(SHAPES)[-1] else dtypes[:1]:
            k, v = (torch.zeros(257, Hkv, L, D, dtype=dtype) for _ in range(2))  # [S, Hkv, L, D]
            for B in (1, 256):
                idx = torch.int32 if dtype == torch.float32 else torch.int64
                slots, lens = torch.arange(B, dtype=idx), torch.full((B,), L - 600, dtype=idx)
                for T, mask in cases if dtype == torch.bfloat16 or full else cases[:2] + cases[5:6]:
                    q = torch.zeros(B, T, Hq, D, dtype=dtype).transpose(1, 2)  # [B, Hq, T, D], as the model has it
                    m = None if mask is None else torch.eye(T, dtype=torch.bool).expand(B, T, T)
                    m = m.contiguous() if mask == "tree" else m
                    label = f"{name} {str(dtype)[6:]} B={B} T={T}{'' if mask is None else ' ' + mask}"
                    out.append((label, functools.partial(tree_attention, q, k, v, slots, lens, m)))
    for V in (16, 32001, 151936):
        for dtype in dtypes:
            logits, ids = torch.zeros(4, V, dtype=dtype), torch.arange(4)
            for seed in (0, 1, 2 ** 32 - 1):
                out.append((f"V={V} {str(dtype)[6:]} seed={seed}",
                            functools.partial(gumbel_argmax, logits, ids, ids, 0.7, seed)))
    return out


def compile_variants(archs=tuple(ARCHS), full=False):
    """Compile every kernel variant of `aot_launches` for each NVIDIA architecture (one process each) with
    Triton's own compiler and the ptxas of its wheel, through the argument specialisation a GPU launch applies (an
    int equal to 1 becomes a constant, ints and pointers divisible by 16 get hints), which the interpreter does
    not: each launch becomes a compile. Needs TRITON_INTERPRET=0. Returns a row per variant: kernel, the first
    launch that made it, arch, registers, spills and shared memory (bytes), and `bad`: what is over a limit."""
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(len(archs), maxtasksperchild=1) as pool:  # each a fresh fork
        return [r for rows in pool.map(functools.partial(_compile_arch, full=full), archs) for r in rows]


def _compile_arch(arch, full):
    import contextlib, io, tempfile, types
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
    assert not INTERPRET, "compile_variants needs TRITON_INTERPRET=0"
    seen, run, (n_sm, max_shared) = {}, JITFunction.run, ARCHS[arch]

    def compile_only(fn, *args, grid, warmup, **kw):
        with contextlib.redirect_stdout(io.StringIO()) as log:  # ptxas's report, printed by Triton
            kernel = run(fn, *args, grid=grid, warmup=True, **kw)
        if id(kernel) not in seen:
            regs, spills = (sum(map(int, re.findall(p, log.getvalue()))) for p in (r"Used (\d+) registers",
                                                                                     r"(\d+) bytes spill stores"))
            bad = [f"{spills} B of register spills"] * bool(spills and arch >= 90) + [
                f"shared memory {kernel.metadata.shared} B over sm_{arch}'s {max_shared}"] * (kernel.metadata.shared >
                                                                                              max_shared)
            seen[id(kernel)] = dict(kernel=fn.__name__.strip("_"), variant=label, arch=arch, registers=regs,
                                    spills=spills, shared=kernel.metadata.shared, bad=bad)
        if any(g > m for g, m in zip(tuple(grid) + (1, 1), MAX_GRID)):
            seen[id(kernel)]["bad"].append(f"grid {grid} over CUDA's limits")

    global AOT_SMS  # this process compiles for `arch` only (a fork of the caller: nothing to restore)
    AOT_SMS, JITFunction.run = n_sm, compile_only
    driver.set_active(types.SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", arch, 32),
                                            get_current_device=lambda: arch, get_current_stream=lambda d=None: 0))
    with tempfile.TemporaryDirectory() as cache:  # an empty cache: every variant is compiled, and ptxas reports
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        for label, launch in aot_launches(full):
            launch()
    return list(seen.values())


if __name__ == "__main__":
    if "--compile" in sys.argv:
        t0, rows = time.perf_counter(), compile_variants(full="--full" in sys.argv)
        for r in rows:
            print(f"{r['kernel']:22} sm_{r['arch']} regs {r['registers']:3} spills {r['spills']:4} B shared "
                  f"{r['shared']:6} B  {r['variant']}{'  BAD: ' + '; '.join(r['bad']) if r['bad'] else ''}")
        print(json.dumps(dict(triton=triton.__version__, variants=len(rows), seconds=round(time.perf_counter() - t0, 1),
                              bad=[r for r in rows if r["bad"]])))
        sys.exit(1 if any(r["bad"] for r in rows) else 0)
    else:
        check()
