"""train.py: GRPO for reasoning with TLT rollouts (speculative decoding with a drafter trained in the tail).

    python train.py                              # no GPU: the tiny preset, offline, a few minutes on 2 cores
    torchrun --nproc_per_node 8 train.py         # one 8-GPU box: the default real configuration
    torchrun --nproc_per_node 2 train.py         # CPU too (gloo), tiny preset
    python train.py --steps 20 --out out/run1    # any config field can be overridden: --key value
    python train.py --resume                     # continue from the latest checkpoint in --out
    python train.py --bench                      # the same steps with SD off and on; last line JSON
    python train.py --preset tiny --model tiny:qwen2.5-1.5b   # the tiny task, a model of real shape (GPU)

One step on one rank: rollout with SD and the spot trainer -> rewards -> group advantages -> update ->
weights into the inference copy -> drafter averaged across ranks -> metrics -> checkpoint (DESIGN.md §3).
"""
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import nanotlt
import rl
from drafter import Drafter, SpotTrainer
from spec_decode import Bandit, generate


@dataclass
class Config:
    preset: str = "auto"  # auto: "real" with CUDA, "tiny" without
    model: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    dataset: str = "openai/gsm8k"
    eval_dataset: str = ""  # default: the test split of `dataset`
    out: str = "out"
    steps: int = 200
    prompts_per_step: int = 64  # across all ranks; each rank rolls out whole GRPO groups
    group_size: int = 8
    max_new_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    updates_per_rollout: int = 1  # > 1: the clipped ratio (eps_low 0.2, eps_high 0.28) comes into play
    micro_batch_tokens: int = 32768
    kl_coef: float = 0.0  # > 0: k3 KL against the frozen initial policy
    mask_truncated: bool = True
    sd: str = "on"  # "off": the baseline, everything else equal
    sd_threshold: int = 32  # SD (and spot training) while active rows <= this
    drafter_lr: float = 3e-4
    drafter_tokens: int = 8192  # tokens per packed drafter batch
    drafter_min_steps: int = 0  # top the spot trainer up to this many steps per RL step (single process)
    tail_training: bool = True  # train the drafter during the tail; off where nothing idles (2 CPU cores)
    drafter_init: str = ""  # a drafter exported by `python drafter.py`
    eval_every: int = 20
    eval_prompts: int = 128
    save_every: int = 20
    seed: int = 0
    resume: bool = False
    bench: bool = False
    cuda_graphs: bool = True
    grad_checkpointing: bool = True


TINY = dict(model="tiny", dataset="tiny", steps=30, prompts_per_step=32, group_size=8, max_new_tokens=256,
            lr=3e-5, micro_batch_tokens=8192, sd_threshold=16, drafter_lr=3e-3, drafter_tokens=2048,
            drafter_min_steps=20, tail_training=False, eval_every=5, eval_prompts=128, save_every=5, cuda_graphs=False,
            grad_checkpointing=False)


def parse_args(argv):
    """`--key value` for any Config field (`--flag` alone sets a bool); a preset's values apply first."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    given, i = {}, 0
    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--") and "=" in a else [a])]
    while i < len(argv):
        key = argv[i].removeprefix("--").replace("-", "_")
        if not argv[i].startswith("--") or key not in fields:
            raise ValueError(f"unknown argument {argv[i]!r} (known: {', '.join('--' + k for k in fields)})")
        typ = type(fields[key].default)
        if typ is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            given[key], i = True, i + 1
            continue
        if i + 1 == len(argv):
            raise ValueError(f"--{key} needs a value")
        val = argv[i + 1]
        if typ is bool:
            if val.lower() not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
                raise ValueError(f"--{key} takes true/false, got {val!r}")
            given[key] = val.lower() in ("1", "true", "on", "yes")
        else:
            try:
                given[key] = typ(val)
            except ValueError:
                raise ValueError(f"--{key} takes a {typ.__name__}, got {val!r}") from None
        i += 2
    preset = given.get("preset", "auto")
    if preset == "auto":
        preset = "real" if torch.cuda.is_available() else "tiny"
        why = "a CUDA device is available" if preset == "real" else "no CUDA device, so offline on the CPU"
    elif preset in ("real", "tiny"):
        why = "--preset"
    else:
        raise ValueError(f"unknown preset {preset!r} (choose auto, real or tiny)")
    cfg = Config(**{**(TINY if preset == "tiny" else {}), **given, "preset": preset})
    if cfg.sd not in ("on", "off"):
        raise ValueError(f"--sd takes on or off, got {cfg.sd!r}")
    for key in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "updates_per_rollout", "eval_prompts"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key} must be at least 1, got {getattr(cfg, key)}")
    return cfg, why


# ---------------------------------------------------------------------------------------------------------
# setup


def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1
    if not torch.cuda.is_available():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # machines without a network interface
    # long first steps (kernel compilation, graph capture, 8k-token tails) must not trip the default 10-minute timeout
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=1))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def all_reduce(x, op=None):  # a no-op in a single process
    if dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def all_reduce_dict(d, device, op=None):
    """All-reduce a dict of numbers (the same keys on every rank) in one collective."""
    return dict(zip(d, all_reduce(torch.tensor(list(d.values()), dtype=torch.float64, device=device), op).tolist()))


def load_models(cfg, device):
    """The policy (fp32 weights for the optimizer), its inference copy (bf16 on GPU) and the tokenizer."""
    if cfg.model.split(":")[0] == "tiny":  # "tiny", or "tiny:SHAPE": a model of another shape on the tiny task
        cache = os.environ.get("NANOTLT_CACHE", os.path.expanduser("~/.cache/nanotlt"))
        policy, tok, data_dir = nanotlt.tiny_preset(cache, device=device, shape=cfg.model.partition(":")[2] or "tiny")
        if cfg.dataset == "tiny":
            cfg.dataset = os.path.join(data_dir, "train.jsonl")
            cfg.eval_dataset = cfg.eval_dataset or os.path.join(data_dir, "test.jsonl")
    else:
        policy = nanotlt.Transformer.from_pretrained(cfg.model, device=device, dtype=torch.float32)
        tok = nanotlt.load_tokenizer(cfg.model)
    policy.grad_checkpointing = cfg.grad_checkpointing
    infer = copy.deepcopy(policy).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    infer.requires_grad_(False)
    return policy.train(), infer, tok


def load_prompts(tok, source, split, max_prompt_len):
    rows, bad = rl.load_rows(source, split)
    for r in rows:
        instruction = "" if isinstance(tok, nanotlt.CharTokenizer) else "\n" + rl.MATH_INSTRUCTION  # tiny task: none
        r["ids"] = rl.encode_prompt(tok, r["prompt"] + instruction)
    too_long = [len(r["ids"]) for r in rows if len(r["ids"]) > max_prompt_len]
    if too_long:
        raise ValueError(f"{len(too_long)} prompts of {source!r} are longer than the context allows "
                         f"(longest {max(too_long)} tokens > {max_prompt_len} = context - max_new_tokens)")
    return rows, bad


# ---------------------------------------------------------------------------------------------------------
# the RL step


def step_prompts(rows, cfg, step, rank, world):
    """This rank's prompts for a step: a seeded permutation per epoch, whole groups per rank."""
    P, per_rank = cfg.prompts_per_step, cfg.prompts_per_step // world
    epoch, pos = divmod(step * P, len(rows))
    order = list(range(len(rows)))
    random.Random(cfg.seed * 1000003 + epoch).shuffle(order)
    idx = [order[(pos + i) % len(rows)] for i in range(P)]
    return [(step * P + i, rows[idx[i]]) for i in range(rank * per_rank, (rank + 1) * per_rank)]


def rollout(cfg, infer, tok, rows, drafter, trainer, bandit, step, greedy=False, progress=False, **kw):
    """Generate G samples per prompt. Returns outputs, the flat (global sample id, row) list and stats."""
    G = 1 if greedy else cfg.group_size
    samples = [(gid * G + g, row) for gid, row in rows for g in range(G)]
    on_tail = on_finish = None
    if trainer is not None:
        on_tail = (lambda: trainer.start(step, "tail")) if cfg.tail_training else None
        on_finish = lambda i, tokens, hidden: trainer.buffer.add(step, tokens, hidden, len(samples[i][1]["ids"]))
    outputs, stats = generate(infer, [r["ids"] for _, r in samples], cfg.max_new_tokens,
                              0.0 if greedy else cfg.temperature, cfg.top_p, cfg.seed, tok.eos_token_id,
                              seq_ids=[s for s, _ in samples], group_ids=[s // G for s, _ in samples],
                              cuda_graphs=cfg.cuda_graphs, on_tail=on_tail, on_finish=on_finish, progress=progress,
                              **{**dict(drafter=drafter, sd_threshold=cfg.sd_threshold, bandit=bandit), **kw})
    return outputs, samples, stats


def update(cfg, policy, ref, opt, samples, outputs, adv, world, progress=False):
    """The policy update: micro-batches of similar length, token-level loss normalised by the global number of
    response tokens, gradients summed across ranks. Returns the loss summed over this rank's micro-batches (the
    ranks' sums add up to the batch loss). Raises on every rank together if any rank's loss is not finite."""
    seqs = []  # (input ids, first response position, response length, advantage)
    for (_, row), out, a in zip(samples, outputs, adv.tolist()):
        seqs.append((row["ids"] + out, len(row["ids"]), len(out), a))
    device = next(policy.parameters()).device
    n_tokens = all_reduce(torch.tensor(float(sum(s[2] for s in seqs)), device=device))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    batches, cur = [], []
    for i in order:  # token-budget micro-batches over length-sorted sequences: little padding
        if cur and (len(cur) + 1) * len(seqs[i][0]) > cfg.micro_batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    batches = [[seqs[i] for i in b] for b in batches]
    with torch.no_grad():  # the behaviour policy (for the clipped ratio) and the frozen reference (for the KL)
        T = cfg.temperature or 1.0  # greedy rollouts: plain log-probs
        old = [logprobs(policy, b, device, T)[0] for b in batches] if cfg.updates_per_rollout > 1 else None
        refs = [logprobs(ref, b, device, T)[0] for b in batches] if ref is not None else None
    total = torch.zeros((), device=device)
    for _ in range(cfg.updates_per_rollout):
        for j, b in enumerate(batches if not progress else __import__("tqdm").tqdm(batches, desc="update", leave=False)):
            logp, mask, a = logprobs(policy, b, device, T)
            loss, _ = rl.policy_loss(logp, logp.detach() if old is None else old[j], a, mask, n_tokens,
                                     ref_logp=None if refs is None else refs[j], kl_coef=cfg.kl_coef)
            loss.backward()
            total += loss.detach()
        if not all_reduce(torch.isfinite(total).float(), dist.ReduceOp.MIN).item():
            raise FloatingPointError("non-finite loss: try a lower --lr")
        if world > 1:  # loss is already divided by the global token count: the sum is the batch mean
            for p in policy.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total.item() / cfg.updates_per_rollout


def logprobs(policy, seqs, device, temperature=1.0):
    """Log-probs of the response tokens under softmax(logits / temperature), the distribution the rollout sampled
    from: (logp [B, T-1], mask [B, T-1], advantages [B])."""
    T = max(len(s[0]) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)  # mask[b, t]: token t+1 is a response token
    for b, (toks, start, n, _) in enumerate(seqs):
        ids[b, :len(toks)] = torch.tensor(toks)
        mask[b, start - 1:start - 1 + n] = 1
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        logp, _ = rl.token_logprobs(policy, ids.to(device), temperature=temperature)
    return logp.float(), mask.to(device), torch.tensor([s[3] for s in seqs], device=device)


@torch.no_grad()
def copy_weights(src, dst):
    for (name, p), q in zip(src.named_parameters(), dst.parameters()):
        q.copy_(p)


def evaluate(cfg, infer, tok, rows, drafter, rank, world, device):
    """Greedy accuracy on held-out prompts (split across ranks) and, with a drafter, its acceptance length on
    them with one fixed tree shape for all rows (the bandit's choices would blur how well the drafter follows)."""
    rows = rows[:cfg.eval_prompts]
    mine = [(i, r) for i, r in enumerate(rows) if i % world == rank]
    sd = dict(sd_threshold=len(mine), draft_depth=6, draft_topk=4, verify_tokens=16) if drafter is not None else {}
    outs, samples, stats = rollout(cfg, infer, tok, mine, drafter, None, None, -1, greedy=True, **sd)
    correct = sum(rl.math_reward(tok.decode(o, skip_special_tokens=True), r["answer"]) for o, (_, r) in zip(outs, samples))
    s = all_reduce(torch.tensor([float(correct), stats["sd_tokens"], stats["sd_rows"]], device=device)).tolist()
    out = dict(eval_accuracy=s[0] / max(1, len(rows)))
    return dict(out, eval_accept_len=s[1] / max(1, s[2])) if drafter is not None else out


# ---------------------------------------------------------------------------------------------------------
# checkpoints: written by rank 0 into a temporary directory, then renamed, so a crash mid-save never leaves
# a checkpoint that loads half; read back without unpickling arbitrary objects (safetensors, weights_only)


def save_checkpoint(cfg, step, policy, tok, opt, trainer, rank):
    if rank == 0:
        final = os.path.join(cfg.out, "ckpt", f"step_{step:06d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        nanotlt.save_pretrained(policy, os.path.join(tmp, "policy"))
        if hasattr(tok, "save_pretrained"):  # an HF tokenizer: the policy dir is a complete model to serve
            tok.save_pretrained(os.path.join(tmp, "policy"))
        if trainer is not None:
            trainer.save(os.path.join(tmp, "drafter"))
        torch.save({"step": step, "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                    "python_rng": list(random.getstate()[1])}, os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(cfg.out, "ckpt", "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(cfg.out, "ckpt", "latest.tmp"), os.path.join(cfg.out, "ckpt", "latest"))
        done = sorted(d for d in os.listdir(os.path.join(cfg.out, "ckpt")) if d.startswith("step_") and "." not in d)
        for old in done[:-2]:
            shutil.rmtree(os.path.join(cfg.out, "ckpt", old))  # keep the last two
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(cfg, policy, infer, opt, trainer):
    """Restore the latest checkpoint; returns the step to continue from."""
    latest = os.path.join(cfg.out, "ckpt", "latest")
    if not os.path.exists(latest):
        raise ValueError(f"--resume: no checkpoint in {cfg.out}/ckpt")
    path = os.path.join(cfg.out, "ckpt", open(latest).read().strip())
    from safetensors.torch import load_file
    state = {k.removeprefix("model."): v for k, v in load_file(os.path.join(path, "policy", "model.safetensors")).items()}
    with torch.no_grad():
        for name, p in policy.named_parameters():
            p.copy_(state[name])
    copy_weights(policy, infer)
    if trainer is not None:
        trainer.load(os.path.join(path, "drafter"))
    s = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)  # to each param's device
    opt.load_state_dict(s["optimizer"])
    torch.set_rng_state(s["torch_rng"])
    random.setstate((3, tuple(s["python_rng"]), None))
    return s["step"] + 1


# ---------------------------------------------------------------------------------------------------------
# the loop


def train(cfg, rank=0, world=1, log=print):
    """Run cfg.steps RL steps. Returns the metrics of each step (with the rollout timelines of every rank),
    the policy and the serving drafter."""
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    policy, infer, tok = load_models(cfg, device)
    max_prompt = infer.args.max_seq_len - cfg.max_new_tokens
    if max_prompt <= 0:
        raise ValueError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the "
                         f"model's context of {infer.args.max_seq_len}")
    if cfg.prompts_per_step % world or cfg.eval_prompts < world:
        raise ValueError(f"--prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the {world} ranks and "
                         f"--eval_prompts ({cfg.eval_prompts}) at least {world}")
    rows, bad = load_prompts(tok, cfg.dataset, "train", max_prompt)
    eval_rows, _ = load_prompts(tok, cfg.eval_dataset or cfg.dataset, "test", max_prompt)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ref = copy.deepcopy(infer) if cfg.kl_coef else None  # the frozen initial policy, for the k3 KL
    drafter = trainer = bandit = None
    if cfg.sd == "on":
        drafter = Drafter.load(cfg.drafter_init, infer) if cfg.drafter_init else Drafter.from_target(infer)
        trainer = SpotTrainer(drafter, lr=cfg.drafter_lr, max_tokens=cfg.drafter_tokens, seed=cfg.seed + rank)
        bandit = Bandit(seed=cfg.seed)
    start = load_checkpoint(cfg, policy, infer, opt, trainer) if cfg.resume else 0
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        log(f"{len(rows)} train prompts ({bad} bad rows skipped), {len(eval_rows)} eval prompts, "
            f"{sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters, {world} rank(s)")
        log("config " + json.dumps(dataclasses.asdict(cfg)))
        kept = [l for l in open(metrics_path) if l.endswith("\n")] if cfg.resume and os.path.exists(metrics_path) else []
        with open(metrics_path, "w") as f:  # on resume, drop what was logged after the checkpoint (or cut off)
            f.writelines(l for l in kept if json.loads(l)["step"] < start)
        if not cfg.resume:  # a new run: a later --resume must not pick up an older run's checkpoint
            shutil.rmtree(os.path.join(cfg.out, "ckpt"), ignore_errors=True)
    history = []
    for step in range(start, cfg.steps + 1):
        # evaluate the policy (and how well the drafter follows it) before every eval_every-th step and at the end
        evals = evaluate(cfg, infer, tok, eval_rows, drafter, rank, world, device) if cfg.eval_every and (
            step % cfg.eval_every == 0 or step == cfg.steps) else {}
        if step == cfg.steps:
            if evals and rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(dict(step=step, **evals)) + "\n")
                log("final | " + " | ".join(f"{k} {v:.3f}" for k, v in evals.items()))
            break
        t0 = time.perf_counter()
        outputs, samples, rs = rollout(cfg, infer, tok, step_prompts(rows, cfg, step, rank, world), drafter,
                                       trainer, bandit, step, progress=rank == 0 and sys.stderr.isatty())
        rollout_end = time.perf_counter() - t0
        if trainer is not None:
            trainer.train_until_all_done(step)  # this rank is done: keep training until every rank is
            trainer.top_up(step, cfg.drafter_min_steps)  # ends with the trainer stopped
        idle_end = time.perf_counter() - t0
        texts = [tok.decode(o, skip_special_tokens=True) for o in outputs]
        rewards = torch.tensor([rl.math_reward(t, r["answer"]) for t, (_, r) in zip(texts, samples)])
        adv = rl.group_advantages(rewards, cfg.group_size)
        masked, truncated = rl.mask_truncated(outputs, tok.eos_token_id, cfg.max_new_tokens)
        loss = update(cfg, policy, ref, opt, samples, masked if cfg.mask_truncated else outputs, adv, world,
                      rank == 0 and sys.stderr.isatty())
        copy_weights(policy, infer)
        tstats = {}
        if trainer is not None:
            trainer.sync()  # average the training copies across ranks: the serving drafter for the next step
            tstats = trainer.stats()
        lens = [len(o) for o in outputs]
        drafter_stats = {f"drafter_{k}": tstats.get(k, 0.0)
                         for k in ("tail_steps", "idle_steps", "topup_steps", "loss", "train_s", "stop_wait_s")}
        sums = all_reduce_dict(dict(reward=rewards.sum().item(), correct=(rewards == 1).sum().item(), rows=len(lens),
                                    len=sum(lens), sd_tokens=rs["sd_tokens"], sd_rows=rs["sd_rows"],
                                    tokens=rs["tokens"], loss=loss, truncated=sum(truncated), **drafter_stats), device)
        maxs = all_reduce_dict(dict(len=max(lens), rollout_s=rollout_end, tail_s=rs["tail_s"]), device,
                               dist.ReduceOp.MAX)
        train_steps = sums["drafter_tail_steps"] + sums["drafter_idle_steps"] + sums["drafter_topup_steps"]
        rec = dict(step=step, reward_mean=sums["reward"] / sums["rows"], accuracy=sums["correct"] / sums["rows"],
                   response_len_mean=sums["len"] / sums["rows"], response_len_max=int(maxs["len"]),
                   rollout_s=maxs["rollout_s"], step_s=time.perf_counter() - t0,
                   sd_accept_len=sums["sd_tokens"] / max(1, sums["sd_rows"]),
                   sd_token_frac=sums["sd_tokens"] / max(1, sums["tokens"]), drafter_train_steps=int(train_steps),
                   **{k: int(sums[k]) for k in ("drafter_tail_steps", "drafter_idle_steps", "drafter_topup_steps")},
                   # per-rank means; stop_wait_s: the rollout waiting for a running drafter step to end
                   **{k: sums[k] / world for k in ("drafter_loss", "drafter_train_s", "drafter_stop_wait_s")},
                   tail_s=maxs["tail_s"], loss=sums["loss"], tokens=int(sums["tokens"]),
                   truncated=int(sums["truncated"]), arms={str(k): v for k, v in rs["arms"].items()}, **evals)
        digest = hashlib.sha256(json.dumps(outputs).encode()).hexdigest()
        timeline = dict(steps=rs["timeline"], tail_start=rs.get("tail_start_s"), rollout_end=rollout_end,
                        idle_end=idle_end, digest=digest, tail_training=trainer is not None and cfg.tail_training)
        timelines = [None] * world
        if world > 1:
            dist.all_gather_object(timelines, timeline)
        else:
            timelines = [timeline]
        history.append(dict(rec, timelines=timelines))
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            log(f"step {step:4d} | reward {rec['reward_mean']:.3f} | len {rec['response_len_mean']:6.1f} "
                f"(max {rec['response_len_max']}) | rollout {rec['rollout_s']:6.2f}s tail {rec['tail_s']:5.2f}s | "
                f"accept {rec['sd_accept_len']:.2f} | drafter {rec['drafter_train_steps']} steps loss "
                f"{rec['drafter_loss']:.3f} | step {rec['step_s']:6.2f}s"
                + "".join(f" | {k} {v:.3f}" for k, v in evals.items()))
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step == cfg.steps - 1):
            save_checkpoint(cfg, step, policy, tok, opt, trainer, rank)
    return history, policy, drafter


# ---------------------------------------------------------------------------------------------------------
# --bench: the same steps with SD off and on, and the rollout timeline picture


def plot_timeline(runs, path):
    """Active rows over time on each rank for one step, SD off above SD on; shaded: steps that drafted; bars:
    when the drafter trained (in the tail, or after this rank's rollout)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None  # matplotlib is optional
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * len(runs)), sharex=True, squeeze=False)
    for ax, (name, timelines) in zip(axes[:, 0], runs.items()):
        for rank, tl in enumerate(timelines):
            t = [p[0] for p in tl["steps"]] + [tl["rollout_end"]]
            rows = [p[1] for p in tl["steps"]]
            line, = ax.step(t[:-1] + [t[-1]], rows + [0], where="post", label=f"rank {rank} active rows")
            bar = dict(ymin=0.92 - 0.07 * rank, ymax=0.98 - 0.07 * rank, color=line.get_color())  # one lane per rank
            sd = [(a[0], b[0]) for a, b in zip(tl["steps"], tl["steps"][1:] + [(tl["rollout_end"],)]) if a[2]]
            for i, (a, b) in enumerate(sd):
                ax.axvspan(a, b, color="tab:green", alpha=0.15, lw=0, label="SD step" if i == 0 and rank == 0 else None)
            if tl["tail_training"] and tl["tail_start"] is not None:
                ax.axvspan(tl["tail_start"], tl["rollout_end"], alpha=0.35, hatch="//", **bar,
                           label=f"rank {rank}: drafter trains in the tail")
            if tl["idle_end"] > tl["rollout_end"] + 1e-3:
                ax.axvspan(tl["rollout_end"], tl["idle_end"], alpha=0.6, **bar,
                           label=f"rank {rank}: drafter trains after its rollout (idle, top-up)")
        ax.set_title(name)
        ax.set_ylabel("active rows")
        ax.legend(loc="center right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds into the rollout")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench(cfg, rank, world, log):
    runs = {}
    for sd in ("off", "on"):
        c = dataclasses.replace(cfg, sd=sd, out=os.path.join(cfg.out, f"bench_sd_{sd}"), save_every=0, eval_every=0,
                                resume=False)
        runs[sd] = train(c, rank, world, log=lambda msg, sd=sd: log(f"[sd {sd}] {msg}"))[0]
    off, on = runs["off"], runs["on"]
    rows = []
    for a, b in zip(off, on):
        rows.append(dict(step=a["step"], rollout_s_off=round(a["rollout_s"], 3), rollout_s_on=round(b["rollout_s"], 3),
                         tail_s_off=round(a["tail_s"], 3), tail_s_on=round(b["tail_s"], 3), tokens=b["tokens"],
                         accept_len=round(b["sd_accept_len"], 3), drafter_tail_steps=b["drafter_tail_steps"],
                         drafter_idle_steps=b["drafter_idle_steps"], step_s_off=round(a["step_s"], 3),
                         step_s_on=round(b["step_s"], 3)))
    same = [[t["digest"] for t in a["timelines"]] == [t["digest"] for t in b["timelines"]] for a, b in zip(off, on)]
    # on a GPU, non-deterministic backward kernels make the two runs' policies drift apart after the first update,
    # and bf16 logits of a verify (T > 1) and a decode step may break a near-tie differently: see step 0 too
    picture = None
    if rank == 0:
        # the step with the longest tail is the one that shows TLT at work
        i = max(range(len(off)), key=lambda i: off[i]["tail_s"])
        picture = plot_timeline({f"step {off[i]['step']}, SD off": off[i]["timelines"],
                                 f"step {on[i]['step']}, SD on": on[i]["timelines"]},
                                os.path.join(cfg.out, "timeline.png"))
        for r in rows:
            log(" | ".join(f"{k} {v}" for k, v in r.items()))
    timed = slice(1 if len(off) > 1 else 0, None)  # step 0 of the first run also pays compilation and warm-up
    result = dict(rollout_speedup=sum(r["rollout_s"] for r in off[timed]) / sum(r["rollout_s"] for r in on[timed]),
                  step_speedup=sum(r["step_s"] for r in off[timed]) / sum(r["step_s"] for r in on[timed]),
                  accept_len=sum(r["sd_accept_len"] for r in on) / len(on), identical_rollouts=all(same),
                  identical_first_step=same[0],
                  tail_frac_off=sum(r["tail_s"] for r in off) / sum(r["rollout_s"] for r in off),
                  steps=rows, timeline_png=picture,
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    return result


def main(argv):
    cfg, why = parse_args(argv)
    rank, world = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"nanotlt: {cfg.preset} preset ({why})")
    if cfg.bench:
        result = bench(cfg, rank, world, log)
        log(json.dumps(result))
    else:
        train(cfg, rank, world, log)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
