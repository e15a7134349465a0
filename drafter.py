"""drafter.py: the EAGLE-style drafter and its spot trainer.

The drafter is one decoder layer that reads the target's last-layer hidden state h_t together with the
embedding of the next token x_{t+1} and predicts h_{t+1}; the target's own frozen final norm and LM head turn
that into draft tokens. It is trained online from hidden states the rollout computes anyway.

Run `python drafter.py [--model NAME_OR_PATH] [--steps N] [--out DIR]` to train one offline and measure its
acceptance length before and after.
"""
import torch
import torch.nn as nn

from nanotlt import Block, rope_cos_sin, rope_inv_freq, setup_cache


class Drafter(nn.Module):
    """EAGLE-1 drafter. Only `fc` and `layers.0` are its own weights (named as EAGLE checkpoints name them);
    the embedding, final norm and LM head are the target's, shared and frozen, never copied."""

    def __init__(self, target):
        super().__init__()
        a = target.args
        self.fc = nn.Linear(2 * a.dim, a.dim, bias=False)
        self.layers = nn.ModuleList([Block(a, input_norm=False)])
        self.register_buffer("inv_freq", rope_inv_freq(a), persistent=False)
        object.__setattr__(self, "target", target)  # a plain reference: not a submodule, not in state_dict

    @classmethod
    def from_target(cls, target):
        w = target.embed_tokens.weight
        return cls(target).to(device=w.device, dtype=w.dtype)

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
