"""rl.py — the GRPO pieces of nanotlt: datasets and prompts, math answer checking and rewards,
group advantages, the clipped token-level policy loss, and chunked log-prob computation.

Everything here is model-agnostic: a model only needs `hidden(ids) -> h` and `logits(h) -> logits`
(see nanotlt.py). train.py wires these into the RL step loop (DESIGN.md §3, §4 "GRPO").

    python rl.py      # a short offline self-demo: answer extraction, rewards, group advantages

Reward code reads model output as text only: nothing is ever evaluated or executed.
"""
import os
import re
from fractions import Fraction

import torch
from torch.utils.checkpoint import checkpoint

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# ----------------------------------------------------------------------------- answers and rewards

# a number as it appears in prose: a simple fraction, 1,234,567.89 (thousands commas), 12.5 or .5
_NUMBER = re.compile(r"-?\d+/\d+|-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
# plain decimals only: Fraction() would also accept '1e999999999', which would hang building the int
_DECIMAL = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


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


def extract_answer(text, fallback=True):
    """The final answer in `text`: last \\boxed{...}, else what follows the last ####, else (if
    fallback) the last number; None if there is none. A final \\boxed that never closes (a
    truncated or malformed answer) gives None rather than some earlier number."""
    i = text.rfind("\\boxed")
    if i >= 0:
        ans = _braced(text, len(text) - len(text[i + len("\\boxed"):].lstrip()))
        return (ans or "").strip() or None
    i = text.rfind("####")
    if i >= 0:
        return (text[i + 4:].strip().splitlines() or [""])[0].strip() or None
    nums = _NUMBER.findall(text) if fallback else []
    return nums[-1] if nums else None


def _to_number(s):
    """Fraction for '1,000', '-.5', '3/4', '\\frac{3}{4}' (exact, so 0.5 == 1/2), else None."""
    m = re.fullmatch(r"(-?)\\frac\{([^{}]+)\}\{([^{}]+)\}", s)
    parts = [m[1] + m[2], m[3]] if m else s.split("/")
    if len(parts) > 2:
        return None
    parts = [p.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d*)?", p) else p for p in parts]
    if not all(_DECIMAL.fullmatch(p) for p in parts):
        return None
    try:
        vals = [Fraction(p) for p in parts]
        return vals[0] / vals[1] if len(vals) == 2 else vals[0]
    except (ValueError, ZeroDivisionError):  # 1/0, or an int longer than Python will parse
        return None


def normalize_answer(ans):
    """A comparable form of an answer: a Fraction if it is a number, else a normalised string."""
    s = re.sub(r"\\(left|right)(?![A-Za-z])|\\[!,;]|\\?\$|\\?%|\^\{?\\circ\}?", "", ans)
    s = re.sub(r"\\[dt]frac", r"\\frac", s).replace(" ", "")
    unwrapped = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s).rstrip(".")
    dropped = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{[^{}]*\}", "", s).rstrip(".")  # '5\text{cm}'
    for cand in (unwrapped, dropped):
        num = _to_number(cand)
        if num is not None:
            return num
    return unwrapped


def math_reward(completion, gold):
    """1.0 if the completion's final answer equals the gold answer, else 0.0. `gold` may be a bare
    answer ('72', '\\frac{1}{2}') or a full solution ending in '#### 72' / containing \\boxed{}."""
    pred = extract_answer(completion)
    if re.search(r"\\boxed|####", gold):  # a full solution: take its final answer
        gold = extract_answer(gold, fallback=False)
    if pred is None or gold is None:  # nothing to compare (or malformed): no reward
        return 0.0
    return float(normalize_answer(pred) == normalize_answer(gold))


def format_reward(completion):
    """1.0 if the completion marks a well-formed final answer (\\boxed{...} or ####), else 0.0."""
    return float(extract_answer(completion, fallback=False) is not None)


# ----------------------------------------------------------------------------- GRPO

def group_advantages(rewards, group_size, eps=1e-6):
    """(r - mean_g) / (std_g + eps) over consecutive groups of `group_size` samples of one prompt.
    Population std (unbiased=False): a group of 2 with rewards [1, 0] gets +-1, not +-0.71.
    A group whose rewards are all equal gets 0: it carries no learning signal."""
    assert rewards.numel() % group_size == 0, "rewards must hold whole groups"
    r = rewards.float().view(-1, group_size)  # [N/G, G]
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)  # [N]


def mask_truncated(outputs, eos_id, max_new_tokens):
    """Responses cut at the length limit (no eos) get no loss: their reward says nothing about their answer.
    They also leave the token count that normalises the loss. Returns (outputs for the loss, truncated flags)."""
    truncated = [len(o) >= max_new_tokens and o[-1] != eos_id for o in outputs]
    return [[] if t else o for o, t in zip(outputs, truncated)], truncated


def policy_loss(logp, old_logp, advantages, mask, n_tokens, eps_low=0.2, eps_high=0.28,
                ref_logp=None, kl_coef=0.0):
    """Clipped token-level GRPO loss. logp, old_logp, mask: [B, T]; advantages: [B].
    The sum over tokens is divided by `n_tokens`, the number of response tokens in the GLOBAL batch
    (all ranks, all micro-batches): summing the gradients of the micro-batches (and DDP averaging
    times world size, as the caller arranges) then gives the token mean of the whole batch."""
    mask = mask.to(logp.dtype)
    # old_logp is a constant: with one update per rollout it equals logp.detach(), the ratio is 1
    # and the gradient is the plain policy gradient -A * grad(logp). Clamp guards exp overflow.
    ratio = torch.exp((logp - old_logp.detach()).clamp(-20.0, 20.0))  # [B, T]
    adv = advantages.to(logp.dtype)[:, None]  # [B, 1]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # [B, T]
    use_kl = ref_logp is not None and kl_coef != 0
    if use_kl:
        d = ref_logp.detach() - logp
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


def _chunk_logprobs(model, h, targets, temperature=1.0):
    logits = model.logits(h).float() / temperature  # [B, c, V] fp32: only one chunk's worth at a time
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)  # [B, c], no 2nd [B, c, V]


def token_logprobs(model, input_ids, chunk_tokens=4096, temperature=1.0):
    """logp[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1]) and the hidden states h.
    The trunk runs once; the head runs on about `chunk_tokens` tokens at a time (whole rows, a span of positions),
    so the [B, T, V] fp32 logits (V ~ 150k) never exist at once: 4096 tokens are 2.5 GB. With grad on, each chunk
    is checkpointed: backward recomputes its logits instead of keeping them all alive. `temperature`: the
    log-probs of softmax(logits / T), the distribution a rollout at temperature T sampled from.
    Returns (logp [B, T-1], h [B, T, H])."""
    h = model.hidden(input_ids)  # [B, T, H]
    B, T = input_ids.shape
    chunk = max(1, chunk_tokens // B)  # positions per chunk
    grad = torch.is_grad_enabled() and h.requires_grad
    out = []
    for s in range(0, T - 1, chunk):
        e = min(s + chunk, T - 1)
        args = (model, h[:, s:e], input_ids[:, s + 1:e + 1], temperature)
        out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad
                   else _chunk_logprobs(*args))
    logp = torch.cat(out, 1) if out else h.new_zeros(input_ids.shape[0], 0)  # [B, T-1]
    return logp, h


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
    return None


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
            answer = extract_answer(answer, fallback=False)
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
             "I think it is 70", "\\boxed{72", "The answer is \\boxed{\\frac{144}{2}}"]
    for c in group:
        print(f"{extract_answer(c)!r:>18}  math {math_reward(c, gold):.0f}  "
              f"format {format_reward(c):.0f}  <- {c!r}")
    for a, b in [("1,000", "$1000.0"), ("\\frac{1}{2}", ".5"), ("\\left( 3, \\pi \\right)", "(3,\\pi)")]:
        print(f"{a!r} == {b!r}: {normalize_answer(a) == normalize_answer(b)}")
    rewards = torch.tensor([math_reward(c, gold) for c in group[:4]] + [1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    print("rewards", rewards.tolist(), "-> advantages (G=4)", [round(a, 3) for a in adv.tolist()])
