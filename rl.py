"""rl.py — the GRPO pieces of nanotlt: datasets and prompts, math answer checking and rewards,
group advantages, the clipped token-level policy loss, and chunked log-prob computation.

Everything here is model-agnostic: a model only needs `hidden(ids) -> h` and `logits(h) -> logits`
(see nanotlt.py). train.py wires these into the RL step loop (DESIGN.md §3, §4 "GRPO").

    python rl.py      # a short offline self-demo: answer extraction, rewards, group advantages

Reward code reads model output as text only: nothing is ever evaluated or executed.
"""
import math
import os
import re

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import tlt_kernels as kernels
from ranks import all_reduce, is_sharded

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# ----------------------------------------------------------------------------- answers and rewards

# math-verify's parse and verify each stop after this many seconds (signal.alarm, so whole seconds, main thread
# only) and then count as no match: a pathological answer such as 2^{2^{2^{100}}} costs at most a few seconds
_TIMEOUT_S = 2
# a plain integer (ASCII digits: \d would also take other scripts' digits); at most 30 digits, so int() is instant
_INTEGER = re.compile(r"-?[0-9]{1,30}")


def _braced(text, i):
    """Content of the brace group opening at text[i] ('{'), or None if it never closes."""
    if text[i:i + 1] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text):
    """The final marked answer in `text`: the content of the last \\boxed{...}, else the rest of the line after the
    last ####, without a sentence-final period; None if there is none. Never some number from the reasoning: a
    response that stops before marking its answer has none, and a final \\boxed that never closes (a truncated or
    malformed answer) gives None rather than an earlier box."""
    i = text.rfind("\\boxed")
    if i >= 0:
        ans = _braced(text, len(text) - len(text[i + len("\\boxed"):].lstrip()))
    else:
        i = text.rfind("####")
        ans = (text[i + 4:].strip().splitlines() or [""])[0] if i >= 0 else None
    ans = (ans or "").strip().removesuffix(".").rstrip()  # '#### 1,000.': math-verify cannot read '1,000.'
    return ans or None


def _verify(pred, gold):
    """math-verify's verdict on two extracted answers (LaTeX or plain text). Each is parsed as the content of a
    \\boxed{} with the LaTeX extractor only: the default extraction would also pick up a bare number anywhere.
    An answer with unbalanced braces would close the box early and be read as something else: no match. Errors
    and timeouts inside math-verify count as no match (it catches them); calling it off the main thread raises."""
    if any(_braced("{" + a + "}", 0) != a for a in (pred, gold)):
        return False
    from math_verify import LatexExtractionConfig, parse, verify  # here: integer answers never need it
    pred, gold = (parse("\\boxed{" + a + "}", [LatexExtractionConfig()], parsing_timeout=_TIMEOUT_S)
                  for a in (pred, gold))
    return bool(pred and gold and verify(gold, pred, timeout_seconds=_TIMEOUT_S))  # gold first: it is not symmetric


def math_reward(completion, gold):
    """1.0 if the completion's final marked answer (\\boxed{} or ####, see extract_answer) equals the gold answer
    by math-verify, else 0.0 (no marked answer, a malformed or unparsable one, or a wrong one). `gold` may be a
    bare answer ('72', '\\frac{1}{2}') or a full solution ending in '#### 72' / containing \\boxed{}.
    Plain integers on both sides (the tiny task, most of GSM8K) are compared exactly without math-verify, with
    the verdict it would give (tested): the tiny preset scores thousands of responses a step on a CPU."""
    pred = extract_answer(completion)
    if re.search(r"\\boxed|####", gold):  # a full solution: take its final answer
        gold = extract_answer(gold)
    if pred is None or gold is None:  # nothing to compare (or malformed): no reward
        return 0.0
    if _INTEGER.fullmatch(pred) and _INTEGER.fullmatch(gold):
        return float(int(pred) == int(gold))
    return float(_verify(pred, gold))


# ----------------------------------------------------------------------------- GRPO

def group_advantages(rewards, group_size, eps=1e-6):
    """(r - mean_g) / (std_g + eps) over consecutive groups of `group_size` samples of one prompt.
    Population std (unbiased=False): a group of 2 with rewards [1, 0] gets +-1, not +-0.71.
    A group whose rewards are all equal gets 0: it carries no learning signal."""
    assert rewards.numel() % group_size == 0, "rewards must hold whole groups"
    r = rewards.float().view(-1, group_size)  # [N/G, G]
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)).view(-1)  # [N]


def mask_truncated(outputs, eos_id, max_new_tokens):
    """Responses cut at the length limit (no eos) get no loss: their reward says nothing about their answer.
    They also leave the token count that normalises the loss. Returns (outputs for the loss, truncated flags)."""
    truncated = [len(o) >= max_new_tokens and o[-1] != eos_id for o in outputs]
    return [[] if t else o for o, t in zip(outputs, truncated)], truncated


def rollout_rewards(outputs, texts, golds, eos_id, max_new_tokens):
    """The reward of each rollout response, as the training loop uses it: math_reward of its text, and 0 for a
    response cut at the length limit (mask_truncated's rule), even one that boxed the right answer before the cut:
    only finished responses earn. outputs: token lists; texts: their decoded text; golds: the gold answers.
    Returns rewards [N] (float32)."""
    _, truncated = mask_truncated(outputs, eos_id, max_new_tokens)
    return torch.tensor([0.0 if t else math_reward(x, g) for x, g, t in zip(texts, golds, truncated)])  # [N]


def policy_loss(logp, old_logp, advantages, mask, n_tokens, eps_low=0.2, eps_high=0.28, ref_logp=None, kl_coef=0.0):
    """Clipped token-level GRPO loss. logp, old_logp, mask: [B, T]; advantages: [B].
    The sum over tokens is divided by `n_tokens`, the number of response tokens in the GLOBAL batch
    (all ranks, all micro-batches): summing the gradients of the micro-batches (and DDP averaging
    times world size, as the caller arranges) then gives the token mean of the whole batch."""
    mask = mask.to(logp.dtype)
    # old_logp is a constant: with one update per rollout it equals logp.detach(), the ratio is 1
    # and the gradient is the plain policy gradient -A * grad(logp). Clamp guards exp overflow.
    ratio = torch.exp((logp - old_logp.detach()).clamp(-20.0, 20.0))  # [B, T]
    adv = advantages.to(logp.dtype)[:, None]  # [B, 1]
    unclipped, clipped = ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # [B, T]
    use_kl = ref_logp is not None and kl_coef != 0
    if use_kl:
        # log(ref / pi), clamped above so exp cannot overflow (a token pi finds e^20 times less likely than ref
        # does: beyond that the penalty stops growing and has no gradient). Not below: exp(d) -> 0 is harmless
        # and the gradient 1 - exp(d) keeps pulling pi back toward ref however far above it pi has gone.
        d = (ref_logp.detach() - logp).clamp(max=20.0)
        kl = torch.exp(d) - d - 1.0  # k3 estimator of KL(pi || ref): unbiased, always >= 0
        per_token = per_token + kl_coef * kl
    n = n_tokens.clamp(min=1) if torch.is_tensor(n_tokens) else max(n_tokens, 1)  # tensor: no sync
    loss = (per_token * mask).sum() / n
    with torch.no_grad():  # local (this micro-batch) token means; 0-dim tensors, no device sync
        mean = lambda x: (x.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1.0)
        metrics = {"clip_frac": mean(clipped < unclipped), "ratio_mean": mean(ratio)}
        if use_kl:
            metrics["kl"] = mean(kl)
    return loss, metrics


def _chunk_logprobs(model, h, targets, temperature=1.0, top_p=1.0):
    """h [B, c, H], targets [B, c] -> log-probs [B, c] of the targets (token_logprobs' per-chunk work)."""
    logits = model.logits(h).float() / temperature  # [B, c, V] fp32: only one chunk's worth at a time
    if top_p < 1.0:  # the nucleus the rollout sampled from; a set, so it carries no gradient
        with torch.no_grad():
            drop = kernels.nucleus_drop(logits, top_p).scatter(-1, targets[..., None], False)  # [B, c, V], target kept
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)  # [B, c], no 2nd [B, c, V]


def token_logprobs(model, input_ids, chunk_tokens=4096, temperature=1.0, top_p=1.0):
    """logp[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1]), [B, T-1], in one call of `model` (a sharded
    policy gathers its root's weights once, whatever the chunks). The trunk runs once; the head runs on about
    `chunk_tokens` tokens at a time (whole rows, a span of positions), so the [B, T, V] fp32 logits (V ~ 150k)
    never exist at once: 4096 tokens are 2.5 GB. With grad on, each chunk is checkpointed: backward recomputes
    its logits instead of keeping them all alive. `temperature`, `top_p`: the log-probs of the distribution a
    rollout with these settings sampled from (spec_decode.sample): softmax(logits / T), and with top_p < 1
    renormalised over the nucleus, the smallest set of most likely tokens whose probability reaches top_p. A
    sampled token is in its nucleus; a token that is not (a prompt or padding position, or a sampled token that
    different numerics put just outside) is scored as if the nucleus also held it, so every log-prob stays finite:
    -inf would turn the masked loss into nan (-inf * 0). top_p < 1 costs about three more chunk-sized buffers (the
    sort): lower `chunk_tokens` if memory is tight."""
    B, T = input_ids.shape
    chunk = max(1, chunk_tokens // B)  # positions per chunk

    def head(h):  # h [B, T, H] -> [B, T-1]
        grad, out = torch.is_grad_enabled() and h.requires_grad, []
        for s in range(0, T - 1, chunk):
            e = min(s + chunk, T - 1)
            args = (model, h[:, s:e], input_ids[:, s + 1:e + 1], temperature, top_p)
            out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
        return torch.cat(out, 1) if out else h.new_zeros(B, 0)
    return model(input_ids, head=head)


# ----------------------------------------------------------------------------- the policy update, sharded with FSDP2


def lr_at(cfg, step):
    """The policy's learning rate at a step: linear warm-up, then a cosine from lr down to lr x lr_min_ratio."""
    r = cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.steps - 1)))
    return cfg.lr * min(1.0, (step + 1) / (cfg.lr_warmup + 1)) * r


def update(cfg, policy, ref, opt, samples, outputs, adv, world, progress=False):
    """The policy update: micro-batches of similar length, token-level loss normalised by the global number of
    response tokens, gradients summed across ranks (FSDP2's reduce-scatter, summing). Returns the batch's
    metrics: loss, clip_frac (response tokens whose ratio was clipped), kl (k3, against the reference), entropy
    (the mean of -log p over the sampled tokens: the sampling distribution's entropy, estimated), the gradient
    norm before clipping and the learning rate. Raises on every rank together if any rank's loss or the
    gradients are not finite."""
    seqs = [(row["ids"] + out, len(row["ids"]), len(out), a)  # ids, first response position, its length, advantage
            for (_, row), out, a in zip(samples, outputs, adv.tolist())]
    device = next(policy.parameters()).device
    n_tokens = all_reduce(torch.tensor(float(sum(s[2] for s in seqs)), device=device))
    batches = [[]]
    for s in sorted(seqs, key=lambda s: len(s[0])):  # token-budget micro-batches of similar lengths: little padding
        if batches[-1] and (len(batches[-1]) + 1) * len(s[0]) > cfg.micro_batch_tokens:
            batches.append([])
        batches[-1].append(s)
    # sharded, every rank must run as many forward/backward passes (each gathers weights from all ranks): the
    # ranks with fewer micro-batches add empty ones (a 2-token row, no response token: no loss, zero gradients)
    n = int(all_reduce(torch.tensor(float(len(batches)), device=device), dist.ReduceOp.MAX).item())
    batches += [[([0, 0], 1, 0, 0.0)]] * (n - len(batches))
    with torch.no_grad():  # the behaviour policy (for the clipped ratio) and the frozen reference (for the KL)
        T = cfg.temperature or 1.0  # greedy rollouts: plain log-probs
        lp = lambda model: [logprobs(model, b, device, T, cfg.top_p, cfg.logprob_chunk)[0] for b in batches]
        old = lp(policy) if cfg.updates_per_rollout > 1 else None
        refs = lp(ref) if ref is not None else None
    # summed over this rank's micro-batches: loss; over its response tokens: clipped, KL, -log p
    sums = torch.zeros(4, device=device)
    for _ in range(cfg.updates_per_rollout):
        for j, b in enumerate(tqdm(batches, desc="update", leave=False, disable=not progress)):
            logp, mask, a = logprobs(policy, b, device, T, cfg.top_p, cfg.logprob_chunk)
            loss, m = policy_loss(logp, logp.detach() if old is None else old[j], a, mask, n_tokens,
                                  ref_logp=None if refs is None else refs[j], kl_coef=cfg.kl_coef)
            loss.backward()
            sums += torch.stack([loss.detach(), m["clip_frac"] * mask.sum(), m.get("kl", 0 * loss) * mask.sum(),
                                 -(logp.detach() * mask).sum()])
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor: sharded
        if not all_reduce(torch.isfinite(sums[0] + grad_norm).float(), dist.ReduceOp.MIN).item():
            raise FloatingPointError("non-finite loss or gradients: try a lower --lr")
        opt.step()
        opt.zero_grad(set_to_none=True)
    sums = all_reduce(sums).tolist()
    tokens = n_tokens.item() * cfg.updates_per_rollout
    return dict(loss=sums[0] / cfg.updates_per_rollout, clip_frac=sums[1] / max(1, tokens), kl=sums[2] / max(1, tokens),
                entropy=sums[3] / max(1, tokens), grad_norm=grad_norm.item(), lr=opt.param_groups[0]["lr"])


def logprobs(policy, seqs, device, temperature=1.0, top_p=1.0, chunk_tokens=4096):
    """Log-probs of the response tokens under softmax(logits / temperature) within the top-p nucleus, the
    distribution the rollout sampled from: (logp [B, T-1], mask [B, T-1], advantages [B]). On a GPU the compute
    is bf16 (FSDP2's mixed precision, or autocast for a single rank)."""
    T = max(len(s[0]) for s in seqs)
    # mask[b, t]: token t+1 is a response token
    ids, mask = torch.zeros(len(seqs), T, dtype=torch.long), torch.zeros(len(seqs), T - 1)
    for b, (toks, start, n, _) in enumerate(seqs):
        ids[b, :len(toks)] = torch.tensor(toks)
        mask[b, start - 1:start - 1 + n] = 1
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda" and not is_sharded(policy)):
        logp = token_logprobs(policy, ids.to(device), chunk_tokens, temperature, top_p)
    return logp.float(), mask.to(device), torch.tensor([s[3] for s in seqs], device=device)


# ----------------------------------------------------------------------------- data and prompts

_HUB_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}
_PROMPT_FIELDS = ("prompt", "question", "problem", "instruction")
_ANSWER_FIELDS = ("answer", "solution")  # GSM8K's answer is a full solution; MATH has both


def _field(row, names):
    for n in names:
        v = row.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)  # datasets turns '72' into 72 in a mixed-type json column: keep it
        if isinstance(v, str) and v.strip():
            return v


def load_rows(source, split="train", answers=True):
    """Rows [{'prompt', 'answer'}] and the number of bad rows skipped. `source`: a local
    .jsonl/.json file (fields prompt/answer) or a hub dataset id (gsm8k question/answer, MATH-style
    problem/answer or problem/solution). Answers that are full solutions are reduced to their final
    answer. Rows with a missing, empty or non-text field are skipped and counted. answers=False: prompts
    only (rows {'prompt'}), e.g. to train a drafter."""
    import datasets  # here, not at the top: the rewards and the loss do not need it
    local = source.endswith((".json", ".jsonl")) or os.path.exists(source)
    try:
        if local and os.path.isfile(source) and os.path.getsize(source) == 0:
            raise ValueError("the file is empty")
        ds = (datasets.load_dataset("json", data_files=source, split="train") if local
              else datasets.load_dataset(source, _HUB_CONFIGS.get(source), split=split))
    except Exception as e:  # missing file, bad json, no network, unknown id: one clear line
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot load dataset {source!r}: {msg}") from None
    rows, bad = [], 0
    for row in ds:
        prompt, answer = _field(row, _PROMPT_FIELDS), _field(row, _ANSWER_FIELDS) if answers else ""
        if answer and re.search(r"\\boxed|####", answer):
            answer = extract_answer(answer)
        if prompt is None or answer is None:
            bad += 1
            continue
        rows.append({"prompt": prompt, "answer": answer} if answers else {"prompt": prompt})
    if not rows:
        raise ValueError(f"no usable rows in dataset {source!r} ({bad} bad rows skipped)")
    return rows, bad


# ----------------------------------------------------------------------------- self-demo

if __name__ == "__main__":
    gold = "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"
    group = ["48 + 24 = 72, so the answer is \\boxed{72}.", "She sold 48+24 clips in total: #### 72",
             "48 + 24 = 72", "\\boxed{72", "The answer is \\boxed{\\frac{144}{2}}"]
    for c in group:
        print(f"{extract_answer(c)!r:>18}  math {math_reward(c, gold):.0f}  <- {c!r}")
    for a, b in [("\\boxed{1{,}000}", "1000"), ("\\boxed{\\frac12}", "0.5"),
                 ("\\boxed{\\left( 3, \\pi \\right)}", "(3,\\pi)")]:
        print(f"{a!r} vs gold {b!r}: {math_reward(a, b):.0f}")
    rewards = torch.tensor([math_reward(c, gold) for c in group[:4]] + [1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    print("rewards", rewards.tolist(), "-> advantages (G=4)", [round(a, 3) for a in adv.tolist()])
