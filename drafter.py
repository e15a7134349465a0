"""drafter.py: the EAGLE-style drafter and its spot trainer (DESIGN.md §4 "Drafter", "Spot trainer").

The drafter is one decoder layer that reads the target's last-layer hidden state h_t and the embedding of
the next token x_{t+1}, and predicts h_{t+1}; the target's own frozen final norm and LM head turn that into
draft tokens. It learns online from hidden states the rollout computes anyway: `DraftBuffer` keeps them per
RL step, `drafter_loss` scores packed samples, `SpotTrainer` trains a copy of the serving drafter in the
rollout's tail and idle time and averages the copies across ranks; `export` writes an EAGLE checkpoint.

    python drafter.py [--model NAME_OR_PATH] [--steps N] [--out DIR]

trains one offline on text the target generates itself; the last line (JSON) gives the acceptance length
before and after. The export (DIR/config.json + DIR/model.safetensors) loads in EAGLE-capable engines.
"""
import argparse
import copy
import json
import os
import random
import threading
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanotlt import Block, Ctx, RopeFP32, rope_cos_sin, rope_inv_freq, save_safetensors, setup_cache


class Drafter(RopeFP32):
    """EAGLE-1 drafter. Only `fc` and `layers.0` are its own weights (named as EAGLE checkpoints name them);
    the embedding, final norm and LM head are the target's, shared and frozen, never copied."""

    def __init__(self, target):
        super().__init__()
        a = target.args
        self.fc = nn.Linear(2 * a.dim, a.dim, bias=False)
        self.layers = nn.ModuleList([Block(a, input_norm=False)])
        self.register_buffer("inv_freq", rope_inv_freq(a), persistent=False)
        object.__setattr__(self, "target", target)  # a plain reference: not a submodule, not in state_dict

    def rope_args(self):
        return self.target.args

    @classmethod
    def from_target(cls, target):
        w = target.embed_tokens.weight
        return cls(target).to(device=w.device, dtype=w.dtype)

    @classmethod
    def load(cls, path, target):
        """A drafter for `target` from an `export` directory or a checkpoint (model.safetensors, EAGLE names)."""
        from safetensors.torch import load_file
        f = path if path.endswith(".safetensors") else os.path.join(path, "model.safetensors")
        state = {k.removeprefix("model."): v for k, v in load_file(f).items()}
        drafter = cls.from_target(target)  # strict: fails loudly if the shapes do not fit this target
        drafter.load_state_dict({k: v for k, v in state.items() if k.startswith(("fc.", "layers."))})
        return drafter

    def hidden(self, tokens, h, positions, ctx=None):
        """tokens [B, T] = x_{t+1}, h [B, T, H] = target h_t, positions [B, T] = t  ->  predicted h_{t+1}."""
        with torch.no_grad():  # the shared embedding is frozen
            emb = self.target.embed_tokens(tokens)
        x = self.fc(torch.cat((emb, h.to(emb.dtype)), dim=-1))
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        return self.layers[0](x, cos, sin, ctx)

    def logits(self, h):
        return self.target.logits(h)

    def setup_cache(self, n_slots, max_len, dtype=None):
        dtype = dtype or self.fc.weight.dtype
        self.k_cache, self.v_cache = setup_cache(self.layers, n_slots, max_len, self.fc.weight.device, dtype)


def soft_ce(target, pred, want):
    """Cross-entropy of the drafter's tokens against the target's softmax: pred, want [n, H] -> [n]. The head's
    weights are detached: gradients reach pred, never the shared target (which may be the policy itself)."""
    with torch.no_grad():
        p = torch.softmax(target.logits(want).float(), -1)  # [n, V]
    norm = target.norm(pred, target.norm.weight.detach())  # no swapped-in weight: other threads use this module
    return -(p * torch.log_softmax(F.linear(norm, target.lm_head.weight.detach()).float(), -1)).sum(-1)


def drafter_loss(drafter, tokens, hidden, loss_mask, positions=None, attn_mask=None, ce_weight=0.1):
    """tokens [B, N], hidden [B, N, H] (the target's h_t at token t), loss_mask [B, N] (x_t is a response
    token), positions [B, N], attn_mask [B, 1, N, N] bool (None: causal). The pair (x_{t+1}, h_t) at position t
    predicts h_{t+1}. Packed, the pair straddling two samples predicts the next one's first token (a prompt
    token: no loss) and is last in its block (nobody attends to it), so packing changes nothing.
    Returns (loss summed over the predicted response tokens, their number)."""
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    ctx = None if attn_mask is None else Ctx(mask=attn_mask[..., :-1, :-1])
    pred = drafter.hidden(tokens[:, 1:], hidden[:, :-1], positions[:, :-1], ctx)  # [B, N-1, H]
    m = loss_mask[:, 1:].bool()
    pred, want = pred[m], hidden[:, 1:][m].to(pred.dtype)  # [n, H]: only response tokens reach the head
    # in chunks of c tokens, so that [c, V] fp32 logits stay under 512 MB; the backward recomputes them
    c = max(1, 2 ** 27 // drafter.target.args.vocab_size)
    ce = sum(checkpoint(soft_ce, drafter.target, pred[i:i + c], want[i:i + c], use_reentrant=False).sum()
             for i in range(0, len(pred), c))
    l1 = F.smooth_l1_loss(pred.float(), want.float(), reduction="none").mean(-1)  # [n]
    return l1.sum() + ce_weight * ce, m.sum()


class DraftBuffer:
    """Step-tagged samples (tokens [n], the target's hidden states [n, H], prompt length) on the CPU, at most
    `max_tokens` in all: the oldest steps are dropped first. Only a packed batch is pinned (for a fast copy to the
    GPU): pinned blocks are rounded up to powers of two and never returned, a whole pinned store would hold GBs."""

    def __init__(self, max_tokens=1 << 21, dtype=None):
        self.max_tokens, self.dtype, self.pin = max_tokens, dtype, torch.cuda.is_available()
        self.steps, self.n_tokens, self.count = {}, 0, 0  # step -> {key: (tokens, hidden, n_prompt)}
        self.lock = threading.Lock()  # the rollout adds while the trainer thread samples

    def add(self, step, tokens, hidden, n_prompt, key=None):
        """`hidden` may lack the last token's state (the engine's on_finish): that token is dropped, it has
        nothing to predict. Adding again under the same (step, key) replaces: the log-prob pass may re-add
        what the rollout gave."""
        n = min(len(tokens), len(hidden))
        if n <= n_prompt:  # no response token to learn from
            return
        with torch.inference_mode(False):  # on_finish runs in inference mode, whose tensors autograd can't save
            tok = tokens[:n].detach().to("cpu", torch.long, copy=True)
            h = hidden[:n].detach().to("cpu", self.dtype or hidden.dtype, copy=True)  # [n, H]
        with self.lock:
            self.count += 1
            samples, key = self.steps.setdefault(step, {}), ("auto", self.count) if key is None else key
            old = samples.pop(key, None)
            samples[key] = (tok, h, n_prompt)
            self.n_tokens += n - (0 if old is None else len(old[0]))
            while self.n_tokens > self.max_tokens and sum(map(len, self.steps.values())) > 1:
                first = min(self.steps)
                self.n_tokens -= len(self.steps[first].pop(next(iter(self.steps[first])))[0])
                if not self.steps[first]:
                    del self.steps[first]

    def batch(self, step, max_tokens, rng, device="cpu"):
        """Samples of step-1 (the last rollout's complete sequences, the long ones included) and of step
        (finished in this rollout) in random order, packed into one sequence of at most max_tokens (only a
        sample alone in its batch is cropped). Returns drafter_loss's keyword arguments, or None."""
        with self.lock:
            pool = [s for k in (step - 1, step) for s in self.steps.get(k, {}).values()]
        rng.shuffle(pool)
        parts, total = [], 0
        for tok, h, n_prompt in pool:
            n = len(tok) if parts else min(len(tok), max_tokens)
            if total + n <= max_tokens and n > n_prompt:
                parts.append((tok[:n], h[:n], n_prompt))
                total += n
        if not parts:
            return None
        seg = torch.cat([torch.full((len(t),), i) for i, (t, _, _) in enumerate(parts)]).to(device)  # [N]
        pos = torch.cat([torch.arange(len(t)) for t, _, _ in parts]).to(device)  # [N], from 0 in each sample
        n_prompt = torch.tensor([p for _, _, p in parts], device=device)[seg]  # [N]
        hidden = torch.cat([h for _, h, _ in parts])  # [N, H]
        hidden = hidden.pin_memory() if self.pin else hidden
        attn = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])  # [N, N] block-diagonal causal
        return dict(tokens=torch.cat([t for t, _, _ in parts]).to(device)[None], positions=pos[None],
                    hidden=hidden.to(device, non_blocking=True)[None], loss_mask=(pos >= n_prompt)[None],
                    attn_mask=attn[None, None])


class SpotTrainer:
    """Trains `model`, a copy of the serving drafter (own weights, the same frozen target), while the rollout
    runs; the serving drafter changes only in `sync` and `load`, between rollouts. Steps are counted per
    phase: "tail" (during the rollout), "idle" (this rank done, others not), "topup" (after the rollout)."""

    def __init__(self, serving, lr=3e-4, max_tokens=8192, buffer_tokens=1 << 21, ckpt_dir=None, ckpt_every=0,
                 grad_clip=1.0, weight_decay=0.0, seed=0):
        self.serving, self.device, dtype = serving, serving.fc.weight.device, serving.fc.weight.dtype
        # fp32 master weights (a bf16 weight would round most AdamW updates away), bf16 compute under autocast
        self.model = Drafter.from_target(serving.target).float()
        self.model.load_state_dict(serving.state_dict())
        self.autocast = lambda: torch.autocast(self.device.type, dtype, enabled=dtype != torch.float32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.buffer = DraftBuffer(buffer_tokens, dtype)
        self.max_tokens, self.grad_clip, self.rng = max_tokens, grad_clip, random.Random(seed)
        self.ckpt_dir, self.ckpt_every = ckpt_dir, ckpt_every
        self.data_step, self.phase, self.opt_steps = 0, "tail", 0
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._stop, self._thread, self._saver, self._error = threading.Event(), None, None, None
        self._lock = threading.Lock()  # one optimizer step or one checkpoint snapshot at a time
        self._save_lock = threading.Lock()  # one save in flight
        self.stats()

    def stats(self):
        """Since the last call: steps per phase, their mean loss, seconds spent in them, seconds callers waited
        in stop() for a running step to end (the rollout's direct loss to preemption)."""
        out = {"tail_steps": 0, "idle_steps": 0, "topup_steps": 0, **getattr(self, "counts", {}),
               "loss": sum(self.losses) / len(self.losses) if getattr(self, "losses", None) else 0.0,
               "train_s": getattr(self, "train_s", 0.0), "stop_wait_s": getattr(self, "stop_wait_s", 0.0)}
        self.counts, self.losses, self.train_s, self.stop_wait_s = {}, [], 0.0, 0.0
        return out

    def train_step(self, phase=None):
        """One AdamW step on a packed batch of steps data_step-1 and data_step. False when there is no data."""
        t0 = time.perf_counter()
        b = self.buffer.batch(self.data_step, self.max_tokens, self.rng, self.device)
        if b is None:
            return False
        with self._lock:
            with self.autocast():
                loss_sum, n = drafter_loss(self.model, **b)
            loss = loss_sum / n.clamp(min=1)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.opt.step()
            self.opt_steps += 1
            loss = loss.item()  # one host sync per step: the thread never runs ahead, so a stop waits one step
        key = (phase or self.phase) + "_steps"
        self.counts[key] = self.counts.get(key, 0) + 1
        self.losses.append(loss)
        self.train_s += time.perf_counter() - t0
        if self.ckpt_dir and self.ckpt_every and self.opt_steps % self.ckpt_every == 0:
            self.save_async(self.ckpt_dir)
        return True

    def _train_while(self, phase, more, wait_for_data=False):
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            while more():  # checked before every step: the caller gets the device back within one step
                if not self.train_step(phase):
                    if not wait_for_data:
                        return
                    time.sleep(0.005)

    def _run(self):
        try:
            if self.device.type == "cuda":  # a new thread starts on GPU 0: it would open a context there
                torch.cuda.set_device(self.device)
            self._train_while(None, lambda: not self._stop.is_set(), wait_for_data=True)
        except BaseException as e:  # re-raised by stop(), in the caller's thread
            self._error = e

    def start(self, step, phase="tail"):
        """Train in a background thread on the data of steps step-1 and step (if not already running)."""
        self.data_step, self.phase = step, phase
        if self._thread is None:
            if self.stream is not None:  # the side stream must see what the main stream wrote (new weights)
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="spot-trainer", daemon=True)
            self._thread.start()

    def stop(self):
        """Stop the background thread: returns as soon as its current step (at most one) is done."""
        t0 = time.perf_counter()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.stop_wait_s += time.perf_counter() - t0
        if self.stream is not None:  # what runs next on the main stream sees the trained weights
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def train_until_all_done(self, step, group=None, idle_steps=0):
        """This rank's rollout (of RL step `step`) is over: train (phase "idle") on its data until every rank's
        is. An async all-reduce completes once the last rank posts it; it is polled before each step. Without
        torch.distributed: `idle_steps` steps. Returns the idle steps run."""
        self.stop()
        self.data_step = step
        n0 = self.counts.get("idle_steps", 0)
        if dist.is_available() and dist.is_initialized():
            flag = torch.ones(1, device=self.device if dist.get_backend(group) == "nccl" else "cpu")
            work = dist.all_reduce(flag, group=group, async_op=True)
            self._train_while("idle", lambda: not work.is_completed(), wait_for_data=True)
            work.wait()
        else:
            self._train_while("idle", lambda: self.counts.get("idle_steps", 0) - n0 < idle_steps)
        self.stop()
        return self.counts.get("idle_steps", 0) - n0

    def top_up(self, step, min_steps):
        """Extra steps (phase "topup") until this RL step has had min_steps in all (small runs, no long tail)."""
        self.stop()
        self.data_step = step
        self._train_while("topup", lambda: sum(self.counts.values()) < min_steps)
        self.stop()

    @torch.no_grad()
    def sync(self, group=None):
        """Average the training copies across ranks (one fp32 all-reduce) and copy the result into the serving
        drafter in place, so the engine's references and CUDA graphs stay valid. Adam moments stay per rank."""
        self.stop()
        train, serve = list(self.model.parameters()), list(self.serving.parameters())
        flat = torch.cat([p.reshape(-1).float() for p in train])  # [all drafter weights]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, group=group)
            flat /= dist.get_world_size(group)
        for p, s, v in zip(train, serve, flat.split([p.numel() for p in train])):
            p.copy_(v.view_as(p))
            s.copy_(v.view_as(s))

    # Checkpoints: model.safetensors (the trainable weights, EAGLE names) + trainer.pt (optimizer, steps, rng),
    # each written to a temporary file, then renamed. At most one save in flight: a new one waits for it.

    def save_async(self, path):
        with self._save_lock:
            self.wait()
            with self._lock:  # between two optimizer steps: a consistent snapshot
                weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                state = dict(opt=copy.deepcopy(self.opt.state_dict()), opt_steps=self.opt_steps,
                             data_step=self.data_step, rng=self.rng.getstate())
            self._saver = threading.Thread(target=write_checkpoint, args=(path, weights, state))
            self._saver.start()

    def wait(self):
        saver = self._saver
        if saver is not None:
            saver.join()

    def save(self, path):
        self.save_async(path)
        self.wait()

    def load(self, path):
        """Restore the weights (training copy and serving drafter), optimizer state, steps and sampler rng."""
        from safetensors import safe_open
        self.stop()
        self.wait()
        state = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=True)
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            if int(f.metadata()["opt_steps"]) != state["opt_steps"]:
                raise ValueError(f"{path}: model.safetensors and trainer.pt are from different steps")
            weights = {k: f.get_tensor(k) for k in f.keys()}
        with self._lock:
            self.model.load_state_dict(weights)
            self.serving.load_state_dict(weights)
            self.opt.load_state_dict(state["opt"])
            self.opt_steps, self.data_step = state["opt_steps"], state["data_step"]
            self.rng.setstate(state["rng"])


def write_checkpoint(path, weights, state):
    os.makedirs(path, exist_ok=True)
    meta = {"opt_steps": str(state["opt_steps"])}  # load() checks that both files are from the same step
    for name, write in (("trainer.pt", lambda f: torch.save(state, f)),
                        ("model.safetensors", lambda f: save_safetensors(weights, f, meta))):
        write(os.path.join(path, name + ".tmp"))
        os.replace(os.path.join(path, name + ".tmp"), os.path.join(path, name))


def export(drafter, out_dir, architecture=None):
    """Write the drafter as an HF-style EAGLE-1 checkpoint: config.json (the target's Llama/Qwen2 config with one
    layer; `bias` is EAGLE's flag for a bias on fc) and model.safetensors named as EAGLE names it (fc.weight,
    layers.0.self_attn.q_proj.weight, ...; no input_layernorm). No embedding and no LM head: EAGLE-1 drafters
    in SGLang / vLLM take both from the target. `architecture` overrides the name an engine may want (SGLang's
    EAGLE-1 drafts are "LlamaForCausalLMEagle" / "Qwen2ForCausalLMEagle")."""
    a, dtype = drafter.target.args, drafter.fc.weight.dtype
    qwen = getattr(a, "arch", "qwen2" if a.qkv_bias else "llama") == "qwen2"
    cfg = dict(architectures=[architecture or ("Qwen2ForCausalLM" if qwen else "LlamaForCausalLM")],
               model_type="qwen2" if qwen else "llama",
               hidden_size=a.dim, intermediate_size=a.intermediate_size, num_attention_heads=a.n_heads,
               num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim, num_hidden_layers=1, vocab_size=a.vocab_size,
               rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, rope_scaling=a.rope_scaling, hidden_act="silu",
               attention_bias=a.qkv_bias, bias=False, max_position_embeddings=getattr(a, "max_seq_len", 4096),
               tie_word_embeddings=False, torch_dtype=str(dtype).removeprefix("torch."))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    save_safetensors(drafter.state_dict(), os.path.join(out_dir, "model.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# Offline warm-up: the target writes its own training text (self-distillation), the drafter learns it.


GENERIC_PROMPTS = ("Explain how a rainbow forms.", "Why is the sky blue?", "Write a short story about a lighthouse.",
                   "List five uses of a paperclip.", "What is 17 * 23?", "How does a bicycle stay upright?",
                   "Summarise the rules of chess.", "How do vaccines work?")  # for models other than the tiny one


def self_generated(target, prompts, max_new, eos, seed=0, batch=256):
    """The target's own sampled responses (temperature 1) with its hidden states: [(tokens, hidden, n_prompt)]."""
    from spec_decode import generate
    data = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        generate(target, chunk, max_new, temperature=1.0, seed=seed + i, eos_id=eos,
                 on_finish=lambda j, t, h: data.append((t.cpu(), h.cpu(), len(chunk[j]))))
    return data


def train_offline(target, prompts, eos, steps=300, lr=3e-3, batch_tokens=2048, max_new=256, progress=False):
    """A drafter trained on the target's own sampled responses to `prompts` (self-distillation), with the learning
    rate decaying linearly to 10%. Returns the trainer; its serving drafter holds the trained weights."""
    from tqdm import tqdm
    trainer = SpotTrainer(Drafter.from_target(target), lr=lr, max_tokens=batch_tokens)
    for tokens, hidden, n_prompt in self_generated(target, prompts, max_new, eos):
        trainer.buffer.add(0, tokens, hidden, n_prompt)
    for i in (bar := tqdm(range(steps), desc="drafter", disable=not progress)):
        for g in trainer.opt.param_groups:  # the last steps polish
            g["lr"] = lr * (1 - 0.9 * i / steps)
        trainer.train_step()
        bar.set_postfix(loss=f"{trainer.losses[-1]:.3f}")
    trainer.sync()  # the trained copy becomes the serving drafter
    return trainer


def accept_len(target, drafter, prompts, max_new, eos, depth=6, topk=4, verify=16):
    """Tokens committed per row per verify step, greedy, one fixed tree shape, SD from the first token."""
    from spec_decode import generate
    return generate(target, prompts, max_new, eos_id=eos, drafter=drafter, sd_threshold=len(prompts),
                    draft_depth=depth, draft_topk=topk, verify_tokens=verify)[1]["accept_len"]


def main():
    import nanotlt
    import rl
    ap = argparse.ArgumentParser(description="Train an EAGLE drafter offline on the target's own text.")
    ap.add_argument("--model", help="HF Llama/Qwen2 checkpoint (default: the tiny offline preset)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="out/drafter")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch_tokens", type=int, default=2048)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    args = ap.parse_args()
    t0, device = time.time(), "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if args.model is None:
        cache = os.environ.get("NANOTLT_CACHE", os.path.expanduser("~/.cache/nanotlt"))
        target, tok, data = nanotlt.tiny_preset(cache, device)
        train, test = ([tok.encode(r["prompt"]) for r in rl.load_rows(os.path.join(data, f))[0]][:n]
                       for f, n in (("train.jsonl", 512), ("test.jsonl", 32)))
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        target = nanotlt.Transformer.from_pretrained(args.model, device, dtype)
        tok = nanotlt.load_tokenizer(args.model)
        prompts = [rl.encode_prompt(tok, p) for p in GENERIC_PROMPTS]
        train, test = prompts[:-2] * 4, prompts[-2:]  # 4 samples per prompt: sampling makes them differ
    target.requires_grad_(False)
    before = accept_len(target, Drafter.from_target(target), test, args.max_new_tokens, tok.eos_token_id)
    trainer = train_offline(target, train, tok.eos_token_id, args.steps, args.lr, args.batch_tokens,
                            args.max_new_tokens, progress=True)
    after = accept_len(target, trainer.serving, test, args.max_new_tokens, tok.eos_token_id)
    trainer.save(os.path.join(args.out, "checkpoint"))
    export(trainer.serving, args.out)
    print(json.dumps(dict(accept_len_before=round(before, 3), accept_len_after=round(after, 3), steps=args.steps,
                          train_tokens=trainer.buffer.n_tokens, out=args.out,
                          seconds=round(time.time() - t0, 1))))


if __name__ == "__main__":
    main()
