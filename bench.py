"""bench.py: every benchmark, and the offline drafter. The last line each prints is JSON.

    python bench.py kernels                  # GPU: tree attention vs copy bandwidth and SDPA; the sampler
    python bench.py engine [--model M] [--drafter PATH|ngram] [--batch 1,8,32]   # plain decoding vs SD
    python bench.py engine --model smollm2 --vs_transformers                   # plain decoding vs transformers
    python bench.py train [train.py flags]   # the same RL steps with SD off and on, interleaved; timeline.png
    python bench.py drafter [--model M] [--out DIR]   # train an EAGLE drafter offline on the target's own text,
                                             # measure its acceptance before and after, export it for SGLang/vLLM

Models are named as everywhere (presets.load): tiny (default), tiny:SHAPE, smollm2, an HF checkpoint or hub id.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

import nanotlt
import presets
import ranks
import tlt_kernels as kernels
import train
from drafter import FIXED_TREE, accept_len, train_offline
from nanotlt import Drafter, export_eagle
from spec_decode import Arm, Bandit, Engine, Sampling, default_arms


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_and_prompts(name, dtype=None):
    """A model by name, its tokenizer and prompts: the tiny task's test prompts, or chat prompts."""
    model, tok = presets.load(name, device(), dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32))
    files = presets.tiny_files(name)
    prompts = ([tok.encode(json.loads(line)["prompt"]) for line in open(files[1])] if files
               else [nanotlt.encode_prompt(tok, p) for p in presets.CHAT_PROMPTS])
    return model.eval().requires_grad_(False), tok, prompts


# ---------------------------------------------------------------------------------------------------------
# kernels


def bench_kernels(args):
    """GPU time (CUDA-graph replays, no launch overhead) of tree attention against a copy of the same bytes and
    against SDPA with a dense mask, over context lengths, batch sizes and tree sizes; of the sampler against the
    bandwidth of reading the logits once."""
    from triton.testing import do_bench_cudagraph
    dev, bf, D, rows = "cuda", torch.bfloat16, 128, []
    t = lambda fn: do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e-3  # seconds
    x, y = (torch.empty(1 << 29, device=dev, dtype=bf) for _ in range(2))  # 1 GiB each
    copy_bw = 2 * x.numel() * 2 / t(lambda: y.copy_(x))
    x = y = None
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    grid = [(28, 4, L, B, T) for L in (1024, 4096, 16384, 32768) for B in (1, 8, 32, 64) for T in (1, 16, 64)]
    cached = None
    for Hq, Hkv, L, B, T in grid:
        if cached != (Hkv, L):  # a new K/V cache [S, Hkv, L, D]
            torch.cuda.empty_cache()
            cached, (k, v) = (Hkv, L), [torch.randn(64, Hkv, L, D, device=dev, dtype=bf) for _ in range(2)]
        q = torch.randn(B, Hq, T, D, device=dev, dtype=bf)
        slots = torch.randperm(64, device=dev)[:B].int()
        lens = torch.full((B,), L - T, device=dev, dtype=torch.int32)
        mask = kernels.random_tree_mask(B, T, dev) if T > 1 else None
        byts = 2 * B * Hkv * L * D * 2 + 2 * B * Hq * T * D * 2
        tk = t(lambda: kernels.tree_attention(q, k, v, slots, lens, mask))
        fits = 2 * B * Hq * L * D * 2 < 0.4 * torch.cuda.mem_get_info()[0]  # SDPA's head-expanded K/V must fit
        ts = t(kernels.masked_sdpa(q, k, v, slots, lens, mask)) if fits else None
        rows.append(dict(Hq=Hq, Hkv=Hkv, L=L, B=B, T=T, us=tk * 1e6, GBps=byts / tk / 1e9,
                         frac_copy_bw=byts / tk / copy_bw, sdpa_us=ts and ts * 1e6, speedup_vs_sdpa=ts and ts / tk))
        print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()))
    sampler = []
    for N, V in ((1, 151936), (64, 151936), (256, 151936)):  # one pass over bf16 logits
        logits = torch.randn(N, V, device=dev, dtype=bf)
        seq, steps = torch.arange(N, device=dev), torch.randint(0, 8192, (N,), device=dev)
        tk = t(lambda: kernels.gumbel_argmax(logits, seq, steps, 1.0, 0))
        sampler.append(dict(N=N, V=V, us=tk * 1e6, frac_copy_bw=N * V * 2 / tk / copy_bw))
        print(" | ".join(f"{k} {v:.3g}" for k, v in sampler[-1].items()))
    return dict(device=torch.cuda.get_device_name(), copy_GBps=copy_bw / 1e9, attention=rows, sampler=sampler)


# ---------------------------------------------------------------------------------------------------------
# the engine


def vs_transformers(model, path, prompts, new_tokens, batches, eos_id, reps=5):
    """Plain greedy decoding against transformers' `generate` (its dynamic cache and SDPA) on the same prompts,
    cut to one length so that neither pads, alternating runs; returns the median of the per-pair time ratios
    (a shared CPU's speed drifts by 10% and more between runs). Both make exactly `new_tokens` (ours ignores eos,
    transformers is kept from it), so the tokens are compared up to the first eos."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(presets.smollm2_path() if path == "smollm2" else path,
                                              dtype=next(model.parameters()).dtype).eval().to(device())
    P, rows, engine = min(map(len, prompts)), [], Engine(model)
    cut = lambda o: o[:o.index(eos_id)] if eos_id in o else o  # noqa: E731
    for b in batches:
        ps = [prompts[i % len(prompts)][-P:] for i in range(b)]
        ids = torch.tensor(ps, device=device())
        ratios, ours_s, hf_s = [], [], []
        for _ in range(reps + 1):  # the first pair warms both up
            t0 = time.perf_counter()
            out, _ = engine.generate(ps, new_tokens)  # greedy, no eos: both make exactly new_tokens
            ours_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # (transformers' generate runs under no_grad itself)
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


def bench_engine(args):
    """Tokens/s of plain decoding and of SD on the same prompts and seed, per batch size: SD as the bandit runs it
    (it keeps plain decoding where drafting does not pay) and, with --fixed_tree, with one tree."""
    cuda = torch.cuda.is_available()
    if not cuda and "OMP_NUM_THREADS" not in os.environ:  # tiny shapes gain nothing from threads, and on a busy
        torch.set_num_threads(1)  # machine several threads make timings erratic (up to 100x slower)
    model, tok, prompts = model_and_prompts(args.model)
    new_tokens = args.new_tokens or (512 if cuda else 128)
    name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    batches = list(map(int, (args.batch or ("1,4,16,32,64" if cuda else "1,4,16,64")).split(",")))
    if args.vs_transformers:
        return dict(device=name, model=args.model, new_tokens=new_tokens,
                    results=vs_transformers(model, args.model, prompts, new_tokens, batches, tok.eos_token_id))
    drafter = args.drafter if args.drafter == "ngram" else Drafter.load(args.drafter, model).eval()
    learned, rows, sampling = drafter != "ngram", [], Sampling(args.temperature, args.top_p)
    fixed = FIXED_TREE if learned else Arm("ngram", 3, 1, 4)
    print(f"{name}: {args.model}, {'learned' if learned else 'n-gram'} drafter, {sampling}, {new_tokens} new tokens")
    for b in batches:
        ps = [prompts[i % len(prompts)] for i in range(b)]
        engines = dict(plain=Engine(model, cuda_graphs=not args.no_graphs),
                       sd=Engine(model, drafter, b, Bandit(default_arms(learned)), not args.no_graphs))
        if args.fixed_tree:
            engines["tree"] = Engine(model, drafter, b, Bandit([fixed]), not args.no_graphs)
        for engine in engines.values():  # warm-up: allocator, kernels compiled, graphs captured; the bandit explores
            engine.generate(ps, new_tokens, sampling, tok.eos_token_id)
        best = {}  # best of 3: a busy machine only ever slows a run down
        for mode, engine in engines.items():
            runs = [engine.generate(ps, new_tokens, sampling, tok.eos_token_id) for _ in range(3)]
            best[mode] = runs[-1][0], min(r[1]["seconds"] for r in runs), runs[-1][1]
        (out_p, t_p, sp), (out_s, t_s, ss) = best["plain"], best["sd"]
        row = dict(batch=b, tokens=sp["tokens"], plain_tok_s=round(sp["tokens"] / t_p, 1),
                   sd_tok_s=round(ss["tokens"] / t_s, 1), speedup=round(t_p / t_s, 3),
                   accept_len=round(ss["accept_len"], 3), identical=out_p == out_s, arms=ss["arms"],
                   graph_pool_mb=round(ss["graph_pool_mb"], 1), graph_errors=sp["graph_errors"] + ss["graph_errors"])
        if "tree" in best:
            out_t, t_t, tr = best["tree"]
            row.update(tree_speedup=round(t_p / t_t, 3), tree_accept_len=round(tr["accept_len"], 3),
                       identical=row["identical"] and out_t == out_p)
        rows.append(row)
        print(" | ".join(f"{k} {v}" for k, v in row.items() if k != "arms"))
    return dict(device=name, model=args.model, drafter="learned" if learned else "ngram",
                temperature=args.temperature, top_p=args.top_p, new_tokens=new_tokens, results=rows)


# ---------------------------------------------------------------------------------------------------------
# RL steps with SD off and on, and the rollout timeline


def plot_timeline(runs, path):
    """Active rows over time on each rank for one step, SD off above SD on; shaded: steps that drafted; bars:
    when the drafter trained (in the tail, or after this rank's rollout)."""
    plt = train.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.6 * len(runs)), sharex=True, squeeze=False)
    for ax, (name, timelines) in zip(axes[:, 0], runs.items()):
        for rank, tl in enumerate(timelines):
            t = [p[0] for p in tl["steps"]] + [tl["rollout_end"]]
            line, = ax.step(t, [p[1] for p in tl["steps"]] + [0], where="post", label=f"rank {rank} active rows")
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
        ax.set(title=name, ylabel="active rows")
        ax.legend(loc="center right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds into the rollout")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_train(argv):
    """The same steps with SD off and on, two runs interleaved step by step (the order alternating), so that a
    shared machine's drift in speed hits both alike. Step 0 also pays compilation and warm-up: left out."""
    cfg, _ = train.parse_args(argv)
    rank, world = ranks.setup(cfg.dist_timeout_s)
    log = print if rank == 0 else (lambda *a, **k: None)
    runs = {sd: train.training(dataclasses.replace(cfg, sd=sd, out=os.path.join(cfg.out, f"bench_sd_{sd}"),
                                                   save_every=0, eval_every=0, resume=False),
                               rank, world, log=lambda msg, sd=sd: log(f"[sd {sd}] {msg}")) for sd in ("off", "on")}
    last = {}
    for i in range(cfg.steps):  # each run yields once per step
        for sd in ("off", "on") if i % 2 == 0 else ("on", "off"):
            last[sd] = next(runs[sd])
    off, on = last["off"].history, last["on"].history
    rows = [dict(step=a["step"], rollout_s_off=round(a["rollout_s"], 3), rollout_s_on=round(b["rollout_s"], 3),
                 tail_s_off=round(a["tail_s"], 3), tail_s_on=round(b["tail_s"], 3), tokens=b["tokens"],
                 accept_len=round(b["sd_accept_len"], 3), drafter_tail_steps=b["drafter_tail_steps"],
                 drafter_idle_steps=b["drafter_idle_steps"], step_s_off=round(a["step_s"], 3),
                 step_s_on=round(b["step_s"], 3)) for a, b in zip(off, on)]
    # on a GPU, non-deterministic backward kernels make the two runs' policies drift apart after the first update,
    # and bf16 logits of a verify (T > 1) and a decode step may break a near-tie differently: see step 0 too
    same = [[t["digest"] for t in a["timelines"]] == [t["digest"] for t in b["timelines"]] for a, b in zip(off, on)]
    i = max(range(len(off)), key=lambda i: off[i]["tail_s"])  # the step with the longest tail shows TLT at work
    shown = {f"step {off[i]['step']}, SD off": off[i]["timelines"], f"step {on[i]['step']}, SD on": on[i]["timelines"]}
    picture = plot_timeline(shown, os.path.join(cfg.out, "timeline.png")) if rank == 0 else None
    for r in rows:
        log(" | ".join(f"{k} {v}" for k, v in r.items()))  # rank 0 only
    timed = slice(1 if len(off) > 1 else 0, None)
    total = lambda run, f: max(1e-9, sum(f(r) for r in run[timed]))
    tail, bulk = (lambda r: r["tail_s"]), (lambda r: r["rollout_s"] - r["tail_s"])
    result = dict(rollout_speedup=total(off, lambda r: r["rollout_s"]) / total(on, lambda r: r["rollout_s"]),
                  step_speedup=total(off, lambda r: r["step_s"]) / total(on, lambda r: r["step_s"]),
                  tail_ratio=total(on, tail) / total(off, tail),
                  # each run's tail over its own bulk (rows > sd_threshold, where SD never runs): what is left when
                  # the machine's speed drifts between the two runs (on a shared CPU, +-10% or more)
                  tail_ratio_vs_bulk=(total(on, tail) / total(on, bulk)) / (total(off, tail) / total(off, bulk)),
                  accept_len=sum(r["sd_accept_len"] for r in on) / len(on), identical_rollouts=all(same),
                  identical_first_step=same[0], tail_frac_off=sum(r["tail_s"] for r in off) /
                  sum(r["rollout_s"] for r in off), steps=rows, timeline_png=picture, device=device())
    ranks.teardown()
    return result if rank == 0 else None


# ---------------------------------------------------------------------------------------------------------
# the drafter, offline


def bench_drafter(args):
    """A drafter trained on the target's own text (greedy acceptance on held-out prompts before and after),
    saved as a trainer checkpoint and exported as an EAGLE-1 checkpoint."""
    t0 = time.time()
    torch.manual_seed(0)
    target, tok, prompts = model_and_prompts(args.model)
    if presets.tiny_files(args.model):  # the tiny task: its training prompts, acceptance on its test prompts
        train_set = [tok.encode(json.loads(line)["prompt"]) for line in open(presets.tiny_files(args.model)[0])]
        train_set, test = train_set[:args.n_prompts or 512], prompts[:32]
    else:
        train_set, test = ([nanotlt.encode_prompt(tok, p) for p in presets.chat_prompts(held)] for held in (0, 1))
        train_set, test = train_set[:args.n_prompts], test[:args.eval_prompts]
    init = Drafter.load(args.init, target) if args.init else None
    before = accept_len(target, init or Drafter.from_target(target), test, args.max_new_tokens, tok.eos_token_id)
    trainer = train_offline(target, train_set, tok.eos_token_id, args.steps, args.lr, args.batch_tokens,
                            args.max_new_tokens, progress=True, temperature=args.temperature, minutes=args.minutes,
                            init=init, ce_tokens=args.ce_tokens)
    after = accept_len(target, trainer.serving, test, args.max_new_tokens, tok.eos_token_id)
    trainer.save(os.path.join(args.out, "checkpoint"))
    export_eagle(trainer.serving, args.out, args.engine)
    return dict(accept_len_before=round(before, 3), accept_len_after=round(after, 3), steps=trainer.opt_steps,
                train_prompts=len(train_set), eval_prompts=len(test), train_tokens=trainer.buffer.n_tokens,
                out=args.out, seconds=round(time.time() - t0, 1))


def main(argv):
    ap = train.OneLineParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("kernels", help="GPU: the Triton kernels against copy bandwidth and SDPA")
    e = sub.add_parser("engine", help="plain decoding vs speculative decoding, same prompts and seed")
    e.add_argument("--model", default="tiny")
    e.add_argument("--drafter", default="ngram", help="a drafter directory (bench.py drafter, or a published EAGLE-1 "
                                                      "checkpoint) or ngram")
    e.add_argument("--batch", help="batch sizes (default 1,4,16,32,64 on CUDA, 1,4,16,64 on CPU)")
    e.add_argument("--new_tokens", type=int, help="default 512 on CUDA, 128 on CPU")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--top_p", type=float, default=1.0)
    e.add_argument("--no_graphs", action="store_true", help="CUDA: eager instead of CUDA graphs")
    e.add_argument("--fixed_tree", action="store_true", help="also SD with one fixed tree (6/4/16; n-gram 3/1/4)")
    e.add_argument("--vs_transformers", action="store_true", help="instead: plain greedy decoding against "
                   "transformers' generate on the same prompts")
    sub.add_parser("train", help="RL steps with SD off and on (train.py's flags)", add_help=False)
    d = sub.add_parser("drafter", help="train an EAGLE drafter offline on the target's own text")
    d.add_argument("--model", default="tiny")
    d.add_argument("--n_prompts", type=int, help="train on this many prompts (default: all; tiny: 512)")
    d.add_argument("--eval_prompts", type=int, default=8, help="held-out chat prompts the acceptance is measured on")
    d.add_argument("--steps", type=int, default=400)
    d.add_argument("--minutes", type=float, help="stop training after this many minutes (data generation apart)")
    d.add_argument("--out", default="out/drafter")
    d.add_argument("--engine", default="sglang", choices=nanotlt.ENGINES, help="whose config.json the export carries")
    d.add_argument("--init", help="start from this drafter (an export, or a published EAGLE-1 checkpoint)")
    d.add_argument("--lr", type=float, default=3e-3)
    d.add_argument("--batch_tokens", type=int, default=2048)
    d.add_argument("--max_new_tokens", type=int, default=256)
    d.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the training text")
    d.add_argument("--ce_tokens", type=int, help="soft cross-entropy on this many tokens a step (default: all)")
    args, rest = ap.parse_known_args(argv)
    if args.what != "train" and rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    for key in ("eval_prompts", "n_prompts", "steps", "batch_tokens", "max_new_tokens", "new_tokens"):
        if getattr(args, key, None) is not None and getattr(args, key) < 1:
            raise ValueError(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.what == "kernels" and not torch.cuda.is_available():
        return print("bench.py kernels needs a CUDA GPU; none found, nothing to time.")
    run = dict(kernels=bench_kernels, engine=bench_engine, drafter=bench_drafter, train=lambda _: bench_train(rest))
    result = run[args.what](args)
    if result is not None:
        print(json.dumps(result))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")  # to stderr, exit status 1
