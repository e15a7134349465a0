"""drafter.py: the EAGLE drafter's training: its loss, the step-tagged data buffer, the spot trainer that trains it
in the rollout's tail and idle time, and offline training on text the target writes itself.

The drafter (EAGLE-1, nanotlt.Drafter) is one decoder layer that reads the target's last hidden state h_t after its
final norm and the embedding of the next token x_{t+1}, and predicts h_{t+1}; the target's own frozen LM head turns
that into draft tokens. It learns online from hidden states the rollout computes anyway: `DraftBuffer` keeps them
per RL step, `drafter_loss` scores packed windows, `SpotTrainer` trains a copy of the serving drafter while the
rollout runs and averages the copies across ranks. `python bench.py drafter` trains one offline and exports it.
"""
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
from tqdm import tqdm

from nanotlt import Ctx, Drafter, rng_state, save_safetensors, set_rng_state
from ranks import all_reduce
from spec_decode import Arm, Engine, Sampling


def soft_ce(target, pred, want):
    """Cross-entropy of the drafter's tokens against the target's softmax: pred, want [n, H] -> [n]. The head's
    weights are detached: gradients reach pred, never the shared target (which may be the policy itself)."""
    with torch.no_grad():
        p = torch.softmax(target.logits(want).float(), -1)  # [n, V]
    return -(p * torch.log_softmax(F.linear(pred, target.lm_head.weight.detach()).float(), -1)).sum(-1)


def add_noise(h, scale, generator=None):
    """EAGLE's augmentation of the input features, so that the drafter copes with its own imperfect features when
    it drafts several tokens ahead: uniform noise in [-scale/2, scale/2] (EAGLE: scale 0.2 x 512 / L for a sequence
    of L tokens, +-0.1 at L = 512; ours does not shrink with the packed length)."""
    n = torch.rand(h.shape, generator=generator, device=h.device, dtype=torch.float32)
    return h + ((n - 0.5) * scale).to(h.dtype) if scale else h


def drafter_loss(drafter, tokens, hidden, loss_mask, positions=None, attn_mask=None, ce_weight=0.1, noise=0.0,
                 ce_tokens=None, generator=None):
    """tokens [B, N], hidden [B, N, H] (the target's feature f_t at token t), loss_mask [B, N] (x_t is a response
    token), positions [B, N], attn_mask [B, 1, N, N] bool (None: causal). The pair (x_{t+1}, f_t) at position t
    predicts f_{t+1}. Packed, the pair straddling two samples predicts the next one's first token (which
    DraftBuffer.batch gives no loss) and is last in its block (nobody attends to it), so packing changes nothing.
    EAGLE's loss: SmoothL1(f_pred, f) + ce_weight x soft cross-entropy against the target's softmax, with uniform
    noise of width `noise` added to the input features (see add_noise). The cross-entropy runs the LM head
    over the vocabulary twice per token, most of a step on a CPU: `ce_tokens` takes it on that many random
    predicted tokens, rescaled to the whole (the same loss in expectation).
    Returns (loss summed over the predicted response tokens, their number)."""
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    ctx = None if attn_mask is None else Ctx(mask=attn_mask[..., :-1, :-1])
    f_in = add_noise(hidden[:, :-1], noise, generator)
    pred = drafter.hidden(tokens[:, 1:], f_in, positions[:, :-1], ctx)  # [B, N-1, H]
    m = loss_mask[:, 1:].bool()
    pred, want = pred[m], hidden[:, 1:][m].to(pred.dtype)  # [n, H]: only response tokens reach the head
    l1 = F.smooth_l1_loss(pred.float(), want.float(), reduction="none").mean(-1)  # [n]
    n, scale = len(pred), 1.0
    if ce_tokens is not None and ce_tokens < n:
        pick = torch.randperm(n, generator=generator, device=generator.device if generator else "cpu")[:ce_tokens]
        pred, want, scale = pred[pick.to(pred.device)], want[pick.to(pred.device)], n / ce_tokens
    # in chunks of c tokens, so that [c, V] fp32 logits stay under 512 MB; the backward recomputes them
    c = max(1, 2 ** 27 // drafter.target.args.vocab_size)
    ce = sum(checkpoint(soft_ce, drafter.target, pred[i:i + c], want[i:i + c], use_reentrant=False).sum()
             for i in range(0, len(pred), c))
    return l1.sum() + ce_weight * scale * ce, m.sum()


class DraftBuffer:
    """Step-tagged samples (tokens [n], the target's hidden states [n, H], prompt length) on the CPU, at most
    `max_tokens` in all: the oldest steps are dropped first. Only a packed batch is pinned (for a fast copy to the
    GPU): pinned blocks are rounded up to powers of two and never returned, a whole pinned store would hold GBs."""

    def __init__(self, max_tokens=1 << 21, dtype=None):
        self.max_tokens, self.dtype, self.pin = max_tokens, dtype, torch.cuda.is_available()
        self.steps, self.n_tokens = {}, 0  # step -> [(tokens, hidden, n_prompt)]
        self.lock = threading.Lock()  # the rollout adds while the trainer thread samples

    def add(self, step, tokens, hidden, n_prompt):
        """`hidden` may lack the last token's state (the engine's on_finish): that token is dropped, it has
        nothing to predict."""
        n = min(len(tokens), len(hidden))
        if n <= n_prompt:  # no response token to learn from
            return
        with torch.inference_mode(False):  # on_finish runs in inference mode, whose tensors autograd can't save
            tok = tokens[:n].detach().to("cpu", torch.long, copy=True)
            h = hidden[:n].detach().to("cpu", self.dtype or hidden.dtype, copy=True)  # [n, H]
        with self.lock:
            self.steps.setdefault(step, []).append((tok, h, n_prompt))
            self.n_tokens += n
            while self.n_tokens > self.max_tokens and sum(map(len, self.steps.values())) > 1:
                first = min(self.steps)
                self.n_tokens -= len(self.steps[first].pop(0)[0])
                if not self.steps[first]:
                    del self.steps[first]

    def batch(self, step, max_tokens, rng, device="cpu", min_window=16, row_tokens=512):
        """Samples of step-1 (the last rollout's complete sequences, the long ones included) and of step
        (finished in this rollout) in random order, packed into rows of at most `row_tokens` (attention then
        costs tokens x row_tokens, not tokens^2), at most max_tokens in all. A sample that fits in a row goes
        whole (the drafter learns with the whole context it drafts with); a longer one gives a random window of
        it (at least `min_window` tokens, at least one response token) that keeps its true positions: the far end
        of a long response is learned as often as its start. A packed sample's first token has no loss: the pair
        that predicts it straddles two samples. Returns drafter_loss's keyword arguments ([R, N]: rows padded to
        the longest), or None."""
        with self.lock:
            pool = [s for k in (step - 1, step) for s in self.steps.get(k, [])]
        rng.shuffle(pool)
        W, rows = min(row_tokens, max_tokens), []
        for _ in range(max(1, max_tokens // W)):
            parts, total, rest = [], 0, []
            for tok, h, n_prompt in pool:
                n = min(len(tok), W - total)
                if n < len(tok) and (len(tok) <= W or n < min_window):  # whole in the next row, or a window there
                    rest.append((tok, h, n_prompt))
                    continue
                lo = rng.randint(max(0, n_prompt + 1 - n), len(tok) - n)  # the window ends past the prompt
                parts.append((tok[lo:lo + n], h[lo:lo + n], n_prompt, lo, total))  # `total`: where it goes in the row
                total += n
            if not parts:  # nothing left that fits: the later rows would be empty too
                break
            rows.append(parts)
            pool = rest
        if not rows:
            return None
        R, N, H = len(rows), max(i + len(t) for parts in rows for t, *_, i in parts), rows[0][0][1].shape[1]
        tokens, pos = torch.zeros(R, N, dtype=torch.long), torch.zeros(R, N, dtype=torch.long)  # [R, N]
        seg, loss_mask = torch.full((R, N), -1), torch.zeros(R, N, dtype=torch.bool)  # padding: segment -1
        hidden = torch.zeros(R, N, H, dtype=rows[0][0][1].dtype)  # [R, N, H]
        for r, parts in enumerate(rows):
            for k, (t, h, n_prompt, lo, i) in enumerate(parts):
                tokens[r, i:i + len(t)], hidden[r, i:i + len(t)], seg[r, i:i + len(t)] = t, h, k
                pos[r, i:i + len(t)] = torch.arange(lo, lo + len(t))  # true positions
                loss_mask[r, i + 1:i + len(t)] = pos[r, i + 1:i + len(t)] >= n_prompt
        attn = (seg[:, :, None] == seg[:, None, :]) & (pos[:, :, None] >= pos[:, None, :])  # [R, N, N]
        hidden = hidden.pin_memory() if self.pin else hidden
        return dict(tokens=tokens.to(device), positions=pos.to(device), loss_mask=loss_mask.to(device),
                    hidden=hidden.to(device, non_blocking=True), attn_mask=attn.to(device)[:, None])


class SpotTrainer:
    """Trains `model`, a copy of the serving drafter (own weights, the same frozen target), while the rollout
    runs; the serving drafter changes only in `sync` and `load`, between rollouts. Steps are counted per
    phase: "tail" (during the rollout), "idle" (this rank done, others not), "topup" (after the rollout)."""

    def __init__(self, serving, lr=3e-4, max_tokens=8192, buffer_tokens=1 << 21, grad_clip=1.0, weight_decay=0.0,
                 seed=0, noise=0.2, ce_tokens=None):
        self.serving, self.device, dtype = serving, serving.fc.weight.device, serving.fc.weight.dtype
        # fp32 master weights (a bf16 weight would round most AdamW updates away), bf16 compute under autocast
        self.model = Drafter.from_target(serving.target, fc_bias=serving.fc.bias is not None).float()
        self.model.load_state_dict(serving.state_dict())
        self.autocast = lambda: torch.autocast(self.device.type, dtype, enabled=dtype != torch.float32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.buffer = DraftBuffer(buffer_tokens, dtype)
        self.max_tokens, self.grad_clip, self.noise, self.ce_tokens = max_tokens, grad_clip, noise, ce_tokens
        # the batches' sampler, and the noise and the CE's tokens: not the global RNGs
        self.rng, self.gen = random.Random(seed), torch.Generator(self.device).manual_seed(seed)
        self.data_step, self.phase, self.opt_steps = 0, "tail", 0
        # the lowest priority: the rollout's kernels (on a high-priority stream) go first
        self.stream = torch.cuda.Stream(self.device, priority=0) if self.device.type == "cuda" else None
        self._stop, self._thread, self._error = threading.Event(), None, None
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
        with self.autocast():
            loss_sum, n = drafter_loss(self.model, **b, noise=self.noise, ce_tokens=self.ce_tokens, generator=self.gen)
        loss = loss_sum / n.clamp(min=1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt_steps += 1
        self.losses.append(loss.item())  # one host sync per step: the thread never runs ahead, so a stop waits one step
        key = (phase or self.phase) + "_steps"
        self.counts[key] = self.counts.get(key, 0) + 1
        self.train_s += time.perf_counter() - t0
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

    def train_until(self, step, done):
        """This rank's rollout (of RL step `step`) is over: train (phase "idle") on its data until done() (every
        rank's is), checked before each step. Returns the idle steps run."""
        self.stop()
        self.data_step, n0 = step, self.counts.get("idle_steps", 0)
        self._train_while("idle", lambda: not done(), wait_for_data=True)
        self.stop()
        return self.counts.get("idle_steps", 0) - n0

    def top_up(self, step, min_steps):
        """Extra steps (phase "topup") until this RL step has had min_steps in all (small runs, no long tail)."""
        self.stop()
        self.data_step = step
        self._train_while("topup", lambda: sum(self.counts.values()) < min_steps)
        self.stop()

    @torch.no_grad()
    def sync(self):
        """Average the training copies across ranks (one fp32 all-reduce) and copy the result into the serving
        drafter in place, so the engine's references and CUDA graphs stay valid. Adam moments stay per rank."""
        self.stop()
        train, serve = list(self.model.parameters()), list(self.serving.parameters())
        flat = all_reduce(torch.cat([p.reshape(-1).float() for p in train]))  # [all drafter weights], summed
        flat /= dist.get_world_size() if dist.is_initialized() else 1
        for p, s, v in zip(train, serve, flat.split([p.numel() for p in train])):
            p.copy_(v.view_as(p))
            s.copy_(v.view_as(s))

    def save(self, path):
        """model.safetensors (the trainable weights, EAGLE names) and trainer.pt (optimizer, steps, RNG), each
        written to a temporary file, then renamed."""
        self.stop()
        os.makedirs(path, exist_ok=True)
        state = dict(opt=self.opt.state_dict(), opt_steps=self.opt_steps, data_step=self.data_step,
                     rng=rng_state(self.rng), gen=self.gen.get_state())
        meta = {"opt_steps": str(self.opt_steps)}  # load() checks that both files are from the same step
        for name, write in (("trainer.pt", lambda f: torch.save(state, f)),
                            ("model.safetensors", lambda f: save_safetensors(self.model.state_dict(), f, meta))):
            write(os.path.join(path, name + ".tmp"))
            os.replace(os.path.join(path, name + ".tmp"), os.path.join(path, name))

    def load(self, path):
        """Restore the weights (training copy and serving drafter), optimizer state, steps and sampler rng."""
        from safetensors import safe_open
        self.stop()
        state = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=True)
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            if int(f.metadata()["opt_steps"]) != state["opt_steps"]:
                raise ValueError(f"{path}: model.safetensors and trainer.pt are from different steps")
            weights = {k: f.get_tensor(k) for k in f.keys()}
        self.model.load_state_dict(weights)
        self.serving.load_state_dict(weights)
        self.opt.load_state_dict(state["opt"])
        self.opt_steps, self.data_step = state["opt_steps"], state["data_step"]
        set_rng_state(state["rng"], self.rng)
        self.gen.set_state(state["gen"])


# ----------------------------------------------------------------------------------------------------------
# offline: the target writes its own training text (self-distillation), the drafter learns it


def self_generated(target, prompts, max_new, eos, seed=0, temperature=1.0, batch=None, progress=False):
    """The target's own responses with its features: yields (tokens, hidden, n_prompt), generated in batches of
    rows (only one batch's features wait here at a time: the caller keeps what it wants)."""
    batch, engine = batch or (256 if target.inv_freq.is_cuda else 64), Engine(target)
    with tqdm(total=len(prompts), desc="self-distillation data", disable=not progress) as bar:
        for i in range(0, len(prompts), batch):
            chunk, data = prompts[i:i + batch], []
            engine.generate(chunk, max_new, Sampling(temperature, seed=seed + i), eos,
                            on_finish=lambda j, t, h: data.append((t.cpu(), h.cpu(), len(chunk[j]))))
            bar.update(len(chunk))
            yield from data


def train_offline(target, prompts, eos, steps=400, lr=3e-3, batch_tokens=2048, max_new=256, progress=False,
                  temperature=1.0, minutes=None, init=None, **trainer_kw):
    """A drafter trained on the target's own responses to `prompts` (self-distillation), with the learning rate
    decaying linearly to 10% over `steps` (or over `minutes` of training, whichever ends first). `init`: a
    drafter to start from. Returns the trainer; its serving drafter holds the trained weights."""
    trainer = SpotTrainer(init or Drafter.from_target(target), lr=lr, max_tokens=batch_tokens, **trainer_kw)
    for sample in self_generated(target, prompts, max_new, eos, temperature=temperature, progress=progress):
        trainer.buffer.add(0, *sample)  # tokens, hidden, n_prompt
    if not trainer.buffer.n_tokens:
        raise ValueError(f"no training data: the target wrote no response to any of the {len(prompts)} prompt(s)")
    t0, budget = time.perf_counter(), (minutes or float("inf")) * 60
    with tqdm(total=steps, desc="drafter", disable=not progress) as bar:
        for i in range(steps):
            done = max(i / steps, (time.perf_counter() - t0) / budget)
            if done >= 1:
                break
            for g in trainer.opt.param_groups:  # the last steps polish
                g["lr"] = lr * (1 - 0.9 * done)
            trainer.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{trainer.losses[-1]:.3f}")
    trainer.sync()  # the trained copy becomes the serving drafter
    return trainer


FIXED_TREE = Arm("model", 6, 4, 16)  # how acceptance is measured: one tree shape, the bandit's choices apart


def accept_len(target, drafter, prompts, max_new, eos, arm=FIXED_TREE):
    """Tokens committed per row per verify step, greedy, one fixed tree shape, SD from the first token."""
    engine = Engine(target, drafter, sd_threshold=len(prompts))
    return engine.generate(prompts, max_new, eos_id=eos, arms=[arm])[1]["accept_len"]
