"""spec_decode.py: the rollout engine. Batched generation over a static KV cache with lossless sampling, and
speculative decoding (EAGLE-2 tree drafts, tree verification, KV compaction) while the active batch is small, with
a bandit that picks the tree shape per batch-size bucket, a CUDA-graph pool and a model-free n-gram drafter.
`Engine(model, drafter).generate(prompts, ...)`; `python bench.py engine` compares plain decoding and SD.

Per cache slot the engine keeps the tokens, the target's hidden states of the cached ones (for the drafter), `lens`
(tokens in the target's cache) and the *pending* token tokens[lens], sampled but not yet run through the target.
Each step verifies a tree rooted at it (plain decoding: the root alone) and commits c >= 1 tokens.

Lossless sampling: token t of sequence s is argmax(logits / temperature + g(seed, s, t)), g a Gumbel vector that is
a pure function of its key (tlt_kernels.gumbel_argmax): verifying a draft is an exact-match test, and neither SD
nor batch order or composition can change what is sampled."""
import contextlib
import random
import statistics
import time
import warnings
from dataclasses import astuple, dataclass
from functools import lru_cache, partial

import numpy as np
import torch
from tqdm import tqdm

import nanotlt
import tlt_kernels as kernels
from nanotlt import Ctx


@dataclass(frozen=True)
class Sampling:  # greedy at temperature 0, else softmax(logits / temperature) within the top-p nucleus
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def sample(logits, seq_ids, steps, s: Sampling):
    """logits [B, T, V], seq_ids [B], steps [B, T] -> tokens [B, T]. One pass over the logits (a Triton kernel on
    a GPU); top-p < 1 first masks the logits outside the nucleus, exactly, with a sort over the vocabulary."""
    B, T, V = logits.shape
    if s.temperature == 0:
        return logits.argmax(-1)
    flat = logits.reshape(B * T, V)
    if s.top_p < 1.0:
        flat = flat.masked_fill(kernels.nucleus_drop(flat.float() / s.temperature, s.top_p), float("-inf"))
    triton = logits.is_cuda if nanotlt.USE_TRITON is None else nanotlt.USE_TRITON
    argmax = kernels.gumbel_argmax if triton else kernels.gumbel_argmax_ref
    return argmax(flat, seq_ids[:, None].expand(B, T).reshape(-1), steps.reshape(-1), s.temperature, s.seed).view(B, T)


# ---- the state of a rollout, per cache slot (one per sequence, plus a dummy slot that graph padding points at)
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


def make_state(prompts, tokens, hidden=None, seq_ids=None, group_ids=None):
    """The state of N prompts in slots 0..N-1 plus a spare one, on the first N + 1 rows of tokens and hidden."""
    N, dev = len(prompts), tokens.device
    _, groups = torch.tensor(group_ids if group_ids is not None else range(N)).unique(return_inverse=True)
    pad = partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
    group_slots = pad([(groups == g).nonzero()[:, 0] for g in range(int(groups.max()) + 1)], padding_value=-1)
    host = pad([torch.tensor(p) for p in prompts])  # [N, P]
    tokens = tokens[:N + 1].zero_()
    tokens[:N, :host.shape[1]] = host.to(dev)
    z = lambda: torch.zeros(N + 1, dtype=torch.long, device=dev)
    return State(tokens=tokens, hidden=None if hidden is None else hidden[:N + 1], lens=z(), draft_lens=z(),
                 n_gen=z(), seq_ids=torch.tensor(list(seq_ids if seq_ids is not None else range(N)) + [0], device=dev),
                 groups=torch.cat([groups, groups[:1]]).to(dev), group_slots=group_slots.to(dev),
                 prompt_lens=torch.tensor([len(p) for p in prompts] + [1], device=dev))


def prefill(model, kv, st, slots, prompts, sampling, chunk=512, max_tokens=1 << 15):
    """Run the right-padded prompts through the target in blocks of rows x chunks of positions of about max_tokens
    tokens (pad positions write K/V past a row's length, unread); sample and return each row's first new token [N]."""
    last_h = torch.empty(len(prompts), model.args.dim, device=slots.device, dtype=model.embed_tokens.weight.dtype)
    rows = max(1, max_tokens // min(chunk, max(map(len, prompts))))
    for r0 in range(0, len(prompts), rows):
        s, P = slots[r0:r0 + rows], max(len(p) for p in prompts[r0:r0 + rows])
        plen = st.prompt_lens[s]
        for c0 in range(0, P, chunk):
            h = model.hidden(st.tokens[s, c0:min(P, c0 + chunk)], ctx=Ctx(s, torch.full_like(s, c0), kv=kv))
            if st.hidden is not None:
                st.hidden[s, c0:c0 + h.shape[1]] = h.to(st.hidden.dtype)
            at = (plen - 1 - c0).clamp(0, h.shape[1] - 1)  # each row's last prompt position, where this chunk has it
            here = ((plen - 1 >= c0) & (plen - 1 < c0 + h.shape[1]))[:, None]
            last_h[r0:r0 + rows] = torch.where(here, h[torch.arange(len(s), device=h.device), at], last_h[r0:r0 + rows])
    plen = st.prompt_lens[slots]
    first = sample(model.logits(last_h[:, None]), st.seq_ids[slots], torch.zeros_like(slots)[:, None], sampling)[:, 0]
    st.tokens[slots, plen] = first
    st.lens[slots], st.n_gen[slots] = plen, 1
    return first


def verify(model, kv, sampling, max_depth, slots, lens, tokens, parents, depth, mask, seq_ids, n_gen):
    """Run the tree [B, T] through the target (node at lens + depth, seeing its ancestors), sample its token after
    each node, and compact the K/V of the longest path from the root along those choices. Returns the path's hidden
    states [B, max_depth + 1, H], new tokens [B, max_depth + 1] (the path's, then a bonus) and the count cached [B]."""
    (B, T), dev = tokens.shape, slots.device
    h = model.hidden(tokens, lens[:, None] + depth, Ctx(slots, lens, mask, kv=kv))  # [B, T, H]
    choice = sample(model.logits(h), seq_ids, n_gen[:, None] + depth, sampling)  # [B, T]
    right = (tokens == choice.gather(1, parents.clamp(min=0))) & (parents >= 0)  # [B, T] the target's next token
    right[:, 0] = True  # the root; a node without a parent (a NaN drafter's tree) is never right
    anc = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(B, T, T)
    on_path = ~(anc & ~right[:, None, :]).any(-1)  # [B, T] the node and all its ancestors are right
    # siblings are distinct, so the nodes on the path form one chain from the root: at most one per depth
    cur = (on_path * (depth + 1)).argmax(1, keepdim=True)  # [B, 1] its deepest node
    accepted = depth.gather(1, cur)[:, 0]  # [B]
    levels = torch.arange(max_depth + 1, device=dev)[None, :, None]
    path = (on_path[:, None, :] & (depth[:, None, :] == levels)).int().argmax(-1)  # [B, max_depth + 1]
    count, bonus = accepted + 1, choice.gather(1, cur)  # root + accepted nodes enter the cache
    new_tokens = torch.cat([tokens.gather(1, path[:, 1:]), bonus], 1)  # [B, max_depth + 1]
    new_tokens.scatter_(1, accepted[:, None], bonus)  # the bonus right after the accepted path
    if T > 1:  # a lone root is where it belongs
        kernels.compact_kv(*kv, slots, lens, path, count)
    return h.gather(1, path[..., None].expand(-1, -1, h.shape[-1])), new_tokens, count


def advance(st, slots, h, new_tokens, count, eos_id, max_new):
    """Commit `count` [B] tokens per row, cut after a row's first eos and at max_new generated tokens: the hidden
    states h [B, P, H] of the tokens now cached and the new_tokens [B, P] after them (entries past the count are
    written too, past the row's length). Returns the tokens each row gained and whether it is done, [B] each."""
    idx = torch.arange(new_tokens.shape[1], device=slots.device)  # [P]
    count = torch.minimum(count, max_new - st.n_gen[slots])  # room >= 1 while a row is active
    done = st.n_gen[slots] + count >= max_new
    if eos_id is not None:
        eos = (new_tokens == eos_id) & (idx < count[:, None])  # [B, P]
        done |= eos.any(1)
        count = torch.minimum(count, torch.where(eos, idx, new_tokens.shape[1]).amin(1) + 1)
    pos = st.lens[slots, None] + idx  # [B, P]
    if st.hidden is not None:
        st.hidden[slots[:, None], pos] = h.to(st.hidden.dtype)
    st.tokens[slots[:, None], pos + 1] = new_tokens
    st.lens[slots] += count
    st.n_gen[slots] += count
    return count, done


# ---- drafting: EAGLE-2 trees of the learned drafter (over its own cache `kv`), or model-free n-gram chains
def ancestor_mask(parents, max_depth):  # parents [B, T] (-1 for the root) -> [B, T, T] ancestor-or-self
    (B, T), dev = parents.shape, parents.device
    mask = torch.eye(T, dtype=torch.bool, device=dev).expand(B, T, T).clone()
    anc, b, rows = parents.clone(), torch.arange(B, device=dev)[:, None], torch.arange(T, device=dev)
    for _ in range(max_depth):  # max_depth hops up reach the root from any node
        mask[b, rows, anc.clamp(min=0)] |= anc >= 0  # row b's own nodes only (a bare `:` would mix rows)
        anc = torch.where(anc >= 0, parents.gather(1, anc.clamp(min=0)), anc)
    return mask


def pairs(st, slots, start, n):  # the drafter's inputs at t = start [B] + 0..n-1: x_{t+1} [B, n], h_t [B, n, H], t
    t = start[:, None] + torch.arange(n, device=slots.device)
    return st.tokens[slots[:, None], t + 1], st.hidden[slots[:, None], t], t


def read_pairs(drafter, kv, slots, lens, x, h, t, prev=None):
    """The drafter over pairs at positions t -> its output [B, H] at lens - 1 where this chunk holds it, else `prev`."""
    out = drafter.hidden(x, h, t, Ctx(slots, t[:, 0], kv=kv))  # [B, n, H]
    last = lens - 1 - t[:, 0]  # index of the pending token's pair
    picked = out.gather(1, last.clamp(0, t.shape[1] - 1)[:, None, None].expand(-1, 1, out.shape[-1]))[:, 0]
    return picked if prev is None else torch.where(((last >= 0) & (last < t.shape[1]))[:, None], picked, prev)


def catch_up(drafter, kv, st, slots, todo, chunk=512):
    """Run the drafter over the pairs (x_{t+1}, h_t), t in [draft_lens, lens), it has not seen; return its guess of
    the pending token's hidden state [B, H]. Rows share one window of `todo` pairs (the most any row lacks) ending at
    their last pair: a row lacking fewer redoes pairs (same K/V), a shorter one starts at 0 (writes are unread)."""
    lens = st.lens[slots]
    start, root_h = (lens - todo).clamp(min=0), None
    for c0 in range(0, todo, chunk):
        root_h = read_pairs(drafter, kv, slots, lens, *pairs(st, slots, start + c0, min(chunk, todo - c0)), root_h)
    st.draft_lens[slots] = lens
    return root_h


def tree_size(depth, topk, n_verify):  # the nodes grow_tree keeps: the root and at most every candidate
    return min(n_verify, 1 + topk + (depth - 1) * topk ** 2)


def grow_tree(drafter, kv, depth, topk, n_verify, slots, lens, root_h, pending):
    """EAGLE-2 -> tokens, parents, depths [B, n_verify] and ancestor mask [B, n_verify, n_verify]. Each depth expands
    the k best beams (by cumulative log-prob) by top-k, rerunning all beams (fixed shapes, no K/V bookkeeping); then
    the best n_verify-1 nodes are kept (a child never outscores its parent, shallower wins ties: they form a tree)."""
    B, k, dev = len(slots), topk, slots.device
    score, tok = torch.log_softmax(drafter.logits(root_h).float(), -1).topk(k, -1)  # [B, k] depth-1 nodes = beams
    cand_tok, cand_score, cand_parent, cand_depth = [tok], [score], [torch.full_like(tok, -1)], [torch.ones_like(tok)]
    beam_idx = torch.arange(k, device=dev).expand(B, k)  # candidate index of each current beam
    beam_tok, beam_in_h = tok, root_h[:, None].expand(B, k, -1)  # drafter inputs of all beams so far
    beam_mask = torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)  # ancestor-or-self among them
    for d in range(1, depth):
        n, base = beam_tok.shape[1], sum(t.shape[1] for t in cand_tok)  # beams and candidates so far
        pos = lens[:, None] + torch.arange(n, device=dev) // k  # [B, n]: depth-j beams sit at lens + j - 1
        h_last = drafter.hidden(beam_tok, beam_in_h, pos, Ctx(slots, lens, beam_mask, kv=kv))[:, -k:]  # [B, k, H]
        child_score, child_tok = torch.log_softmax(drafter.logits(h_last).float(), -1).topk(k, -1)  # [B, k, k]
        child_score, child_tok = (score[:, :, None] + child_score).flatten(1), child_tok.flatten(1)  # [B, k*k]
        cand_tok.append(child_tok), cand_score.append(child_score), cand_depth.append(torch.full_like(child_tok, d + 1))
        cand_parent.append(beam_idx[:, :, None].expand(B, k, k).flatten(1))
        score, best = child_score.topk(k, -1)  # the next beams
        beam_idx = base + best
        beam_tok = torch.cat([beam_tok, child_tok.gather(1, best)], 1)
        beam_in_h = torch.cat([beam_in_h, h_last.gather(1, (best // k)[..., None].expand(-1, -1, h_last.shape[-1]))], 1)
        rows = beam_mask.gather(1, (n - k + best // k)[..., None].expand(-1, -1, n))  # the parent beam's ancestry
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


def window_then_grow(drafter, kv, depth, topk, n_verify, slots, lens, x, h, t, pending):
    """The drafter over the pairs the previous SD step committed, then the tree's growth: one graph."""
    return grow_tree(drafter, kv, depth, topk, n_verify, slots, lens, read_pairs(drafter, kv, slots, lens, x, h, t),
                     pending)


def ngram_draft(st, slots, depth, n_max=3):
    """Model-free drafts: what followed the latest earlier occurrence of the last n tokens (n = n_max..1) in the row
    or its GRPO siblings (which often repeat each other); past what is known the span repeats (periodic text)."""
    B, dev = len(slots), slots.device
    ends = st.lens[slots] + 1  # sequence length including the pending token
    members = st.group_slots[st.groups[slots]]  # [B, G] slots of each row's group (padded with -1)
    seqs = st.tokens[members.clamp(min=0)]  # [B, G, L]
    member_ends = torch.where(members >= 0, st.lens[members.clamp(min=0)] + 1, 0)  # [B, G]
    best_g, best_p = torch.zeros_like(ends), torch.full_like(ends, -1)  # chosen member, where its continuation starts
    for n in range(n_max, 0, -1):
        query = st.tokens[slots[:, None], (ends[:, None] - n + torch.arange(n, device=dev)).clamp(min=0)]
        hit = (seqs.unfold(2, n, 1) == query[:, None, None]).all(-1)  # [B, G, L-n+1]
        p = torch.arange(hit.shape[2], device=dev)
        hit &= p + n < member_ends[..., None]  # something follows (which also rules out the query itself)
        val, arg = torch.where(hit, p + n, -1).flatten(1).max(1)  # the latest continuation
        take = (best_p < 0) & (val >= 0) & (ends >= n)  # a row shorter than n has no n-gram to look up
        best_g, best_p = torch.where(take, arg // hit.shape[2], best_g), torch.where(take, val, best_p)
    span = (member_ends.gather(1, best_g[:, None]) - best_p[:, None]).clamp(min=1)  # known tokens after the match
    idx = (best_p.clamp(min=0)[:, None] + torch.arange(depth, device=dev) % span).clamp(max=seqs.shape[2] - 1)
    chain = seqs[torch.arange(B, device=dev)[:, None], best_g[:, None], idx]  # [B, depth]
    ar = torch.arange(depth + 1, device=dev).expand(B, depth + 1)
    return Tree(torch.cat([st.tokens[slots, st.lens[slots]][:, None], chain], 1), ar - 1, ar, None, depth)


# ---- choosing the tree shape: BEG-MAB, one epsilon-greedy bandit per batch-size bucket
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
    """Arms are tree shapes; reward is committed tokens per second of draft + verify. Per bucket each arm is tried
    once, then the best median of a sliding window (robust to outlier steps) is played, or a random arm while
    exploring has taken under `eps` of the time. A memory guard drops arms whose verify_tokens x rows is over budget."""

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
        return self.rng.choice(ok) if self.exploring else max(ok, key=lambda a: statistics.median(self.rewards[b, a]))

    def update(self, rows, arm, tokens, seconds):
        r = self.rewards.setdefault((bucket(rows), arm), [])
        r.append(tokens / seconds)
        del r[:-self.window]
        self.seconds += seconds
        self.explore_s += seconds if self.exploring else 0.0

    def state_dict(self):  # plain lists (a checkpoint loads without unpickling objects)
        return dict(rewards=[[b, list(astuple(a)), r] for (b, a), r in self.rewards.items()],
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


def tree_name(arm):  # a drafter graph's name
    return f"tree{arm.depth}/{arm.topk}/{arm.verify_tokens}"


def cache_slack(arms=()):  # positions one step may write past a row's length: one for all arms up to the defaults
    return max(a.verify_tokens + a.depth * a.topk for a in DEFAULT_ARMS + tuple(arms)) + 2


# ---- CUDA graphs (GPU only): fixed-shape pieces captured per (name, batch bucket, shapes), in one memory pool
class GraphPool:
    """The active batch is padded to its bucket with rows that point at `dummy_slot`, a cache slot no row owns
    (length 0, zeros elsewhere): they read nothing. A piece whose capture fails runs eagerly from then on.
    `first_calls` counts first calls of pieces (a capture, or an eager run that compiles): not the arm's speed."""

    def __init__(self, enabled, dummy_slot):
        self.enabled, self.dummy_slot = enabled and torch.cuda.is_available(), dummy_slot
        self.graphs, self.pool, self.bytes, self.errors, self.side = {}, None, 0, [], None
        self.failed, self.seen, self.first_calls, self.captures, self.capture_s = set(), set(), 0, 0, 0.0

    def key(self, name, slots, args):
        return (name, bucket(len(slots))) + tuple(None if a is None else tuple(a.shape[1:]) for a in args)

    def __call__(self, name, fn, slots, *args):  # fn(slots, *args) -> tuple of tensors, rows first
        B, key = len(slots), self.key(name, slots, args)
        self.first_calls += key not in self.seen
        self.seen.add(key)
        if not self.prepare(name, fn, slots, *args, key=key):
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
        if key in self.graphs or not self.enabled or key in self.failed or len(slots) > BUCKETS[-1]:
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
        self.captures, self.capture_s = self.captures + 1, self.capture_s + time.perf_counter() - t0
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


# ---- the engine
def to_host(x):  # the engine's one way to read the device (a sync), once per step; a copy, also on the CPU
    return x.to("cpu", copy=True).numpy()


@lru_cache
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


def weights_and_cache(module, kv):  # what a captured graph holds the addresses of
    return tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers(), *kv))


class Engine:
    """The rollout engine of a target model (like nanotlt.Transformer): static KV caches, per-slot buffers, CUDA graphs
    (`cuda_graphs`) and the bandit, kept across calls. `drafter`: None, "ngram" or a learned one (like nanotlt.Drafter);
    SD runs while at most `sd_threshold` rows are active. The caches, first made for at least `rows` x `length`, only
    grow: graphs hold their addresses, and two never exist at once."""

    def __init__(self, model, drafter=None, sd_threshold=32, bandit=None, cuda_graphs=False, rows=0, length=0):
        self.model, self.drafter, self.sd_threshold, self.cuda_graphs = model, drafter, sd_threshold, cuda_graphs
        self.learned = drafter is not None and not isinstance(drafter, str)
        self.bandit = bandit or Bandit(default_arms(self.learned))
        self.size, self.kv, self.draft_kv, self.tokens, self.hidden, self.graphs, self.sig = (rows, length), *[None] * 6

    def reserve(self, rows, length, hidden):
        """Caches for `rows` slots (the dummy one included) x `length` positions: K/V, tokens and (with `hidden`) the
        target's features. Kept when large enough, else reallocated at the larger of old and new in each."""
        w = next(self.model.parameters())
        if self.kv is not None and (self.kv[0].shape[1] < rows or self.kv[0].shape[3] < length):
            self.size = (max(rows, self.kv[0].shape[1]), max(length, self.kv[0].shape[3]))
            self.release()
        if self.kv is None:
            rows, length = max(rows, self.size[0]), max(length, self.size[1])
            self.kv = nanotlt.kv_cache(self.model, rows, length)
            self.draft_kv = nanotlt.kv_cache(self.drafter, rows, length) if self.learned else ()
            self.tokens = torch.zeros(rows, length, dtype=torch.long, device=w.device)
        if hidden and self.hidden is None:
            self.hidden = torch.zeros(*self.tokens.shape, self.model.args.dim, dtype=w.dtype, device=w.device)
        sig = weights_and_cache(self.model, self.kv) + (weights_and_cache(self.drafter, self.draft_kv)
                                                        if self.learned else ())
        if sig != self.sig:  # new caches, or weights that moved (freed for an update): graphs hold old addresses
            self.graphs, self.sig = GraphPool(self.cuda_graphs, self.kv[0].shape[1] - 1), sig

    def release(self):  # free caches, buffers and graphs (memory for the policy update); the next call remakes them
        self.kv = self.draft_kv = self.tokens = self.hidden = self.graphs = self.sig = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate(self, prompts, max_new_tokens, sampling=Sampling(), eos_id=None, *, seq_ids=None, group_ids=None,
                 arms=None, sd_threshold=None, on_tail=None, on_finish=None, progress=False):
        """Generate for token-id prompts; returns (outputs: each prompt's new tokens, up to eos; stats). `arms` (one: a
        fixed shape) and `sd_threshold` replace the engine's; `seq_ids` key the sampling noise (default: the index);
        `group_ids` mark GRPO siblings for the n-gram drafter. `on_tail()` is called once when the tail starts, and
        `on_finish(i, tokens, hidden)` when row i ends (prompt + output, the target's features of all but the last)."""
        N, V = len(prompts), self.model.args.vocab_size
        if not all(p and 0 <= min(p) and max(p) < V for p in prompts):
            raise ValueError(f"prompts must be non-empty lists of token ids in [0, {V})")
        bandit = Bandit(arms, seed=sampling.seed) if arms else self.bandit
        window = max(a.depth for a in bandit.arms) + 1  # the most one SD step commits: the drafter's usual lag
        self.reserve(N + 1, max(map(len, prompts)) + max_new_tokens + cache_slack(bandit.arms),
                     hidden=self.learned or on_finish is not None)
        pool, dev = self.graphs, self.tokens.device
        captures0, capture_s0, errors0 = pool.captures, pool.capture_s, len(pool.errors)
        st = make_state(prompts, self.tokens, self.hidden, seq_ids, group_ids)
        stats = dict(target_forwards=1, verify_steps=0, sd_rows=0, sd_tokens=0, tail_start_s=None, tail_s=0.0,
                     one_off_steps=0, one_off_s=0.0, timeline=[])
        bar = tqdm(total=N, desc="rollout", leave=False, disable=not progress)
        plen = [len(p) for p in prompts]
        t0 = time.perf_counter()
        with torch.inference_mode(), on_rollout_stream(dev), bar:
            slots = torch.arange(N, device=dev)
            first = prefill(self.model, self.kv, st, slots, prompts, sampling)
            done = torch.full_like(first, max_new_tokens <= 1, dtype=torch.bool)
            if eos_id is not None:
                done |= first == eos_id
            flags, n_gen, live = to_host(done), np.ones(N, dtype=np.int64), np.arange(N)  # live: the active slots
            lag, drafted = max(plen), False  # the most pairs any row's drafter cache lacks; drafted in this call
            while True:
                if flags.any():  # rows that finished: O(finished) host work, the device keeps the order of the others
                    for i, g in zip(live[flags].tolist(), n_gen[flags].tolist()):  # the step's read synced: no stall
                        if on_finish is not None:
                            on_finish(i, st.tokens[i, :plen[i] + g], st.hidden[i, :plen[i] + g - 1])
                    bar.update(int(flags.sum()))
                    live = live[~flags]
                    slots = slots[torch.argsort(done.int(), stable=True)[:len(live)]]
                if not len(live):
                    break
                B, step_t0, calls = len(live), time.perf_counter(), pool.first_calls
                tail = B <= (self.sd_threshold if sd_threshold is None else sd_threshold)
                if tail and stats["tail_start_s"] is None:
                    self.capture_tail(st, bandit.arms, B, window, sampling)
                    stats["tail_start_s"] = step_t0 - t0
                    if on_tail is not None:
                        on_tail()
                    step_t0 = time.perf_counter()
                arm = bandit.choose(B) if tail and self.drafter is not None else None
                # the first catch-up (all history) is a one-off; a later one is what switching arms costs: the arm pays
                one_off = arm is not None and arm.drafter == "model" and lag > window and not drafted
                drafted |= arm is not None and arm.drafter == "model"
                h, new, count = self.step(st, slots, arm, lag, window, sampling)
                count, done = advance(st, slots, h, new, count, eos_id, max_new_tokens)
                lag_now = (st.lens[slots] - st.draft_lens[slots]).amax()[None] if self.learned else count[:1] * 0
                read = to_host(torch.cat([done.long(), st.n_gen[slots], count.sum()[None], lag_now]))  # the one read
                flags, n_gen, gained, lag = read[:B].astype(bool), read[B:2 * B], int(read[-2]), int(read[-1])
                dt = time.perf_counter() - step_t0
                if pool.first_calls != calls or one_off:  # a capture, a first run or a long catch-up: not the arm's
                    stats.update(one_off_steps=stats["one_off_steps"] + 1, one_off_s=stats["one_off_s"] + dt)
                elif arm is not None:
                    bandit.update(B, arm, gained, dt)
                sd = arm is not None and arm.drafter != "plain"
                stats.update(verify_steps=stats["verify_steps"] + sd, sd_rows=stats["sd_rows"] + sd * B,
                             sd_tokens=stats["sd_tokens"] + sd * gained, target_forwards=stats["target_forwards"] + 1,
                             tail_s=stats["tail_s"] + (dt if tail else 0.0))
                stats["timeline"].append((round(step_t0 - t0, 5), B, sd))
            tokens, n_gen = to_host(st.tokens[:N]), to_host(st.n_gen[:N])  # once, at the end
        outputs = [tokens[i, p:p + g].tolist() for i, (p, g) in enumerate(zip(plen, n_gen))]
        seconds, n_tokens = time.perf_counter() - t0, int(n_gen.sum())
        return outputs, dict(stats, tokens=n_tokens, seconds=seconds, tokens_per_s=n_tokens / seconds,
                             arms=bandit.best(), accept_len=stats["sd_tokens"] / max(1, stats["sd_rows"]),
                             graph_pool_mb=pool.bytes / 2 ** 20, graph_errors=pool.errors[errors0:],
                             captures=pool.captures - captures0, capture_s=pool.capture_s - capture_s0)

    def draft(self, st, slots, arm, lag, window):
        """The tree rooted at each row's pending token: the root alone (no arm or "plain"), an n-gram chain, or EAGLE-2
        once the drafter has read the `lag` pairs it lacks (eagerly, or if lag <= `window` in the growing graph)."""
        lens = st.lens[slots]
        pending = st.tokens[slots, lens][:, None]  # [B, 1]
        if arm is None or arm.drafter == "plain":
            return Tree(pending, torch.full_like(pending, -1), torch.zeros_like(pending), None, 0)
        if arm.drafter == "ngram":
            return ngram_draft(st, slots, arm.depth)
        shape, name = (self.drafter, self.draft_kv, arm.depth, arm.topk, arm.verify_tokens), tree_name(arm)
        if lag > window:
            root_h = catch_up(self.drafter, self.draft_kv, st, slots, lag)
            return Tree(*self.graphs(name, partial(grow_tree, *shape), slots, lens, root_h, pending), arm.depth)
        st.draft_lens[slots] = lens
        return Tree(*self.graphs(f"{name}+{window}", partial(window_then_grow, *shape), slots, lens,
                                 *pairs(st, slots, (lens - window).clamp(min=0), window), pending), arm.depth)

    def step(self, st, slots, arm, lag, window, sampling):
        """One step: a draft tree verified in one target forward -> what `advance` commits (h, new tokens, count)."""
        tree = self.draft(st, slots, arm, lag, window)
        fn = partial(verify, self.model, self.kv, sampling, tree.max_depth)
        return self.graphs(f"verify{tree.max_depth}/{sampling}", fn, slots, st.lens[slots], tree.tokens,
                           tree.parents, tree.depth, tree.mask, st.seq_ids[slots], st.n_gen[slots])

    def capture_tail(self, st, arms, rows, window, sampling):
        """Capture, with zero inputs, every piece the tail can run (per batch bucket up to `rows`, per arm) before it
        starts: a capture would cost its step, which the bandit would read as the arm's speed."""
        pool, dev, H = self.graphs, st.lens.device, self.model.args.dim
        if not pool.enabled or self.drafter is None:
            return
        for b in (b for b in BUCKETS if b <= bucket(rows)):
            z = lambda *shape, dtype=torch.long: torch.zeros(b, *shape, dtype=dtype, device=dev)
            slots, f = torch.full((b,), pool.dummy_slot, device=dev), lambda *shape: z(*shape, dtype=st.hidden.dtype)
            for a in [Arm("plain", 0, 1, 1)] + [a for a in arms if self.learned or a.drafter != "model"]:
                T = 1 if a.drafter == "plain" else a.depth + 1 if a.drafter == "ngram" else tree_size(
                    a.depth, a.topk, a.verify_tokens)
                mask = z(T, T, dtype=torch.bool) if a.drafter == "model" else None
                verify_fn = partial(verify, self.model, self.kv, sampling, a.depth)
                pool.prepare(f"verify{a.depth}/{sampling}", verify_fn, slots, z(), z(T), z(T), z(T), mask, z(), z())
                if a.drafter == "model":
                    grow = (self.drafter, self.draft_kv, a.depth, a.topk, a.verify_tokens)
                    pool.prepare(f"{tree_name(a)}+{window}", partial(window_then_grow, *grow), slots, z(),
                                 z(window), f(window, H), z(window), z(1))
                    pool.prepare(tree_name(a), partial(grow_tree, *grow), slots, z(), f(H), z(1))
