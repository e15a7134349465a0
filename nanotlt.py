"""nanotlt.py: the model. A Llama/Qwen2-family decoder (RMSNorm, RoPE, GQA, SwiGLU) with a static KV cache, loading
and saving of Hugging Face checkpoints, and the EAGLE-1 drafter module (one block on the target's post-norm features)
with its import and export for SGLang and vLLM.

Two forward paths share every weight:
  * `model(ids)` / `model.hidden(ids)`: the plain causal forward that training uses;
  * `model.hidden(ids, positions, Ctx(slots, cache_lens, tree_mask, kv=cache))`: inference over a static KV cache
    (`kv_cache`), on the active rows only; attention goes through tlt_kernels.tree_attention (decode, chunked
    prefill, tree verification).

    python nanotlt.py      # a random model saved in HF's format and read back by transformers: the same logits
"""
import glob
import json
import math
import os
import random
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

import tlt_kernels as kernels

USE_TRITON = None  # None: the Triton kernel on CUDA, the PyTorch reference on CPU; True/False forces it


@dataclass
class ModelArgs:
    vocab_size: int = 32
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF "rope_parameters": llama3 / linear scaling
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    tie_embeddings: bool = False
    arch: str = "llama"  # HF model_type: "llama" or "qwen2"
    max_seq_len: int = 4096  # the context the checkpoint was trained for

    @classmethod
    def from_hf(cls, cfg):
        if cfg.model_type not in ("llama", "qwen2"):
            raise ValueError(f"model_type {cfg.model_type!r} is not supported: nanotlt loads 'llama' and 'qwen2' "
                             "checkpoints")
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        return cls(vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
                   n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                   intermediate_size=cfg.intermediate_size, norm_eps=cfg.rms_norm_eps,
                   rope_theta=rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)),
                   rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
                   qkv_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
                   tie_embeddings=bool(cfg.tie_word_embeddings), arch=cfg.model_type,
                   max_seq_len=getattr(cfg, "max_position_embeddings", 4096))

    def to_hf(self):
        """The transformers config of this model, so checkpoints we write load with from_pretrained."""
        from transformers import LlamaConfig, Qwen2Config
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        kw = dict(vocab_size=self.vocab_size, hidden_size=self.dim, num_hidden_layers=self.n_layers,
                  num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim,
                  intermediate_size=self.intermediate_size, rms_norm_eps=self.norm_eps, rope_parameters=rope,
                  tie_word_embeddings=self.tie_embeddings, max_position_embeddings=self.max_seq_len)
        if self.arch == "qwen2":
            return Qwen2Config(**kw)
        return LlamaConfig(attention_bias=self.qkv_bias, architectures=["LlamaForCausalLM"], **kw)


def rope_inv_freq(a: ModelArgs):
    inv_freq = 1.0 / a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float64) / a.head_dim)
    s = a.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":  # long wavelengths slowed down by `factor`, short ones kept, a smooth ramp between
        old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3 are)")
    return inv_freq.float()


def apply_rope(x, cos, sin):  # x [B, H, T, D]; cos, sin [B, 1, T, D]; HF's rotate-half layout
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rng_state(rng=random):  # a Python RNG's state as plain ints: checkpoints load it without unpickling
    return list(rng.getstate()[1])


def set_rng_state(state, rng=random):
    rng.setstate((3, tuple(state), None))  # version 3, no cached gaussian


@dataclass
class Ctx:
    """What one forward call needs besides the tokens. Plain training: `mask` (None = causal, or a dense bool
    [B, 1, T, T] for packed samples). Static cache: the cache `kv`, the rows' `slots` and `cache_lens` [B],
    optional `tree_mask`; `memo` holds what all layers of the call share (where K/V go, the CPU path's mask)."""
    slots: torch.Tensor | None = None
    cache_lens: torch.Tensor | None = None
    tree_mask: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    kv: tuple | None = None  # the static cache (K, V), each [n_layers, slots, kv_heads, length, head_dim]
    memo: dict = field(default_factory=dict)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32, like the HF reference, then cast back
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)

    def forward(self, x, cos, sin, ctx: Ctx | None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx is None or ctx.slots is None:
            mask = None if ctx is None else ctx.mask
            if mask is not None and self.n_kv_heads < self.n_heads:  # with a mask, GQA gets no fused GPU kernel
                k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, 1) for t in (k, v))  # [B, Hq, T, D]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:  # write the new K/V at cache_lens .. cache_lens+T-1 of each row's slot, then attend over the slot
            k_cache, v_cache = ctx.kv[0][layer], ctx.kv[1][layer]  # [S, Hkv, L, D]
            if "at" not in ctx.memo:
                ctx.memo["at"] = kernels.cache_index(k_cache.shape, ctx.slots, ctx.cache_lens, T)
            for cache, new in ((k_cache, k), (v_cache, v)):  # [S * Hkv * L, D] <- [B * Hkv * T, D]
                cache.view(-1, self.head_dim).index_copy_(0, ctx.memo["at"], new.flatten(0, 2).to(cache.dtype))
            args = (q, k_cache, v_cache, ctx.slots, ctx.cache_lens, ctx.tree_mask)
            triton = x.is_cuda if USE_TRITON is None else USE_TRITON
            out = kernels.tree_attention(*args) if triton else kernels.tree_attention_ref(*args, memo=ctx.memo)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.dim, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.dim, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One decoder layer. The drafter reuses it with `input_norm=False` (EAGLE drops that norm)."""

    def __init__(self, a: ModelArgs, input_norm=True):
        super().__init__()
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps) if input_norm else nn.Identity()
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, ctx=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def rope_cos_sin(inv_freq, positions, dtype):  # positions [B, T] -> cos, sin [B, 1, T, D]
    angles = positions[..., None].float() * inv_freq
    emb = torch.cat((angles, angles), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def default_positions(input_ids, ctx):
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
    return pos + ctx.cache_lens[:, None] if ctx is not None and ctx.cache_lens is not None else pos


def kv_cache(model, n_slots, max_len):
    """A static KV cache for `model` (a Transformer or a Drafter), in its dtype: K and V, each [n_layers, n_slots,
    kv_heads, max_len, head_dim]. One tensor for all layers lets compaction move every layer at once."""
    attn, w = model.layers[0].self_attn, next(model.parameters())
    shape = (len(model.layers), n_slots, attn.n_kv_heads, max_len, attn.head_dim)
    return tuple(torch.zeros(shape, device=w.device, dtype=w.dtype) for _ in range(2))


class RopeFP32(nn.Module):
    """A module with the RoPE frequencies `inv_freq` of `rope_args` kept in fp32 through .to(bf16): a bf16
    frequency is off by up to 0.4%, which shifts the angle at position 8k by radians."""

    def __init__(self, rope_args: ModelArgs):
        super().__init__()
        self.rope_args = rope_args
        self.register_buffer("inv_freq", rope_inv_freq(rope_args), persistent=False)

    def _apply(self, fn, recurse=True):  # what .to(), .cuda(), .bfloat16() ... go through
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.rope_args).to(self.inv_freq.device)
        return self


class Transformer(RopeFP32):
    """The target (policy) model. Module names follow HF's Llama/Qwen2 so checkpoints load key for key."""

    def __init__(self, a: ModelArgs):
        super().__init__(a)
        self.args = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        if a.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False  # recompute each layer in backward: long responses need it

    def hidden(self, input_ids, positions=None, ctx: Ctx | None = None):
        """Last-layer hidden states [B, T, H] after the final norm: the features an EAGLE drafter reads and
        predicts (what transformers returns as hidden_states[-1]); `logits` is the LM head alone."""
        positions = default_positions(input_ids, ctx) if positions is None else positions
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            x = checkpoint(layer, x, cos, sin, ctx, i, use_reentrant=False) if ckpt else layer(x, cos, sin, ctx, i)
        return self.norm(x)

    def logits(self, h):
        return self.lm_head(h)

    def forward(self, input_ids, head=None):
        """[B, T] -> logits [B, T, V], or head(h) of the final hidden states h [B, T, H] (chunked log-probs, say).
        The way into a sharded (FSDP2) policy: a call gathers the root's weights (embedding, final norm, LM head)
        once, whatever `head` does with them, so every rank issues the same collectives whatever its shapes."""
        h = self.hidden(input_ids)
        return self.logits(h) if head is None else head(h)

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.bfloat16):
        """Load a Llama or Qwen2 checkpoint (local dir or hub id, single or sharded safetensors). Checkpoint code is
        never run: the config is read with trust_remote_code=False and the weights are plain tensors."""
        from huggingface_hub import snapshot_download
        from transformers import AutoConfig
        try:
            cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
            args = ModelArgs.from_hf(cfg)  # an unsupported architecture fails here, before any download
            path = name_or_path if os.path.isdir(name_or_path) else snapshot_download(
                name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        except Exception as e:
            raise ValueError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from None
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"no *.safetensors weights in {path!r} (nanotlt loads safetensors checkpoints only)")
        with torch.device("meta"):
            model = cls(args)
        state = {k.removeprefix("model."): t.to(dtype) for f in files for k, t in load_file(f, str(device)).items()}
        if args.tie_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not (args.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"{name_or_path!r}: weights do not match a {cfg.model_type} model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if args.tie_embeddings:  # assign=True replaced the embedding parameter: tie the head to it again
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(args).to(device)
        return model.eval()


def save_safetensors(state, path, metadata=None):
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, path,
              {"format": "pt", **(metadata or {})})
    os.chmod(path, 0o644)  # safetensors writes 0600: a serving engine running as another user could not read it


def save_pretrained(model, out_dir, state=None):
    """Write config.json + model.safetensors in HF's layout (names prefixed with "model."): the model's weights,
    or `state` (e.g. a sharded model's gathered state dict)."""
    os.makedirs(out_dir, exist_ok=True)
    model.args.to_hf().save_pretrained(out_dir)
    save_safetensors({("" if k == "lm_head.weight" else "model.") + k: v for k, v in
                      (model.state_dict() if state is None else state).items()
                      if not (k == "lm_head.weight" and model.args.tie_embeddings)},
                     os.path.join(out_dir, "model.safetensors"))


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except Exception as e:
        raise ValueError(f"cannot load tokenizer {name_or_path!r}: {str(e).splitlines()[0]}") from None


def encode_prompt(tokenizer, text, system=None):
    """Token ids of a prompt, ending where the model's answer starts. Chat models get their chat
    template (rendered as text, then encoded: the return type of tokenize=True varies across
    transformers versions); plain tokenizers (the tiny preset's) get the raw text."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(rendered, add_special_tokens=False))  # template has its own bos
    return list(tokenizer.encode(f"{system}\n\n{text}" if system else text))


# ----------------------------------------------------------------------------------------------------------
# The EAGLE-1 drafter: the model, reading published checkpoints, writing ones that SGLang and vLLM run. Its
# training (loss, data, spot trainer) is in drafter.py; the engine drives any object with its methods.


class Drafter(RopeFP32):
    """EAGLE-1 drafter. Only `fc` and `layers.0` are its own weights (named as EAGLE checkpoints name them);
    the embedding and LM head are the target's, shared and frozen, never copied. `fc` has no bias unless a
    published checkpoint brings one (EAGLE's Llama-2/Vicuna/Qwen2 drafters do)."""

    def __init__(self, target, fc_bias=False):
        super().__init__(target.args)
        self.fc = nn.Linear(2 * target.args.dim, target.args.dim, bias=fc_bias)
        self.layers = nn.ModuleList([Block(target.args, input_norm=False)])
        object.__setattr__(self, "target", target)  # a plain reference: not a submodule, not in state_dict

    @classmethod
    def from_target(cls, target, fc_bias=False):
        w = target.embed_tokens.weight
        return cls(target, fc_bias).to(device=w.device, dtype=w.dtype)

    @classmethod
    def load(cls, path, target):
        """A drafter for `target` from our `export`, a trainer checkpoint, or a published EAGLE-1 checkpoint: a
        directory with model.safetensors or pytorch_model.bin (or that file itself); names with or without a
        "model." prefix; embed_tokens / lm_head / norm, if present, are ignored (the target's are used)."""
        state = read_eagle_state(path)
        bias = state.get("fc.bias")
        drafter = cls.from_target(target, fc_bias=bias is not None and bool(bias.any()))
        mine = drafter.state_dict()
        bad = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
        if bad:
            got = {k: tuple(state[k].shape) if k in state else "missing" for k in bad[:3]}
            raise ValueError(f"{path}: not an EAGLE-1 drafter for this target ({got}; expected fc.weight "
                             f"{tuple(mine['fc.weight'].shape)})")
        drafter.load_state_dict({k: state[k] for k in mine})
        return drafter

    def hidden(self, tokens, h, positions, ctx=None):
        """tokens [B, T] = x_{t+1}, h [B, T, H] = target h_t, positions [B, T] = t  ->  predicted h_{t+1}."""
        with torch.no_grad():  # the shared embedding is frozen
            emb = self.target.embed_tokens(tokens)
        x = self.fc(torch.cat((emb, h.to(emb.dtype)), dim=-1))
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        return self.layers[0](x, cos, sin, ctx)

    def logits(self, h):  # the predicted feature goes straight to the target's LM head (EAGLE-1: no norm)
        return self.target.logits(h)


def read_eagle_state(path):
    """The tensors of an EAGLE-1 checkpoint (file or directory; safetensors or a weights-only torch pickle),
    names without a "model." prefix."""
    names = ("model.safetensors", "pytorch_model.bin")
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in names]
    f = next((f for f in files if os.path.isfile(f)), None)
    if f is None:
        raise ValueError(f"{path}: no drafter weights (model.safetensors or pytorch_model.bin)")
    # a torch pickle is read weights-only: it never unpickles code
    state = load_file(f) if f.endswith(".safetensors") else torch.load(f, map_location="cpu", weights_only=True)
    return {k.removeprefix("model."): v for k, v in state.items()}


ENGINES = ("sglang", "vllm")


def export_eagle(drafter, out_dir, engine="sglang"):
    """Write the drafter as an EAGLE-1 checkpoint that `engine` runs as its authors' drafters: model.safetensors
    with fc.weight, fc.bias and layers.0.* (no input_layernorm, no embedding, norm or LM head: the engine hands
    the drafter the target's post-norm features and feeds its output straight to the target's head), and
    config.json for that engine, which is the only difference between the two:
      * sglang: architectures LlamaForCausalLMEagle / Qwen2ForCausalLMEagle (SGLang does not rename them);
        its fc always has a bias, hence the explicit (zero) fc.bias;
      * vllm: architectures LlamaForCausalLM, which vLLM maps to its EAGLE Llama drafter for method "eagle";
        a Qwen2 target's drafter is that Llama drafter with `qkv_bias`; vLLM's fc has no bias (it would drop
        one silently, so a drafter with a nonzero fc bias is refused).
    No top-level "bias" key: both engines read it as "attention_bias" (EAGLE's own code reads it as fc's bias,
    True when absent, which the zero fc.bias satisfies)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (choose {', '.join(ENGINES)})")
    a, dtype, state = drafter.target.args, drafter.fc.weight.dtype, drafter.state_dict()
    bias = state.get("fc.bias")
    if engine == "vllm" and bias is not None and bool(bias.any()):
        raise ValueError("vLLM's EAGLE-1 drafter has no fc bias: this drafter's nonzero fc.bias would be dropped")
    state["fc.bias"] = bias if bias is not None else torch.zeros(a.dim, dtype=dtype, device=drafter.fc.weight.device)
    qwen = a.arch == "qwen2"
    cfg = dict(hidden_size=a.dim, intermediate_size=a.intermediate_size, num_attention_heads=a.n_heads,
               num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim, num_hidden_layers=1, vocab_size=a.vocab_size,
               rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, rope_scaling=a.rope_scaling, hidden_act="silu",
               max_position_embeddings=a.max_seq_len, tie_word_embeddings=False,
               torch_dtype=str(dtype).removeprefix("torch."))
    if engine == "sglang":
        cfg.update(architectures=["Qwen2ForCausalLMEagle" if qwen else "LlamaForCausalLMEagle"],
                   model_type="qwen2" if qwen else "llama", **({} if qwen else dict(attention_bias=a.qkv_bias)))
    else:
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, qkv_bias=a.qkv_bias)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    save_safetensors(state, os.path.join(out_dir, "model.safetensors"))


if __name__ == "__main__":
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model, ids = Transformer(ModelArgs(vocab_size=64, qkv_bias=True, arch="qwen2")), torch.randint(0, 64, (2, 16))
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        print(f"|nanotlt - transformers| of the logits: {(model(ids) - hf(ids).logits).abs().max():.2e}")
