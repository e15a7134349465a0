"""spec_decode.py: the rollout engine. Batched generation over the static KV cache with lossless sampling,
and speculative decoding (EAGLE-2 tree drafts, tree verification, KV compaction) that switches on when the
active batch is small, with a bandit that picks the tree shape per batch-size bucket, a CUDA-graph pool and
a model-free n-gram drafter.

    python spec_decode.py --bench [--model NAME_OR_PATH] [--drafter PATH|ngram] [--batch 1,4,16,64]

prints tokens/s of plain decoding and of SD on the same prompts and seed, per batch size, SD as the bandit runs
it (it keeps plain decoding where drafting does not pay) and, with --fixed_tree, with one tree; last line JSON.

Per row the engine keeps, by cache slot: the tokens so far, the target's hidden states of the cached tokens
(the drafter reads them), `lens` (tokens in the target's cache) and the *pending* token tokens[lens]: sampled,
not yet run through the target. A plain step runs the pending token; an SD step runs the pending token as the
root of a draft tree. Either way it commits c >= 1 tokens: the cache grows by c and c new tokens are sampled.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import tlt_kernels as kernels
import nanotlt
from nanotlt import Ctx

# ---------------------------------------------------------------------------------------------------------
# Lossless sampling: token t of sequence s is argmax(logits / temperature + g(seed, s, t)), with g a Gumbel
# vector that is a pure function of its key (kernels.gumbel_argmax). Sampling becomes deterministic given the
# prefix, so verifying a draft is an exact-match test, and SD on/off, batch order and composition cannot change
# what is sampled.


def sample(logits, seq_ids, steps, temperature=0.0, top_p=1.0, seed=0):
    """logits [B, T, V], seq_ids [B], steps [B, T] -> tokens [B, T]. One pass over the logits (a Triton kernel on
    a GPU); top-p < 1 first masks the logits outside the nucleus, exactly, with a sort over the vocabulary."""
    B, T, V = logits.shape
    if temperature == 0:
        return logits.argmax(-1)
    flat = logits.reshape(B * T, V)
    if top_p < 1.0:
        flat = flat.masked_fill(kernels.nucleus_drop(flat.float() / temperature, top_p), float("-inf"))
    triton = logits.is_cuda if nanotlt.USE_TRITON is None else nanotlt.USE_TRITON
    argmax = kernels.gumbel_argmax if triton else kernels.gumbel_argmax_ref
    return argmax(flat, seq_ids[:, None].expand(B, T).reshape(-1), steps.reshape(-1), temperature, seed).view(B, T)


# ---------------------------------------------------------------------------------------------------------
# Engine state, per cache slot (one slot per sequence of the rollout, plus a dummy slot for graph padding)


@dataclass
class State:
    tokens: torch.Tensor  # [S, L] prompt + generated tokens; tokens[s, lens[s]] is the pending token
    hidden: torch.Tensor | None  # [S, L, H] target hidden state of every cached position (for the drafter)
    lens: torch.Tensor  # [S] tokens in the target's KV cache
    draft_lens: torch.Tensor  # [S] positions in the drafter's KV cache
    n_gen: torch.Tensor  # [S] tokens generated so far, the pending one included
    seq_ids: torch.Tensor  # [S] sampling keys
    groups: torch.Tensor  # [S] GRPO group of each sequence (the n-gram drafter reads siblings)
    group_slots: torch.Tensor  # [n_groups, G] the slots of each group, padded with -1
    prompt_lens: torch.Tensor  # [S]


@dataclass
class Tree:
    tokens: torch.Tensor  # [B, T] node 0 is the root (the pending token)
    parents: torch.Tensor  # [B, T] index of each node's parent, -1 for the root
    depth: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, T, T] ancestor-or-self; None for a chain (causal)
    max_depth: int


def commit(st, slots, h, new_tokens, count):
    """Commit `count` [B] tokens per row: the hidden states h [B, P, H] of the tokens now in the cache and the
    new_tokens [B, P] that follow them. Entries past `count` are written too (no masking, no sync): they
    land beyond the row's length and are overwritten later."""
    pos = st.lens[slots, None] + torch.arange(new_tokens.shape[1], device=slots.device)  # [B, P]
    if st.hidden is not None:
        st.hidden[slots[:, None], pos] = h.to(st.hidden.dtype)
    st.tokens[slots[:, None], pos + 1] = new_tokens
    st.lens[slots] += count
    st.n_gen[slots] += count


def advance(st, slots, h, new_tokens, count, eos_id, max_new):
    """Commit a step (see `commit`), each row cut after its first eos and at max_new generated tokens, on the
    device. Returns the tokens each row gained and whether it is done, [B] each."""
    idx = torch.arange(new_tokens.shape[1], device=slots.device)  # [P]
    count = torch.minimum(count, max_new - st.n_gen[slots])  # room >= 1 while a row is active
    done = st.n_gen[slots] + count >= max_new
    if eos_id is not None:
        eos = (new_tokens == eos_id) & (idx < count[:, None])  # [B, P]
        first = torch.where(eos, idx, new_tokens.shape[1]).amin(1)
        done |= eos.any(1)
        count = torch.minimum(count, first + 1)
    commit(st, slots, h, new_tokens, count)
    return count, done


def forward(model, cfg, slots, lens, tokens, positions, tree_mask, seq_ids, steps):
    """One target forward over [B, T] new tokens of the active rows, and the target's own (sampled) next token
    after each of them: (hidden [B, T, H], choice [B, T]). `steps` [B, T]: the choice's generated-token index."""
    h = model.hidden(tokens, positions, Ctx(slots=slots, cache_lens=lens, tree_mask=tree_mask))
    return h, sample(model.logits(h), seq_ids, steps, cfg.temperature, cfg.top_p, cfg.seed)


def decode_step(model, st, slots, cfg):
    """A plain step: the pending token through the target. Returns (h [B, 1, H], next token [B, 1], count [B])."""
    lens = st.lens[slots]
    pending = st.tokens[slots, lens][:, None]  # [B, 1]
    h, nxt = cfg.graphs(*decode_piece(model, cfg), slots, lens, pending, lens[:, None], None, st.seq_ids[slots],
                        st.n_gen[slots, None])
    return h, nxt, torch.ones_like(slots)


def decode_piece(model, cfg):  # (name, function) of what a plain step runs, captured as one graph
    return cfg.key("decode"), lambda *a: forward(model, cfg, *a)


def verify_piece(model, cfg, max_depth):
    return cfg.key(f"verify{max_depth}"), lambda *a: verify(model, cfg, max_depth, *a)


def verify(model, cfg, max_depth, slots, lens, tokens, parents, depth, mask, seq_ids, n_gen):
    """Run the tree through the target, take the longest path from the root along the target's own choices,
    and compact its K/V. Returns the hidden states of the path [B, max_depth + 1, H], the new tokens (the
    path's, then the target's next token, "bonus") [B, max_depth + 1] and how many entered the cache [B]."""
    (B, T), dev = tokens.shape, slots.device
    h, choice = forward(model, cfg, slots, lens, tokens, lens[:, None] + depth, mask, seq_ids, n_gen[:, None] + depth)
    right = (tokens == choice.gather(1, parents.clamp(min=0))) & (parents >= 0)  # [B, T] the target's next token
    right[:, 0] = True  # the root; a node without a parent (a NaN drafter's tree) is never right
    anc = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(B, T, T)
    on_path = ~(anc & ~right[:, None, :]).any(-1)  # [B, T] the node and all its ancestors are right
    # siblings are distinct, so the nodes on the path form one chain from the root: at most one per depth
    cur = (on_path * (depth + 1)).argmax(1, keepdim=True)  # [B, 1] its deepest node
    accepted = depth.gather(1, cur)[:, 0]  # [B]
    levels = torch.arange(max_depth + 1, device=dev)[None, :, None]
    path = (on_path[:, None, :] & (depth[:, None, :] == levels)).int().argmax(-1)  # [B, max_depth + 1]
    count = accepted + 1  # root + accepted nodes enter the cache; accepted tokens + bonus are new
    bonus = choice.gather(1, cur)
    new_tokens = torch.cat([tokens.gather(1, path[:, 1:]), bonus], 1)  # [B, max_depth + 1]
    new_tokens.scatter_(1, accepted[:, None], bonus)  # the bonus right after the accepted path
    kernels.compact_kv(model.k_cache, model.v_cache, slots, lens, path, count)
    return h.gather(1, path[..., None].expand(-1, -1, h.shape[-1])), new_tokens, count


def verify_step(model, st, slots, tree: Tree, cfg):
    """Verify a draft tree (see `verify`): returns (h, new_tokens, count) to commit."""
    return cfg.graphs(*verify_piece(model, cfg, tree.max_depth), slots, st.lens[slots], tree.tokens, tree.parents,
                      tree.depth, tree.mask, st.seq_ids[slots], st.n_gen[slots])


# ---------------------------------------------------------------------------------------------------------
# Drafting: a learned drafter (any model with hidden()/logits()/setup_cache(), e.g. drafter.Drafter) through
# `eagle_draft`, or the model-free `ngram_draft`. Both return a Tree rooted at the pending token.


def ancestor_mask(parents, max_depth):  # parents [B, T] (-1 for the root) -> [B, T, T] ancestor-or-self
    (B, T), dev = parents.shape, parents.device
    mask = torch.eye(T, dtype=torch.bool, device=dev).expand(B, T, T).clone()
    anc, b, rows = parents.clone(), torch.arange(B, device=dev)[:, None], torch.arange(T, device=dev)
    for _ in range(max_depth):  # max_depth hops up reach the root from any node
        mask[b, rows, anc.clamp(min=0)] |= anc >= 0  # row b's own nodes only (a bare `:` would mix rows)
        anc = torch.where(anc >= 0, parents.gather(1, anc.clamp(min=0)), anc)
    return mask


def pairs(st, slots, start, n):
    """The drafter's inputs at n consecutive positions t from `start` [B]: x_{t+1} [B, n], h_t [B, n, H], t [B, n]."""
    t = start[:, None] + torch.arange(n, device=slots.device)
    return st.tokens[slots[:, None], t + 1], st.hidden[slots[:, None], t], t


def read_pairs(drafter, slots, lens, x, h, t, prev=None):
    """The drafter over pairs at consecutive positions t (writing its cache there); its output at the pending
    token's position lens - 1 [B, H] where this chunk holds it, else `prev`."""
    out = drafter.hidden(x, h, t, Ctx(slots=slots, cache_lens=t[:, 0]))  # [B, n, H]
    last = lens - 1 - t[:, 0]  # index of the pending token's pair
    picked = out.gather(1, last.clamp(0, t.shape[1] - 1)[:, None, None].expand(-1, 1, out.shape[-1]))[:, 0]
    return picked if prev is None else torch.where(((last >= 0) & (last < t.shape[1]))[:, None], picked, prev)


def drafter_lag(st, slots):  # the most pairs any row's drafter cache lacks (a host sync: callers pass it instead)
    return max(1, int((st.lens[slots] - st.draft_lens[slots]).max()))


def catch_up(drafter, st, slots, todo=None, chunk=512):
    """Run the drafter over the pairs (x_{t+1}, h_t), at position t, that it has not seen: t in [draft_lens, lens),
    the freshly committed tokens with the target's true hidden states. Rows share one window of `todo` pairs
    (the most any row lacks; the engine knows it on the host) right-aligned on their last pair, so a row that
    lacks fewer recomputes a few pairs it has (same K/V). A row shorter than the window starts at 0 and writes
    past lens - 1, where nothing is read before it is rewritten. Returns the drafter's prediction of the pending
    token's hidden state [B, H]."""
    lens, todo = st.lens[slots], todo or drafter_lag(st, slots)
    start, root_h = (lens - todo).clamp(min=0), None
    for c0 in range(0, todo, chunk):
        root_h = read_pairs(drafter, slots, lens, *pairs(st, slots, start + c0, min(chunk, todo - c0)), root_h)
    st.draft_lens[slots] = lens
    return root_h


def eager(name, fn, slots, *args):  # the GraphPool interface without graphs
    return fn(slots, *args)


def eagle_draft(drafter, st, slots, depth, topk, n_verify, graphs=eager, todo=None, window=None):
    """EAGLE-2 drafting: the catch-up, then the tree's growth. Between SD steps the drafter lags by at most
    `window` pairs: then the catch-up runs over a fixed window of them and is captured with the growth, as one
    piece per batch bucket and tree shape. A longer catch-up (after plain decoding) runs eagerly, in chunks."""
    lens = st.lens[slots]
    pending = st.tokens[slots, lens][:, None]  # [B, 1]
    todo = todo or drafter_lag(st, slots)
    if window is None or todo > window:
        root_h = catch_up(drafter, st, slots, todo)
        return Tree(*graphs(*draft_piece(drafter, depth, topk, n_verify), slots, lens, root_h, pending), depth)
    st.draft_lens[slots] = lens
    return Tree(*graphs(*draft_piece(drafter, depth, topk, n_verify, window), slots, lens,
                        *pairs(st, slots, (lens - window).clamp(min=0), window), pending), depth)


def draft_piece(drafter, depth, topk, n_verify, window=None):
    """(name, function) of the tree's growth from the root's predicted feature; with `window`, of the catch-up
    over the last `window` pairs followed by the growth."""
    name, grow = f"tree{depth}/{topk}/{n_verify}", lambda *a: grow_tree(drafter, depth, topk, n_verify, *a)
    if window is None:
        return name, grow
    return f"{name}+{window}", lambda sl, ln, x, h, t, p: grow(sl, ln, read_pairs(drafter, sl, ln, x, h, t), p)


def tree_size(depth, topk, n_verify):  # the nodes grow_tree keeps: the root and at most every candidate
    return min(n_verify, 1 + topk + (depth - 1) * topk ** 2)


def grow_tree(drafter, depth, topk, n_verify, slots, lens, root_h, pending):
    """EAGLE-2: top-k children of the root; at each further depth expand the k best beams by top-k and keep
    the k best by cumulative log-prob; finally keep the n_verify-1 best nodes overall. A child's score never
    exceeds its parent's (shallower wins ties), so the kept nodes form a tree. Each depth reruns every beam so
    far (each sees the cache and its ancestors): fixed shapes, no K/V bookkeeping for the beams.
    Returns the tree's tokens, parents, depths [B, n_verify] and ancestor mask [B, n_verify, n_verify]."""
    B, k, dev = len(slots), topk, slots.device
    score, tok = torch.log_softmax(drafter.logits(root_h).float(), -1).topk(k, -1)  # [B, k] depth-1 nodes = beams
    cand_tok, cand_score, cand_parent, cand_depth = [tok], [score], [torch.full_like(tok, -1)], [torch.ones_like(tok)]
    beam_idx = torch.arange(k, device=dev).expand(B, k)  # candidate index of each current beam
    beam_tok, beam_in_h = tok, root_h[:, None].expand(B, k, -1)  # drafter inputs of all beams so far
    beam_mask = torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)  # ancestor-or-self among them

    for d in range(1, depth):
        n = beam_tok.shape[1]
        pos = lens[:, None] + torch.arange(n, device=dev) // k  # [B, n]: depth-j beams sit at lens + j - 1
        ctx = Ctx(slots=slots, cache_lens=lens, tree_mask=beam_mask)
        h_last = drafter.hidden(beam_tok, beam_in_h, pos, ctx)[:, -k:]  # [B, k, H] the current beams
        child_score, child_tok = torch.log_softmax(drafter.logits(h_last).float(), -1).topk(k, -1)  # [B, k, k]
        child_score = (score[:, :, None] + child_score).flatten(1)  # [B, k*k] cumulative log-probs
        child_tok = child_tok.flatten(1)
        child_parent = beam_idx[:, :, None].expand(B, k, k).flatten(1)
        base = sum(t.shape[1] for t in cand_tok)
        cand_tok.append(child_tok), cand_score.append(child_score), cand_parent.append(child_parent)
        cand_depth.append(torch.full_like(child_tok, d + 1))
        score, best = child_score.topk(k, -1)  # the next beams
        beam_idx = base + best
        parent_local = n - k + best // k  # beam index (in the beam list) of each new beam's parent
        beam_tok = torch.cat([beam_tok, child_tok.gather(1, best)], 1)
        beam_in_h = torch.cat([beam_in_h, h_last.gather(1, (best // k)[..., None].expand(-1, -1, h_last.shape[-1]))], 1)
        rows = beam_mask.gather(1, parent_local[..., None].expand(-1, -1, n))  # new beams inherit parent ancestry
        beam_mask = torch.cat([torch.cat([beam_mask, torch.zeros(B, n, k, dtype=torch.bool, device=dev)], 2),
                               torch.cat([rows, torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)], 2)], 1)
    tok, score, parent, dep = (torch.cat(x, 1) for x in (cand_tok, cand_score, cand_parent, cand_depth))
    n_verify = tree_size(depth, k, n_verify)
    keep = (score - 1e-4 * dep).topk(n_verify - 1, -1).indices.sort(-1).values  # parents before children
    local = torch.full_like(tok, -1).scatter_(1, keep, torch.arange(1, n_verify, device=dev).expand(B, -1))
    par = parent.gather(1, keep)
    par = torch.where(par < 0, 0, local.gather(1, par.clamp(min=0)))  # candidate index -> tree node index
    zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
    parents = torch.cat([zero - 1, par], 1)
    return (torch.cat([pending, tok.gather(1, keep)], 1), parents, torch.cat([zero, dep.gather(1, keep)], 1),
            ancestor_mask(parents, depth))


def ngram_draft(st, slots, depth, n_max=3):
    """Model-free drafts: find the latest earlier occurrence of the last n tokens in the row's own sequence or
    in its GRPO siblings (same prompt, responses that often repeat each other) and propose what followed it,
    as a chain (past the end of what is known it repeats the span, which continues periodic text). Backs off
    from n_max to 1."""
    B, dev = len(slots), slots.device
    ends = st.lens[slots] + 1  # sequence length including the pending token
    members = st.group_slots[st.groups[slots]]  # [B, G] slots of each row's group (padded with -1)
    seqs = st.tokens[members.clamp(min=0)]  # [B, G, L]
    member_ends = torch.where(members >= 0, st.lens[members.clamp(min=0)] + 1, 0)  # [B, G]
    best_g = torch.zeros(B, dtype=torch.long, device=dev)  # which member holds the chosen match
    best_p = torch.full((B,), -1, dtype=torch.long, device=dev)  # where its continuation starts
    for n in range(n_max, 0, -1):
        query = st.tokens[slots[:, None], (ends[:, None] - n + torch.arange(n, device=dev)).clamp(min=0)]
        hit = (seqs.unfold(2, n, 1) == query[:, None, None]).all(-1)  # [B, G, L-n+1]
        p = torch.arange(hit.shape[2], device=dev)
        hit &= p + n < member_ends[..., None]  # something follows (which also rules out the query itself)
        val, arg = torch.where(hit, p + n, -1).flatten(1).max(1)  # the latest continuation
        take = (best_p < 0) & (val >= 0) & (ends >= n)  # a row shorter than n has no n-gram to look up
        best_g = torch.where(take, arg // hit.shape[2], best_g)
        best_p = torch.where(take, val, best_p)
    span = (member_ends.gather(1, best_g[:, None]) - best_p[:, None]).clamp(min=1)  # known tokens after the match
    idx = (best_p.clamp(min=0)[:, None] + torch.arange(depth, device=dev) % span).clamp(max=seqs.shape[2] - 1)
    chain = seqs[torch.arange(B, device=dev)[:, None], best_g[:, None], idx]  # [B, depth]
    pending = st.tokens[slots, st.lens[slots]][:, None]
    T = depth + 1
    ar = torch.arange(T, device=dev).expand(B, T)
    return Tree(torch.cat([pending, chain], 1), ar - 1, ar, None, depth)


# ---------------------------------------------------------------------------------------------------------
# Choosing the tree shape: BEG-MAB, one epsilon-greedy bandit per batch-size bucket


@dataclass(frozen=True)
class Arm:
    drafter: str  # "model" (the learned drafter), "ngram" (the model-free fallback) or "plain" (no SD)
    depth: int
    topk: int
    verify_tokens: int


# "plain" is an arm too: where SD does not pay (a big bucket, a poor drafter, a CPU) the bandit learns to decode
DEFAULT_ARMS = (Arm("model", 3, 2, 6), Arm("model", 5, 4, 12), Arm("model", 6, 4, 24), Arm("model", 8, 4, 48),
                Arm("ngram", 3, 1, 4), Arm("ngram", 6, 1, 7), Arm("plain", 0, 1, 1))
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def default_arms(learned):  # the learned drafter's shapes only when there is one
    return [a for a in DEFAULT_ARMS if learned or a.drafter != "model"]


def bucket(rows):
    return next(b for b in BUCKETS if b >= rows) if rows <= BUCKETS[-1] else rows


class Bandit:
    """Arms are tree shapes; reward is committed tokens per second of draft + verify time. Each arm is tried once
    per bucket, then the best median of a sliding window (robust to a slow outlier step) is played, except while
    exploring: a random arm, only as long as exploring has taken under `eps` of the bandit's time. Counting
    seconds rather than steps matters: a random arm may be a deep tree that costs several plain steps, so
    eps-greedy at 2% of steps cost the tiny preset's tail 6-9%; this costs at most eps of it after the first
    tries. A memory guard drops arms whose verify_tokens x rows exceeds the budget. Unlike TLT's default of one
    arm per bucket, every bucket has several arms, plain decoding among them: where drafting does not pay, the
    bandit keeps decoding plainly."""

    def __init__(self, arms=DEFAULT_ARMS, eps=0.02, window=16, token_budget=4096, seed=0):
        self.arms, self.eps, self.window, self.budget = list(arms), eps, window, token_budget
        self.rewards, self.rng = {}, random.Random(seed)
        self.seconds, self.explore_s, self.exploring = 0.0, 0.0, False

    def choose(self, rows):
        b = bucket(rows)
        ok = [a for a in self.arms if a.verify_tokens * b <= self.budget]
        ok = ok or [min(self.arms, key=lambda a: a.verify_tokens)]  # the memory guard keeps at least one arm
        untried = [a for a in ok if not self.rewards.get((b, a))]
        self.exploring = bool(untried) or self.explore_s < self.eps * self.seconds
        if untried:
            return untried[0]
        if self.exploring:
            return self.rng.choice(ok)
        return max(ok, key=lambda a: statistics.median(self.rewards[b, a]))

    def update(self, rows, arm, tokens, seconds):
        r = self.rewards.setdefault((bucket(rows), arm), [])
        r.append(tokens / seconds)
        del r[:-self.window]
        self.seconds += seconds
        self.explore_s += seconds if self.exploring else 0.0

    def state_dict(self):  # plain lists (a checkpoint loads without unpickling objects)
        return dict(rewards=[[b, list(dataclasses.astuple(a)), r] for (b, a), r in self.rewards.items()],
                    rng=nanotlt.rng_state(self.rng), seconds=[self.seconds, self.explore_s])

    def load_state_dict(self, state):
        self.rewards = {(b, Arm(*a)): list(r) for b, a, r in state["rewards"]}
        self.seconds, self.explore_s = state["seconds"]
        nanotlt.set_rng_state(state["rng"], self.rng)

    def best(self):  # {bucket: best arm so far}, for the stats
        out = {}
        for (b, a), r in self.rewards.items():
            if b not in out or statistics.median(r) > statistics.median(self.rewards[b, out[b]]):
                out[b] = a
        return {b: (a.drafter, a.depth, a.topk, a.verify_tokens) for b, a in sorted(out.items())}


# ---------------------------------------------------------------------------------------------------------
# CUDA graphs (GPU only): the fixed-shape steps are captured lazily per (name, batch bucket, shapes) in one
# shared memory pool; the active batch is padded to its bucket with rows that point at a dummy slot.


class GraphPool:
    """Graphs hold raw addresses: a pool serves one signature (the model's and drafter's weights and caches) and
    is rebuilt when it changes. Padding rows point at `dummy_slot`, a cache slot that no row owns, with length 0
    and zeros elsewhere: they read nothing. A piece whose capture fails runs eagerly from then on (the others keep
    their graphs). `first_calls` counts calls of pieces never run before (a capture, or an eager first run that
    compiles kernels): the engine keeps such one-off steps out of the bandit's rewards."""

    def __init__(self, enabled, dummy_slot, sig=None):
        self.enabled, self.dummy_slot, self.sig = enabled and torch.cuda.is_available(), dummy_slot, sig
        self.graphs, self.pool, self.bytes, self.errors, self.side = {}, None, 0, [], None
        self.failed, self.seen, self.first_calls, self.capture_s = set(), set(), 0, 0.0

    def key(self, name, slots, args):
        return (name, bucket(len(slots))) + tuple(None if a is None else tuple(a.shape[1:]) for a in args)

    def __call__(self, name, fn, slots, *args):  # fn(slots, *args) -> tuple of tensors, rows first
        B, key = len(slots), self.key(name, slots, args)
        if key not in self.seen:
            self.seen.add(key)
            self.first_calls += 1
        eager = not self.enabled or B > BUCKETS[-1] or key in self.failed
        if eager or not self.prepare(name, fn, slots, *args, key=key):
            return fn(slots, *args)
        graph, static, out, filled = self.graphs[key]
        for s, a in zip(static, (slots,) + args):
            if a is not None:
                s[:B].copy_(a)
                if filled[0] > B:  # rows that were live in the last replay become padding: length 0, zeros
                    s[B:filled[0]].fill_(self.dummy_slot if s is static[0] else 0)
        filled[0] = B
        graph.replay()
        return tuple(o[:B] for o in out)  # views of the graph's outputs: valid until the pool's next replay

    def prepare(self, name, fn, slots, *args, key=None):
        """Capture the piece (if it is not yet): True when it has a graph. The inputs give shapes only."""
        key = key or self.key(name, slots, args)
        if key in self.graphs or not self.enabled or key in self.failed:
            return key in self.graphs
        stream, t0 = torch.cuda.current_stream(), time.perf_counter()
        try:
            self.graphs[key] = self.capture(fn, [None if a is None else torch.zeros(
                bucket(len(slots)), *a.shape[1:], dtype=a.dtype, device=a.device) for a in (slots,) + args])
        except Exception as e:  # slower, still right: this piece runs eagerly from now on
            torch.cuda.set_stream(stream)  # a failed capture can leave the capture stream current
            self.failed.add(key)
            cause = e.__context__ or e  # the root cause, not "capture invalidated"
            self.errors.append(f"{key}: {type(cause).__name__}: {cause}")
            warnings.warn(f"CUDA graph capture failed, running eagerly: {self.errors[-1]}")
            return False
        self.capture_s += time.perf_counter() - t0
        self.seen.add(key)  # the capture's warm-up ran it: its first replay is an ordinary step
        return True

    def capture(self, fn, static):
        static[0].fill_(self.dummy_slot)  # all rows padding: the warm-up writes the dummy slot only
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # as the capture will: what it frees must not make the pool's count negative
        before = torch.cuda.memory_reserved()
        self.side = self.side or torch.cuda.Stream()  # one warm-up stream: each stream gets its own cuBLAS workspace
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):  # warm up (allocator, Triton compilation) outside the capture
            fn(*static)
        torch.cuda.current_stream().wait_stream(self.side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the spot trainer's thread may allocate and sync while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn(*static)
        self.pool, self.bytes = self.pool or graph.pool(), self.bytes + torch.cuda.memory_reserved() - before
        return graph, static, out, [0]  # [rows live in the last replay]


def capture_tail(model, drafter, st, cfg, arms, rows, window):
    """Capture every piece the tail can run, for each batch bucket up to `rows` and each arm, before the tail
    starts: a capture in the middle of it would cost the step that does it, and the bandit would read that as
    the arm's speed. The inputs are zeros of the pieces' shapes (a capture needs nothing else)."""
    pool, dev, H = cfg.graphs, st.lens.device, model.args.dim
    if not pool.enabled:
        return
    for b in (b for b in BUCKETS if b <= bucket(rows)):
        z = lambda *shape, dtype=torch.long: torch.zeros(b, *shape, dtype=dtype, device=dev)
        slots = torch.full((b,), pool.dummy_slot, device=dev)
        pool.prepare(*decode_piece(model, cfg), slots, z(), z(1), z(1), None, z(), z(1))
        for a in arms:
            if a.drafter == "ngram":
                pool.prepare(*verify_piece(model, cfg, a.depth), slots, z(), *[z(a.depth + 1)] * 3, None, z(), z())
            elif a.drafter == "model" and drafter is not None:
                T = tree_size(a.depth, a.topk, a.verify_tokens)
                pool.prepare(*verify_piece(model, cfg, a.depth), slots, z(), *[z(T)] * 3, z(T, T, dtype=torch.bool),
                             z(), z())
                f = lambda *shape: z(*shape, dtype=st.hidden.dtype)
                pool.prepare(*draft_piece(drafter, a.depth, a.topk, a.verify_tokens, window), slots, z(), z(window),
                             f(window, H), z(window), z(1))
                pool.prepare(*draft_piece(drafter, a.depth, a.topk, a.verify_tokens), slots, z(), f(H), z(1))


def graph_pool(model, drafter, enabled):
    """The model's pool, rebuilt when the model's weights or cache moved; the drafter's graphs are dropped when
    the drafter's did (another drafter object, a regrown cache). In-place weight updates keep every graph."""
    sig = lambda m: tuple(t.data_ptr() for t in (*m.parameters(), *m.buffers(), m.k_cache, m.v_cache))
    if getattr(model, "graph_pool", None) is None or model.graph_pool.sig != (enabled, sig(model)):
        model.graph_pool = GraphPool(enabled, model.k_cache.shape[1] - 1, (enabled, sig(model)))
    pool = model.graph_pool
    if drafter is not None and getattr(pool, "draft_sig", None) != sig(drafter):
        pool.graphs = {k: g for k, g in pool.graphs.items() if not k[0].startswith("tree")}
        pool.draft_sig = sig(drafter)
    return pool


# ---------------------------------------------------------------------------------------------------------
# generate


@dataclass
class Run:
    temperature: float
    top_p: float
    seed: int
    graphs: GraphPool

    def key(self, name):  # a graph that samples bakes in how: the model's pool outlives this call
        return f"{name}/{self.temperature}/{self.top_p}/{self.seed}"


def cache_slack(arms=()):
    """Cache positions one step may write past a row's length: the same for every call whose arms are no larger
    than the default ones, so that one cache serves them all."""
    return max(a.verify_tokens + a.depth * a.topk for a in DEFAULT_ARMS + tuple(arms)) + 2


def ensure_cache(module, n_slots, max_len, hidden=False):
    """Keep one static cache across calls (CUDA graphs hold its address; the caller sizes it once, from its
    config). Reallocate it only when it is too small (then to the larger of old and new in each dimension) or
    when the module moved to another device or dtype; the old cache and the graphs that hold it are freed first,
    so that two caches never exist at once. The target's cache comes with the engine's per-slot buffers: the
    tokens [S, L] and (`hidden`) the target's features [S, L, H] that the drafter reads."""
    k, w = getattr(module, "k_cache", None), next(module.parameters())
    if k is not None and (k.device != w.device or k.dtype != w.dtype or k.shape[1] < n_slots or k.shape[3] < max_len):
        if k.device == w.device and k.dtype == w.dtype:
            n_slots, max_len = max(n_slots, k.shape[1]), max(max_len, k.shape[3])
        k = release(module)
    if k is None:
        module.setup_cache(n_slots, max_len)
    S, L = module.k_cache.shape[1], module.k_cache.shape[3]
    buf = getattr(module, "buffers_", None)
    if hidden and (buf is None or buf.get("hidden") is None):
        module.buffers_ = dict(tokens=torch.zeros(S, L, dtype=torch.long, device=w.device),
                               hidden=torch.zeros(S, L, module.args.dim, dtype=w.dtype, device=w.device))
    elif buf is None:
        module.buffers_ = dict(tokens=torch.zeros(S, L, dtype=torch.long, device=w.device), hidden=None)
    return module.buffers_


def release(module):
    """Free a module's static cache, the engine's buffers and the CUDA graphs that hold them (the next call
    allocates and captures again): memory for the policy update when both phases do not fit at once."""
    module.graph_pool = module.k_cache = module.v_cache = module.buffers_ = None
    for layer in module.layers:
        layer.self_attn.k_cache = layer.self_attn.v_cache = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_state(prompts, L, dev, hidden_dim=None, dtype=torch.float32, seq_ids=None, group_ids=None, buffers=None):
    """The engine's state for N prompts in slots 0..N-1 plus a spare one; on `buffers` (ensure_cache's persistent
    tokens and features) when given, else on new tensors of L positions."""
    N = len(prompts)
    _, groups = torch.tensor(group_ids if group_ids is not None else range(N)).unique(return_inverse=True)
    group_slots = torch.full((int(groups.max()) + 1, int(torch.bincount(groups).max())), -1, dtype=torch.long)
    for i, g in enumerate(groups.tolist()):  # once per call, tiny
        group_slots[g, int((group_slots[g] >= 0).sum())] = i
    buffers = buffers or dict(tokens=torch.zeros(N + 1, L, dtype=torch.long, device=dev), hidden=None if
                              hidden_dim is None else torch.zeros(N + 1, L, hidden_dim, device=dev, dtype=dtype))
    tokens = torch.zeros(N + 1, max(map(len, prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    buf = buffers["tokens"][:N + 1]
    buf.zero_()
    buf[:, :tokens.shape[1]] = tokens.to(dev)
    z = lambda: torch.zeros(N + 1, dtype=torch.long, device=dev)
    return State(tokens=buf, hidden=None if buffers["hidden"] is None else buffers["hidden"][:N + 1], lens=z(),
                 draft_lens=z(), n_gen=z(),
                 seq_ids=torch.tensor(list(seq_ids if seq_ids is not None else range(N)) + [0], device=dev),
                 groups=torch.cat([groups, groups[:1]]).to(dev), group_slots=group_slots.to(dev),
                 prompt_lens=torch.tensor([len(p) for p in prompts] + [1], device=dev))


def prefill(model, st, slots, prompts, cfg, chunk=512, max_tokens=1 << 15):
    """Run the right-padded prompts through the target, in blocks of rows and chunks of positions of about
    max_tokens tokens; pad positions write K/V past each row's length, never read and later overwritten.
    Samples and returns the first new token of every row [N]."""
    last_h = torch.empty(len(prompts), model.args.dim, device=slots.device, dtype=model.embed_tokens.weight.dtype)
    rows = max(1, max_tokens // min(chunk, max(map(len, prompts))))
    for r0 in range(0, len(prompts), rows):
        s, P = slots[r0:r0 + rows], max(len(p) for p in prompts[r0:r0 + rows])
        plen = st.prompt_lens[s]
        for c0 in range(0, P, chunk):
            h = model.hidden(st.tokens[s, c0:min(P, c0 + chunk)], ctx=Ctx(slots=s, cache_lens=torch.full_like(s, c0)))
            if st.hidden is not None:
                st.hidden[s, c0:c0 + h.shape[1]] = h.to(st.hidden.dtype)
            at = (plen - 1 - c0).clamp(0, h.shape[1] - 1)  # each row's last prompt position, where this chunk has it
            here = ((plen - 1 >= c0) & (plen - 1 < c0 + h.shape[1]))[:, None]
            last_h[r0:r0 + rows] = torch.where(here, h[torch.arange(len(s), device=h.device), at], last_h[r0:r0 + rows])
    plen = st.prompt_lens[slots]
    first = sample(model.logits(last_h[:, None]), st.seq_ids[slots], torch.zeros_like(slots)[:, None],
                   cfg.temperature, cfg.top_p, cfg.seed)[:, 0]
    st.tokens[slots, plen] = first
    st.lens[slots], st.n_gen[slots] = plen, 1
    return first


def to_host(x):
    """The engine's one way to read from the device (a sync): one small read per step. A copy, also on the CPU."""
    return x.to("cpu", copy=True).numpy()


@functools.lru_cache
def rollout_stream(device):  # the rollout runs at high priority: the spot trainer's kernels yield to it
    return torch.cuda.Stream(device, priority=-1)


@contextlib.contextmanager
def on_rollout_stream(device):
    if device.type != "cuda":
        yield
        return
    stream, current = rollout_stream(device), torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


class Finished:
    """Rows that ended: their tokens and features go to (pinned) host memory without stopping the loop, and
    on_finish(row, tokens, hidden) is called once they are there."""

    def __init__(self, st, plen, on_finish):
        self.st, self.plen, self.on_finish, self.pending = st, plen, on_finish, []

    def add(self, rows, n_gen):
        if self.on_finish is None:
            return
        cuda, copies = self.st.tokens.is_cuda, []
        for i, g in zip(rows.tolist(), n_gen.tolist()):
            n = self.plen[i] + g  # prompt + output
            parts = [self.st.tokens[i, :n], None if self.st.hidden is None else self.st.hidden[i, :n - 1]]
            if cuda:  # copies on the current stream into pinned memory, done when the event is
                parts = [p if p is None else torch.empty(p.shape, dtype=p.dtype, pin_memory=True).copy_(
                    p, non_blocking=True) for p in parts]
            copies.append((i, *[p if p is None or cuda else p.clone() for p in parts]))
        event = torch.cuda.Event() if cuda else None  # one for the step's finished rows
        if event is not None:
            event.record()
        self.pending += [(event, *c) for c in copies]
        self.poll()

    def poll(self, wait=False):
        while self.pending and (wait or self.pending[0][0] is None or self.pending[0][0].query()):
            event, i, tokens, hidden = self.pending.pop(0)
            if event is not None:
                event.synchronize()
            self.on_finish(i, tokens, hidden)


def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, eos_id=None, *, drafter=None,
             sd_threshold=32, draft_depth=None, draft_topk=None, verify_tokens=None, bandit=None, seq_ids=None,
             group_ids=None, cuda_graphs=False, on_tail=None, on_finish=None, progress=False, max_prompt_len=0,
             max_rows=0):
    """Generate for a list of token-id prompts. Returns (outputs: list of new-token lists, eos included when
    produced; stats). `drafter`: None (plain decoding), "ngram", or a drafter model (nanotlt.Drafter); SD runs
    only while the active rows are <= sd_threshold. A fixed draft_depth (with draft_topk, verify_tokens) gives
    the bandit a single arm. `seq_ids` key the sampling noise (default: the prompt's index); `group_ids` tell
    the n-gram drafter which rows are GRPO siblings. `cuda_graphs` (CUDA only) replays captured steps.
    `on_tail()` is called once when the tail starts, `on_finish(i, tokens, hidden)` when row i ends (tokens:
    prompt + output; hidden: the target's features of all but the last token, or None). The static cache is
    sized for at least `max_rows` rows and prompts of `max_prompt_len` tokens: a caller that passes its limits
    gets one cache for all its calls. Per step the host reads the device once: which rows finished, and how many
    tokens the step made."""
    dev, N, V = model.inv_freq.device, len(prompts), model.args.vocab_size
    if not all(p and 0 <= min(p) and max(p) < V for p in prompts):
        raise ValueError(f"prompts must be non-empty lists of token ids in [0, {V})")
    learned = drafter is not None and not isinstance(drafter, str)
    if draft_depth is not None:
        arms = [Arm("model" if learned else "ngram", draft_depth, draft_topk or 1, verify_tokens or draft_depth + 1)]
    else:
        arms = default_arms(learned)
    bandit = bandit or Bandit(arms, seed=seed)
    window = max(a.depth for a in bandit.arms) + 1  # the most one SD step commits: the drafter's usual lag
    L = max(max(map(len, prompts)), max_prompt_len) + max_new_tokens + cache_slack(bandit.arms)
    buffers = ensure_cache(model, max(N, max_rows) + 1, L, hidden=learned or on_finish is not None)  # +1: the dummy
    if learned:  # as many slots as the target's cache, so the dummy slot is valid in both
        ensure_cache(drafter, model.k_cache.shape[1], model.k_cache.shape[3])
    cfg = Run(temperature, top_p, seed, graph_pool(model, drafter if learned else None, cuda_graphs))
    n_errors, capture_s = len(cfg.graphs.errors), cfg.graphs.capture_s  # the pool outlives this call
    st = make_state(prompts, L, dev, seq_ids=seq_ids, group_ids=group_ids, buffers=buffers)
    stats = dict(target_forwards=1, verify_steps=0, sd_rows=0, sd_tokens=0, tail_start_s=None, tail_s=0.0,
                 one_off_steps=0, one_off_s=0.0, timeline=[])
    bar = tqdm(total=N, desc="rollout", leave=False, disable=not progress)
    plen = [len(p) for p in prompts]
    done_rows = Finished(st, plen, on_finish)
    t0 = time.perf_counter()
    with torch.inference_mode(), on_rollout_stream(dev):
        slots = torch.arange(N, device=dev)
        first = prefill(model, st, slots, prompts, cfg)
        done = torch.full_like(first, max_new_tokens <= 1, dtype=torch.bool)
        if eos_id is not None:
            done |= first == eos_id
        flags, n_gen = to_host(done), np.ones(N, dtype=np.int64)
        live = np.arange(N)  # the active rows' slots, on the host
        lag = max(plen)  # on the host: the most pairs any active row's drafter cache lacks
        drafted = False  # whether the learned drafter has run in this call
        while True:
            if flags.any():  # rows that finished: O(finished) host work, the device keeps the order of the others
                done_rows.add(live[flags], n_gen[flags])
                bar.update(int(flags.sum()))
                live = live[~flags]
                slots = slots[torch.argsort(done.int(), stable=True)[:len(live)]]
            if not len(live):
                break
            B, step_t0, calls0 = len(live), time.perf_counter(), cfg.graphs.first_calls
            if B <= sd_threshold and stats["tail_start_s"] is None:
                if drafter is not None:
                    capture_tail(model, drafter if learned else None, st, cfg, bandit.arms, B, window)
                stats["tail_start_s"] = time.perf_counter() - t0
                if on_tail is not None:
                    on_tail()
                step_t0 = time.perf_counter()
            arm = bandit.choose(B) if drafter is not None and B <= sd_threshold else None
            use_sd, eager_catch_up = arm is not None and arm.drafter != "plain", False
            if use_sd and arm.drafter == "model" and learned:
                # the tail's first catch-up (the rows' whole history) is a one-off; a later one is what switching
                # from other arms costs, and the arm that needs it pays for it
                eager_catch_up, drafted = lag > window and not drafted, True
                tree = eagle_draft(drafter, st, slots, arm.depth, arm.topk, arm.verify_tokens, cfg.graphs, lag, window)
            elif use_sd:
                tree = ngram_draft(st, slots, arm.depth)
            h, new, count = verify_step(model, st, slots, tree, cfg) if use_sd else decode_step(model, st, slots, cfg)
            count, done = advance(st, slots, h, new, count, eos_id, max_new_tokens)
            # the most pairs the drafter lacks (nothing to read without a learned drafter)
            lag_now = (st.lens[slots] - st.draft_lens[slots]).amax()[None] if learned else count[:1] * 0
            read = to_host(torch.cat([done.long(), st.n_gen[slots], count.sum()[None], lag_now]))  # the one host read
            flags, n_gen, gained, lag = read[:B].astype(bool), read[B:2 * B], int(read[-2]), int(read[-1])
            dt = time.perf_counter() - step_t0
            if cfg.graphs.first_calls != calls0 or eager_catch_up:
                stats["one_off_steps"] += 1  # a capture, a first run or a long catch-up: not the arm's speed
                stats["one_off_s"] += dt
            elif arm is not None:
                bandit.update(B, arm, gained, dt)
            if use_sd:
                stats.update(verify_steps=stats["verify_steps"] + 1, sd_rows=stats["sd_rows"] + B,
                             sd_tokens=stats["sd_tokens"] + gained)
            stats["tail_s"] += dt if stats["tail_start_s"] is not None else 0.0
            stats["target_forwards"] += 1
            stats["timeline"].append((round(step_t0 - t0, 5), B, use_sd))
            done_rows.poll()
        done_rows.poll(wait=True)
        tokens, n_gen = to_host(st.tokens[:N]), to_host(st.n_gen[:N])  # once, at the end
    bar.close()
    outputs = [tokens[i, p:p + g].tolist() for i, (p, g) in enumerate(zip(plen, n_gen))]
    seconds, n_tokens = time.perf_counter() - t0, int(n_gen.sum())
    return outputs, dict(stats, tokens=n_tokens, seconds=seconds, tokens_per_s=n_tokens / seconds, arms=bandit.best(),
                         accept_len=stats["sd_tokens"] / max(1, stats["sd_rows"]),  # tokens per row per verify step
                         graph_pool_mb=cfg.graphs.bytes / 2 ** 20, graph_errors=cfg.graphs.errors[n_errors:],
                         capture_s=cfg.graphs.capture_s - capture_s)


# ---------------------------------------------------------------------------------------------------------
# Benchmark: plain decoding against SD on the same prompts and seed, per batch size


BENCH_PROMPTS = ("Explain how a rainbow forms.", "Why is the sky blue?", "Write a short story about a lighthouse.",
                 "List five uses of a paperclip.", "What is 17 * 23?", "How does a bicycle stay upright?",
                 "Summarise the rules of chess.", "How do vaccines work?")  # for models other than the tiny one


def vs_transformers(model, path, prompts, new_tokens, batches, eos_id, reps=5):
    """Plain greedy decoding against transformers' `generate` (its dynamic cache and SDPA) on the same prompts,
    cut to one length so that neither pads, alternating runs; returns the median of the per-pair time ratios
    (a shared CPU's speed drifts by 10% and more between runs). Both make exactly `new_tokens` (ours ignores eos,
    transformers is kept from it), so the tokens are compared up to the first eos."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(nanotlt.resolve(path), dtype=model.embed_tokens.weight.dtype).eval()
    hf.to(model.inv_freq.device)
    P, rows = min(map(len, prompts)), []
    cut = lambda o: o[:o.index(eos_id)] if eos_id in o else o  # noqa: E731
    for b in batches:
        ps = [prompts[i % len(prompts)][-P:] for i in range(b)]
        ids = torch.tensor(ps, device=model.inv_freq.device)
        ratios, ours_s, hf_s = [], [], []
        for _ in range(reps + 1):  # the first pair warms both up
            t0 = time.perf_counter()
            out, _ = generate(model, ps, new_tokens)  # greedy, no eos: both make exactly new_tokens
            ours_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.no_grad():
                ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[:, P:].tolist()
            hf_s.append(time.perf_counter() - t0)
            ratios.append(hf_s[-1] / ours_s[-1])
        rows.append(dict(batch=b, ours_tok_s=round(b * new_tokens / statistics.median(ours_s[1:]), 1),
                         transformers_tok_s=round(b * new_tokens / statistics.median(hf_s[1:]), 1),
                         speedup=round(statistics.median(ratios[1:]), 3), ratios=[round(r, 3) for r in ratios[1:]],
                         identical=all(cut(o) == r[:len(cut(o))] for o, r in zip(out, ref))))
        print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()))
    return rows


def bench():
    ap = argparse.ArgumentParser(description="plain decoding vs speculative decoding, same prompts and seed")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--model", help="HF Llama/Qwen2 checkpoint (dir or hub id) or smollm2; default: the tiny preset")
    ap.add_argument("--drafter", default="ngram", help="a drafter directory (made by `python drafter.py`, or a "
                                                        "published EAGLE-1 checkpoint) or ngram (default)")
    ap.add_argument("--batch", help="batch sizes (default 1,4,16,32,64 on CUDA, 1,4,16,64 on CPU)")
    ap.add_argument("--new_tokens", type=int, help="default 512 on CUDA, 128 on CPU")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--no_graphs", action="store_true", help="CUDA: eager instead of CUDA graphs")
    ap.add_argument("--fixed_tree", action="store_true", help="also SD with one fixed tree (6/4/16; n-gram 3/1/4)")
    ap.add_argument("--vs_transformers", action="store_true", help="instead: plain greedy decoding against "
                    "transformers' generate on the same prompts (needs --model)")
    args, cuda = ap.parse_args(), torch.cuda.is_available()
    if args.vs_transformers and not args.model:
        raise ValueError("--vs_transformers needs --model (a checkpoint transformers can load, or smollm2)")
    dev = "cuda" if cuda else "cpu"
    if args.model:
        model = nanotlt.Transformer.from_pretrained(args.model, dev, torch.bfloat16 if cuda else torch.float32)
        tok = nanotlt.load_tokenizer(args.model)
        prompts = [nanotlt.encode_prompt(tok, p) for p in BENCH_PROMPTS]
    else:
        model, tok, data_dir = nanotlt.tiny_preset(nanotlt.cache_dir(), dev)
        prompts = [tok.encode(json.loads(line)["prompt"]) for line in open(os.path.join(data_dir, "test.jsonl"))]
        if not cuda and "OMP_NUM_THREADS" not in os.environ:  # tiny shapes gain nothing from threads, and on a
            torch.set_num_threads(1)  # busy machine several threads make timings erratic (up to 100x slower)
    drafter = args.drafter if args.drafter == "ngram" else nanotlt.Drafter.load(args.drafter, model).eval()
    learned, rows, new_tokens = drafter != "ngram", [], args.new_tokens or (512 if cuda else 128)
    name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    batches = list(map(int, (args.batch or ("1,4,16,32,64" if cuda else "1,4,16,64")).split(",")))
    if args.vs_transformers:
        print(json.dumps(dict(device=name, model=args.model, new_tokens=new_tokens,
                              results=vs_transformers(model, args.model, prompts, new_tokens, batches,
                                                       tok.eos_token_id))))
        return
    print(f"{name}: {args.model or 'tiny preset'}, {'learned' if learned else 'n-gram'} drafter, "
          f"temperature {args.temperature}, top_p {args.top_p}, {new_tokens} new tokens")
    for b in batches:
        ps = [prompts[i % len(prompts)] for i in range(b)]
        kw = dict(temperature=args.temperature, top_p=args.top_p, eos_id=tok.eos_token_id,
                  cuda_graphs=not args.no_graphs)
        sd_kw = dict(kw, drafter=drafter, sd_threshold=b,
                     bandit=Bandit(default_arms(learned)))
        tree = dict(sd_kw, bandit=None, draft_depth=6 if learned else 3, draft_topk=4 if learned else 1,
                    verify_tokens=16 if learned else 4)  # one fixed tree: what drafting gives where it runs always
        modes = (("plain", kw), ("sd", sd_kw)) + ((("tree", tree),) if args.fixed_tree else ())
        for _, opts in modes:  # warm-up: allocator, kernels compiled, graphs captured; the bandit explores
            generate(model, ps, new_tokens, **opts)
        best = {}  # best of 3: a busy machine only ever slows a run down
        for mode, opts in modes:
            runs = [generate(model, ps, new_tokens, **opts) for _ in range(3)]
            best[mode] = runs[-1][0], min(r[1]["seconds"] for r in runs), runs[-1][1]
        (out_p, t_p, sp), (out_s, t_s, ss) = best["plain"], best["sd"]
        row = dict(batch=b, tokens=sp["tokens"], plain_tok_s=round(sp["tokens"] / t_p, 1),
                   sd_tok_s=round(ss["tokens"] / t_s, 1), speedup=round(t_p / t_s, 3),
                   accept_len=round(ss["accept_len"], 3), identical=out_p == out_s, arms=ss["arms"],
                   graph_pool_mb=round(ss["graph_pool_mb"], 1), graph_errors=sp["graph_errors"] + ss["graph_errors"])
        if "tree" in best:
            out_t, t_t, tr = best["tree"]
            row.update(tree_speedup=round(t_p / t_t, 3), tree_accept_len=round(tr["accept_len"], 3),
                       identical=row["identical"] and out_t == out_p,
                       graph_errors=row["graph_errors"] + tr["graph_errors"])
        rows.append(row)
        print(" | ".join(f"{k} {v}" for k, v in rows[-1].items() if k != "arms"))
    print(json.dumps(dict(device=name, model=args.model or "tiny", drafter="learned" if learned else "ngram",
                          temperature=args.temperature, top_p=args.top_p, new_tokens=new_tokens, results=rows)))


if __name__ == "__main__":
    try:
        bench()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
