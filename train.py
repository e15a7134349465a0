"""train.py: GRPO for reasoning with TLT rollouts (speculative decoding with a drafter trained in the tail).

    python train.py                              # no GPU: the tiny preset, offline, about 5 minutes on 2 cores
    torchrun --nproc_per_node 8 train.py         # one 8-GPU box: the default real configuration
    torchrun --nproc_per_node 2 train.py         # CPU too (gloo), tiny preset
    python train.py --steps 20 --out out/run1    # any config field can be overridden: --key value
    python train.py --resume                     # continue from the latest checkpoint in --out
    python train.py --plan_memory                # each phase's GPU memory per rank for this configuration
    python train.py --preset tiny --model tiny:qwen2.5-1.5b   # the tiny task, a model of real shape (GPU)

One step on one rank: rollout with SD and the spot trainer -> rewards -> group advantages -> update -> weights into
the inference copy -> drafter averaged across ranks -> metrics -> checkpoint. `python bench.py train` runs the same
steps with SD off and on.
"""
import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import time
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

import nanotlt
import presets
import ranks
import rl
from drafter import FIXED_TREE, SpotTrainer
from nanotlt import Drafter
from spec_decode import Bandit, Engine, Sampling, cache_slack


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
    max_prompt_len: int = 1024  # longer prompts are dropped (and counted); sizes the engine's cache with the above
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-6
    lr_warmup: int = 0  # steps of linear warm-up
    lr_min_ratio: float = 1.0  # cosine decay over the run down to lr x this (1: constant)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    updates_per_rollout: int = 1  # > 1: the clipped ratio (eps_low 0.2, eps_high 0.28) comes into play
    micro_batch_tokens: int = 32768
    logprob_chunk: int = 4096  # tokens whose fp32 logits the LM head makes at a time in the update (memory)
    kl_coef: float = 0.0  # > 0: k3 KL against the frozen initial policy
    mask_truncated: bool = True
    sd: str = "on"  # "off": the baseline, everything else equal
    sd_threshold: int = 32  # SD (and spot training) while active rows <= this
    drafter_lr: float = 3e-4
    drafter_tokens: int = 8192  # tokens per packed drafter batch
    drafter_min_steps: int = 0  # top the spot trainer up to this many steps per RL step (single process)
    tail_training: bool = True  # train the drafter during the tail; off where nothing idles (2 CPU cores)
    drafter_init: str = ""  # a drafter exported by `python bench.py drafter` (or a published EAGLE-1 checkpoint)
    eval_every: int = 20
    eval_prompts: int = 128
    eval_samples: int = 4  # sampled pass@1 over this many samples per eval prompt (temperature 0.6, top-p 0.95)
    save_every: int = 20
    seed: int = 0
    dist_timeout_s: int = 600  # several ranks: a collective waiting longer is an error (a hang, a failed rank)
    resume: bool = False
    cuda_graphs: bool = True
    grad_checkpointing: bool = True
    release: str = "auto"  # freed for the update, rebuilt after: auto (as --plan_memory says), none, engine (the KV
    # cache and graphs), all (those and the inference copy)
    plan_memory: bool = False  # print the per-rank memory plan of this configuration (config.json only) and exit
    nproc_per_node: int = 8  # --plan_memory: ranks per node (times --nnodes)
    nnodes: int = 1
    gpu_gb: float = 79.6  # --plan_memory: GiB per GPU (an "80 GB" H100)


TINY = dict(model="tiny", dataset="tiny", steps=40, prompts_per_step=32, group_size=8, max_new_tokens=256,
            max_prompt_len=128, lr=1e-4, micro_batch_tokens=8192, sd_threshold=16, drafter_lr=3e-3,
            drafter_tokens=2048, drafter_min_steps=10, tail_training=False, eval_every=20, eval_prompts=1024,
            eval_samples=0, save_every=5, cuda_graphs=False, grad_checkpointing=False)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: main prints it as "error: ..."
        raise ValueError(message)


def _bool(v):
    if v.lower() not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
        raise argparse.ArgumentTypeError(f"takes true/false, got {v!r}")
    return v.lower() in ("1", "true", "on", "yes")


def parse_args(argv):
    """`--key value` for any Config field (`--flag` alone sets a bool); a preset's values apply first. Returns the
    config and why its preset was chosen."""
    ap = OneLineParser(prog="train.py", description="GRPO with TLT rollouts")
    for f in dataclasses.fields(Config):
        kind = type(f.default)
        ap.add_argument("--" + f.name, type=_bool if kind is bool else kind, nargs="?" if kind is bool else None,
                        const=True if kind is bool else None)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", "real" if given.get("plan_memory") else "auto")  # a plan is for GPUs
    if preset == "auto":
        preset = "real" if torch.cuda.is_available() else "tiny"
        why = "a CUDA device is available" if preset == "real" else "no CUDA device, so offline on the CPU"
    elif preset in ("real", "tiny"):
        why = "--preset"
    else:
        raise ValueError(f"unknown preset {preset!r} (choose auto, real or tiny)")
    cfg = Config(**{**(TINY if preset == "tiny" else {}), **given, "preset": preset})
    for key, ok in (("sd", ("on", "off")), ("release", ("auto", "none", "engine", "all"))):
        if getattr(cfg, key) not in ok:
            raise ValueError(f"--{key} takes {' or '.join(ok)}, got {getattr(cfg, key)!r}")
    if cfg.group_size < 2:
        raise ValueError(f"--group_size {cfg.group_size}: GRPO's advantages are 0 in groups of one, nothing to learn")
    for key, lo in (("steps", 1), ("prompts_per_step", 1), ("max_new_tokens", 1),
                    ("updates_per_rollout", 1), ("eval_prompts", 1), ("micro_batch_tokens", 1), ("logprob_chunk", 1),
                    ("eval_samples", 0), ("eval_every", 0), ("save_every", 0), ("drafter_min_steps", 0)):
        if getattr(cfg, key) < lo:
            raise ValueError(f"--{key} must be at least {lo}, got {getattr(cfg, key)}")
    return cfg, why


# ---------------------------------------------------------------------------------------------------------
# ranks


# ---------------------------------------------------------------------------------------------------------
# models and prompts


def load_models(cfg, device, world):
    """The policy (fp32 weights for the optimizer; on the CPU for now when it is to be sharded, which moves each
    rank's shard to its GPU), its inference copy (bf16 on a GPU) and the tokenizer. The tiny preset's warm-up is
    built by the first rank of each node while the others wait (their node's cache may be its own)."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        ranks.wait_all()
    policy, tok = presets.load(cfg.model, "cpu" if world > 1 else device, seed=cfg.seed)
    if first:
        ranks.wait_all()
    if cfg.dataset == "tiny":
        cfg.dataset, eval_dataset = presets.tiny_files(cfg.model) or (None, None)
        if cfg.dataset is None:
            raise ValueError(f"--dataset tiny needs a tiny-task model (tiny or tiny:SHAPE), got {cfg.model!r}")
        cfg.eval_dataset = cfg.eval_dataset or eval_dataset
    policy.grad_checkpointing = cfg.grad_checkpointing
    infer = copy.deepcopy(policy).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    infer.requires_grad_(False)
    return policy.train(), infer, tok


def load_prompts(tok, source, split, max_prompt_len):
    """Rows with their prompt's token ids; prompts longer than max_prompt_len tokens are dropped. Returns (rows,
    bad rows skipped, prompts dropped as too long)."""
    rows, bad = rl.load_rows(source, split)
    for r in rows:
        instruction = "" if isinstance(tok, presets.CharTokenizer) else "\n" + rl.MATH_INSTRUCTION  # tiny task: none
        r["ids"] = nanotlt.encode_prompt(tok, r["prompt"] + instruction)
    kept = [r for r in rows if len(r["ids"]) <= max_prompt_len]
    if not kept:
        raise ValueError(f"no prompt of {source!r} fits in {max_prompt_len} tokens (--max_prompt_len, and the "
                         f"model's context less --max_new_tokens)")
    return kept, bad, len(rows) - len(kept)


# ---------------------------------------------------------------------------------------------------------
# the RL step


@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):  # the prompts' order in one epoch
    order = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order


def step_prompts(rows, cfg, step, rank, world):
    """This rank's prompts for a step, whole groups per rank: global prompt k = step * P + i is prompt k % n of
    epoch k // n's permutation, so a step that crosses the end of an epoch continues in the next one's order."""
    P, per_rank, n = cfg.prompts_per_step, cfg.prompts_per_step // world, len(rows)
    return [(k, rows[epoch_order(n, cfg.seed, k // n)[k % n]])
            for k in range(step * P + rank * per_rank, step * P + (rank + 1) * per_rank)]


def rollout(cfg, engine, tok, rows, trainer, step, greedy=False, progress=False, **kw):
    """Generate G samples per prompt (one, greedy, with `greedy`). Returns outputs, the flat (global sample id,
    row) list and stats; `kw` goes to Engine.generate."""
    G = 1 if greedy else cfg.group_size
    samples = [(gid * G + g, row) for gid, row in rows for g in range(G)]
    on_tail = on_finish = None
    if trainer is not None:
        on_tail = (lambda: trainer.start(step, "tail")) if cfg.tail_training else None
        on_finish = lambda i, tokens, hidden: trainer.buffer.add(step, tokens, hidden, len(samples[i][1]["ids"]))
    sampling = Sampling() if greedy else Sampling(cfg.temperature, cfg.top_p, cfg.seed)
    outputs, stats = engine.generate([r["ids"] for _, r in samples], cfg.max_new_tokens, sampling, tok.eos_token_id,
                                     seq_ids=[s for s, _ in samples], group_ids=[s // G for s, _ in samples],
                                     on_tail=on_tail, on_finish=on_finish, progress=progress, **kw)
    return outputs, samples, stats


def score(cfg, tok, outputs, samples):
    """The rewards [N] of rollout outputs against their rows' answers; truncated responses score 0."""
    return rl.rollout_rewards(outputs, [tok.decode(o, skip_special_tokens=True) for o in outputs],
                              [r["answer"] for _, r in samples], tok.eos_token_id, cfg.max_new_tokens)


def evaluate(cfg, engine, tok, rows, rank, world, device):
    """Held-out prompts, split across ranks: greedy accuracy, the sampled pass@1 people report for reasoning
    models (cfg.eval_samples samples per prompt at temperature 0.6, top-p 0.95), and with a drafter its acceptance
    length on the greedy rollouts with one fixed tree shape for all rows (the bandit's choices would blur how well
    the drafter follows). A rank with no prompt of its own still joins the reductions."""
    rows = rows[:cfg.eval_prompts]
    mine = [(i, r) for i, r in enumerate(rows) if i % world == rank]
    sums = torch.zeros(4, dtype=torch.float64)  # greedy correct, sampled correct, SD tokens, SD rows
    if mine:
        sd = dict(sd_threshold=len(mine), arms=[FIXED_TREE]) if engine.learned else {}
        outs, samples, stats = rollout(cfg, engine, tok, mine, None, -1, greedy=True, **sd)
        sums[0] = float(score(cfg, tok, outs, samples).sum())
        sums[2:] = torch.tensor([stats["sd_tokens"], stats["sd_rows"]])
        if cfg.eval_samples:  # in passes that fit the engine's rows (the KV cache was sized for a step)
            k = dataclasses.replace(cfg, temperature=0.6, top_p=0.95, group_size=cfg.eval_samples)
            per = max(1, presets.engine_rows(cfg, world) // cfg.eval_samples)
            for i in range(0, len(mine), per):
                outs, samples, _ = rollout(k, engine, tok, mine[i:i + per], None, -1)
                sums[1] += float(score(cfg, tok, outs, samples).sum())
    ranks.wait_all()  # the ranks' evaluations take different times
    s = ranks.all_reduce(sums.to(device)).tolist()
    out = dict(eval_accuracy=s[0] / len(rows))
    if cfg.eval_samples:
        out["eval_pass@1"] = s[1] / (len(rows) * cfg.eval_samples)
    return dict(out, eval_accept_len=s[2] / max(1, s[3])) if engine.learned else out


# ---------------------------------------------------------------------------------------------------------
# checkpoints: written by rank 0 into a temporary directory, then renamed, so a crash mid-save never leaves
# a checkpoint that loads half; read back without unpickling arbitrary objects (safetensors, weights_only)


RESUME_SAME = ("prompts_per_step", "group_size", "seed")  # a resumed run must keep these (checked)


def save_checkpoint(cfg, step, policy, tok, opt, trainer, bandit, rank, world):
    """ckpt/step_N/: state/ holds the policy's weights and optimizer, sharded (torch.distributed.checkpoint: each
    rank writes its own shards, so `--out` must be on a file system all nodes share); rank_R/ each rank's drafter
    trainer, RNG and bandit; policy/ the policy in HF format (transformers, serving engines), gathered to rank 0 on the
    CPU. Written under a temporary name that rank 0 renames once every rank is done; the last two are kept."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    final = os.path.join(cfg.out, "ckpt", f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    ranks.wait_all()
    weights, optim = get_state_dict(policy, opt)
    dcp.save({"policy": weights, "optim": optim}, checkpoint_id=os.path.join(tmp, "state"))
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        nanotlt.save_pretrained(policy, os.path.join(tmp, "policy"), full)
        if hasattr(tok, "save_pretrained"):  # an HF tokenizer: the policy dir is a complete model to serve
            tok.save_pretrained(os.path.join(tmp, "policy"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(step=step, world=world, **{k: getattr(cfg, k) for k in RESUME_SAME}), f)
    mine = os.path.join(tmp, f"rank_{rank}")
    if trainer is not None:
        trainer.save(os.path.join(mine, "drafter"))
    os.makedirs(mine, exist_ok=True)
    torch.save({"torch_rng": torch.get_rng_state(), "python_rng": nanotlt.rng_state(),
                "bandit": bandit and bandit.state_dict()}, os.path.join(mine, "rng.pt"))
    ranks.wait_all()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(cfg.out, "ckpt", "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(cfg.out, "ckpt", "latest.tmp"), os.path.join(cfg.out, "ckpt", "latest"))
        done = sorted(d for d in os.listdir(os.path.join(cfg.out, "ckpt")) if d.startswith("step_") and "." not in d)
        for old in done[:-2]:
            shutil.rmtree(os.path.join(cfg.out, "ckpt", old))  # keep the last two
    ranks.wait_all()


def load_checkpoint(cfg, policy, infer, opt, trainer, bandit, rank, world):
    """Restore the latest checkpoint (same number of ranks): policy, optimizer, drafter and its optimizer, RNG,
    bandit; returns the step to continue from. Not the drafter's data buffer: the first step after a resume trains
    the drafter on that step's rollouts only. The learning rates given now (--lr, --drafter_lr) win over the
    saved ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    latest = os.path.join(cfg.out, "ckpt", "latest")
    if not os.path.exists(latest):
        raise ValueError(f"--resume: no checkpoint in {cfg.out}/ckpt")
    with open(latest) as f:
        path = os.path.join(cfg.out, "ckpt", f.read().strip())
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    if meta["world"] != world:
        raise ValueError(f"--resume: {path} was written by {meta['world']} rank(s), this run has {world}")
    for k in RESUME_SAME:  # they fix each step's prompts and sampling keys: a change would skip or repeat prompts
        if k in meta and meta[k] != getattr(cfg, k):
            raise ValueError(f"--resume: {path} was written with --{k} {meta[k]}, this run has {getattr(cfg, k)}")
    mine = os.path.join(path, f"rank_{rank}")
    if trainer is not None and not os.path.exists(os.path.join(mine, "drafter", "trainer.pt")):
        raise ValueError(f"--resume: {path} has no drafter (written with --sd off): resume with --sd off")
    weights, optim = get_state_dict(policy, opt)
    state = {"policy": weights, "optim": optim}
    dcp.load(state, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(policy, opt, model_state_dict=state["policy"], optim_state_dict=state["optim"])
    for g in opt.param_groups:
        g["lr"] = cfg.lr
    ranks.copy_weights(policy, infer)
    if trainer is not None:
        trainer.load(os.path.join(mine, "drafter"))
        for g in trainer.opt.param_groups:
            g["lr"] = cfg.drafter_lr
    s = torch.load(os.path.join(mine, "rng.pt"), weights_only=True)
    torch.set_rng_state(s["torch_rng"])
    nanotlt.set_rng_state(s["python_rng"])
    if bandit is not None and s["bandit"] is not None:
        bandit.load_state_dict(s["bandit"])
    return meta["step"] + 1


# ---------------------------------------------------------------------------------------------------------
# the loop


def train(cfg, rank=0, world=1, log=print):
    """Run cfg.steps RL steps. Returns the metrics of each step (`history`, with the rollout timelines of every
    rank), the `policy` (sharded with several ranks), the serving `drafter`, its `trainer` and the policy's `opt`."""
    for run in training(cfg, rank, world, log):
        pass
    return run


def training(cfg, rank=0, world=1, log=print):
    """train() one step at a time: yields what train() returns after each step (bench.py interleaves two runs)."""
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    policy, infer, tok = load_models(cfg, device, world)
    max_prompt = min(cfg.max_prompt_len, infer.args.max_seq_len - cfg.max_new_tokens)
    if max_prompt <= 0:
        raise ValueError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the "
                         f"model's context of {infer.args.max_seq_len}")
    if cfg.prompts_per_step % world or cfg.eval_prompts < world:
        raise ValueError(f"--prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the {world} ranks and "
                         f"--eval_prompts ({cfg.eval_prompts}) at least {world}")
    rows, bad, too_long = load_prompts(tok, cfg.dataset, "train", max_prompt)
    if cfg.eval_dataset or not (os.path.exists(cfg.dataset) or cfg.dataset.endswith((".json", ".jsonl"))):
        eval_rows = load_prompts(tok, cfg.eval_dataset or cfg.dataset, "test", max_prompt)[0]
    else:  # a local file has no test split: hold out its last rows (up to a fifth) rather than grade on training data
        held = min(cfg.eval_prompts, len(rows) // 5)
        rows, eval_rows = rows[:len(rows) - held], rows[len(rows) - held:]
        if not held:
            raise ValueError(f"{cfg.dataset!r} is too small to hold out eval prompts: give --eval_dataset")
    # the frozen initial policy for the KL, bf16 on a GPU; sharded like the policy when there are several ranks
    ref = None
    if cfg.kl_coef:
        ref = copy.deepcopy(policy).requires_grad_(False).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        ref = ranks.shard(ref, device) if world > 1 else ref.to(device)
    policy = ranks.shard(policy, device) if world > 1 else policy.to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    drafter = trainer = None
    if cfg.sd == "on":
        drafter = Drafter.load(cfg.drafter_init, infer) if cfg.drafter_init else Drafter.from_target(infer)
        trainer = SpotTrainer(drafter, lr=cfg.drafter_lr, max_tokens=cfg.drafter_tokens, seed=cfg.seed + rank)
    # the engine's caches are sized once for every rollout and evaluation of the run (as --plan_memory does)
    engine = Engine(infer, drafter, cfg.sd_threshold, Bandit(seed=cfg.seed), cfg.cuda_graphs,
                    rows=presets.engine_rows(cfg, world) + 1, length=max_prompt + cfg.max_new_tokens + cache_slack())
    start = load_checkpoint(cfg, policy, infer, opt, trainer, engine.bandit, rank, world) if cfg.resume else 0
    if cfg.release != "auto":
        freed = dict(none=[], engine=["engine"], all=["engine", "inference_copy"])[cfg.release]
    else:  # what the memory plan of this configuration on this device says
        freed = presets.plan_memory(cfg, world, infer.args, torch.cuda.get_device_properties(device).total_memory
                                    / presets.GiB)["release_for_update"] if device.type == "cuda" else []
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        log(f"{len(rows)} train prompts ({bad} bad rows skipped, {too_long} longer than {max_prompt} tokens "
            f"dropped), {len(eval_rows)} eval prompts, "
            f"{sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters, {world} rank(s)")
        log("config " + json.dumps(dataclasses.asdict(cfg)))
        kept = [ln for ln in open(metrics_path) if ln.endswith("\n")] if cfg.resume and os.path.exists(
            metrics_path) else []
        with open(metrics_path, "w") as f:  # on resume, drop what was logged after the checkpoint (or cut off)
            f.writelines(ln for ln in kept if json.loads(ln)["step"] < start)
        if not cfg.resume:  # a new run: a later --resume must not pick up an older run's checkpoint
            shutil.rmtree(os.path.join(cfg.out, "ckpt"), ignore_errors=True)
    run = types.SimpleNamespace(history=[], policy=policy, drafter=drafter, trainer=trainer, opt=opt, engine=engine)
    for step in range(start, cfg.steps + 1):
        # evaluate the policy (and how well the drafter follows it) before every eval_every-th step and at the end
        evals = evaluate(cfg, engine, tok, eval_rows, rank, world, device) if cfg.eval_every and (
            step % cfg.eval_every == 0 or step == cfg.steps) else {}
        if step == cfg.steps:
            if evals and rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(dict(step=step, **evals)) + "\n")
                log("final | " + " | ".join(f"{k} {v:.3f}" for k, v in evals.items()))
            break
        t0 = time.perf_counter()
        outputs, samples, rs = rollout(cfg, engine, tok, step_prompts(rows, cfg, step, rank, world), trainer, step,
                                       progress=rank == 0 and sys.stderr.isatty())
        times = dict(rollout_s=time.perf_counter() - t0)
        if trainer is not None:
            trainer.train_until(step, ranks.arrive())  # this rank is done: keep training until every rank is
            trainer.top_up(step, cfg.drafter_min_steps)  # ends with the trainer stopped
        times["drafter_s"] = time.perf_counter() - t0 - times["rollout_s"]
        rewards = score(cfg, tok, outputs, samples)
        masked, truncated = rl.mask_truncated(outputs, tok.eos_token_id, cfg.max_new_tokens)
        if "engine" in freed:  # the update does not fit beside the engine's caches and graphs
            engine.release()
        if "inference_copy" in freed:  # nor beside the inference copy: copy_weights allocates it again
            for p in infer.parameters():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        t1 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = rl.lr_at(cfg, step)
        um = rl.update(cfg, policy, ref, opt, samples, masked if cfg.mask_truncated else outputs,
                       rl.group_advantages(rewards, cfg.group_size), world, rank == 0 and sys.stderr.isatty())
        ranks.copy_weights(policy, infer)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the update's kernels are done, not just queued
        times["update_s"] = time.perf_counter() - t1
        if trainer is not None:
            trainer.sync()  # average the training copies across ranks: the serving drafter for the next step
        rec = step_record(cfg, step, rewards, outputs, truncated, rs, trainer.stats() if trainer else {}, times, world,
                          device)
        rec.update(um, step_s=time.perf_counter() - t0, **evals)
        timeline = dict(steps=rs["timeline"], tail_start=rs["tail_start_s"], rollout_end=times["rollout_s"],
                        idle_end=times["rollout_s"] + times["drafter_s"],
                        tail_training=cfg.tail_training and trainer is not None,
                        digest=hashlib.sha256(json.dumps(outputs).encode()).hexdigest())  # the rollouts, compared
        timelines = [timeline] * world
        if world > 1:
            dist.all_gather_object(timelines, timeline)
        run.history.append(dict(rec, timelines=timelines))
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            log(f"step {step:4d} | reward {rec['reward_mean']:.3f} | len {rec['response_len_mean']:6.1f} "
                f"(max {rec['response_len_max']}) | rollout {rec['rollout_s']:6.2f}s, tail {rec['tail_frac']:4.0%} | "
                f"accept {rec['sd_accept_len']:.2f} | drafter {rec['drafter_train_steps']} steps loss "
                f"{rec['drafter_loss']:.3f} | step {rec['step_s']:6.2f}s" + "".join(f" | {k} {v:.3f}" for k, v in
                                                                                   evals.items()))
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or step == cfg.steps - 1):
            save_checkpoint(cfg, step, policy, tok, opt, trainer, engine.bandit, rank, world)
        if step < cfg.steps - 1:
            yield run
    if rank == 0:
        plot_curves(metrics_path, os.path.join(cfg.out, "curves.png"))
    yield run


def step_record(cfg, step, rewards, outputs, truncated, rs, ts, times, world, device):
    """A step's metrics over all ranks: rewards and accuracy, the fraction of groups whose rewards are all equal
    (no learning signal), response lengths, the rollout's tail and its share of the rollout, SD's acceptance, the
    drafter's training (steps per phase, loss, seconds; stop_wait_s: the rollout waiting for a running drafter step
    to end), CUDA-graph captures, and the slowest rank's seconds per phase."""
    phases = ("tail_steps", "idle_steps", "topup_steps")
    lens, groups = [len(o) for o in outputs], rewards.view(-1, cfg.group_size)
    n_train = sum(ts.get(k, 0) for k in phases)
    sums = ranks.all_reduce_dict(dict(reward=rewards.sum().item(), correct=(rewards == 1).sum().item(), rows=len(lens),
                                len=sum(lens), tokens=rs["tokens"], truncated=sum(truncated), sd_tokens=rs["sd_tokens"],
                                sd_rows=rs["sd_rows"], zero_std=(groups == groups[:, :1]).all(1).sum().item(),
                                graph_captures=rs["captures"], drafter_loss=ts.get("loss", 0.0) * n_train,
                                **{"drafter_" + k: ts.get(k, 0.0) for k in phases + ("train_s", "stop_wait_s")}),
                           device)
    maxs = ranks.all_reduce_dict(dict(len=max(lens), tail_s=rs["tail_s"], capture_s=rs["capture_s"], **times), device,
                           dist.ReduceOp.MAX)
    train_steps, len_max = sum(sums["drafter_" + k] for k in phases), int(maxs.pop("len"))
    return dict(step=step, reward_mean=sums["reward"] / sums["rows"], accuracy=sums["correct"] / sums["rows"],
                frac_reward_zero_std=sums["zero_std"] * cfg.group_size / sums["rows"],
                response_len_mean=sums["len"] / sums["rows"], response_len_max=len_max, **maxs,
                tail_frac=maxs["tail_s"] / max(1e-9, maxs["rollout_s"]), tokens=int(sums["tokens"]),
                truncated=int(sums["truncated"]), sd_accept_len=sums["sd_tokens"] / max(1, sums["sd_rows"]),
                sd_token_frac=sums["sd_tokens"] / max(1, sums["tokens"]), drafter_train_steps=int(train_steps),
                drafter_loss=sums["drafter_loss"] / max(1, train_steps), graph_captures=int(sums["graph_captures"]),
                **{"drafter_" + k: int(sums["drafter_" + k]) for k in phases},
                **{k: sums[k] / world for k in ("drafter_train_s", "drafter_stop_wait_s")},  # per-rank means
                arms={str(k): v for k, v in rs["arms"].items()})


# ---------------------------------------------------------------------------------------------------------
# what a run shows: curves.png


def pyplot():  # matplotlib is optional: None without it
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(metrics_path, path):
    """The run at a glance: the reward and eval accuracies, response lengths, the drafter's acceptance, and each
    step's time split into the rollout's bulk, its tail, the drafter's training after it and the policy update."""
    plt = pyplot()
    recs = [json.loads(line) for line in open(metrics_path)]
    steps, evals = [r for r in recs if "reward_mean" in r], [r for r in recs if "eval_accuracy" in r]
    if plt is None or not steps:
        return None
    x, xe, col = [r["step"] for r in steps], [r["step"] for r in evals], lambda rs, k: [r.get(k, 0.0) for r in rs]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    reward, w = col(steps, "reward_mean"), 10  # the trend: a trailing mean over w steps
    ax[0, 0].plot(x, reward, label="reward (train samples)", alpha=0.35, color="C0")
    ax[0, 0].plot(x, [statistics.fmean(reward[max(0, i - w + 1):i + 1]) for i in range(len(x))], color="C0",
                  label=f"reward, mean of the last {w} steps")
    for k, label, c in (("eval_accuracy", "eval accuracy (greedy)", "C1"), ("eval_pass@1", "eval pass@1", "C2")):
        if evals and k in evals[0]:
            ax[0, 0].plot(xe, col(evals, k), "o-", label=label, color=c)
    ax[0, 1].plot(x, col(steps, "response_len_mean"), label="mean")
    ax[0, 1].plot(x, col(steps, "response_len_max"), label="max")
    ax[0, 1].plot(x, [100 * f for f in col(steps, "tail_frac")], ":", label="tail, % of the rollout's time")
    ax[1, 0].plot(x, col(steps, "sd_accept_len"), label="rollout (the bandit's trees)")
    if evals and "eval_accept_len" in evals[0]:
        ax[1, 0].plot(xe, col(evals, "eval_accept_len"), "o-", label="eval (fixed tree 6/4/16)")
    parts = {"rollout, bulk": [r["rollout_s"] - r["tail_s"] for r in steps], "rollout, tail": col(steps, "tail_s"),
             "drafter training after the rollout": col(steps, "drafter_s"), "update": col(steps, "update_s")}
    bottom = [0.0] * len(x)
    for name, v in parts.items():
        ax[1, 1].bar(x, v, bottom=bottom, label=name, width=0.85)
        bottom = [b + t for b, t in zip(bottom, v)]
    for a, title in zip(ax.flat, ("reward and accuracy", "response length (tokens)",
                                  "drafter: accepted tokens per verify step", "step time (s)")):
        a.set(title=title, xlabel="RL step")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------


def main(argv):
    cfg, why = parse_args(argv)
    if cfg.plan_memory:
        return presets.print_plan(cfg, cfg.nproc_per_node * cfg.nnodes, cfg.gpu_gb)
    rank, world = ranks.setup(cfg.dist_timeout_s)
    if torch.cuda.is_available() and cfg.preset != "tiny":  # refuse, in one line, what does not fit
        presets.check_fits(cfg, world, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
                           / presets.GiB)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f"nanotlt: {cfg.preset} preset ({why})")
    try:
        train(cfg, rank, world, log)
    except Exception as e:
        err = ranks.fail_together(e)
        if err is e:
            raise
        raise err from None  # another rank failed first: its error
    ranks.teardown()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FloatingPointError, ranks.RankFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
