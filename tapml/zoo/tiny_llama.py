"""zoo:tiny-llama — a small Llama-style decoder written here, with deterministic weights.

RMSNorm, rotary position embedding, grouped-query attention, SwiGLU and a causal
mask, with a KV cache and data-dependent control flow (mask only on prefill), so
carving meets what real decoders do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..carving import step
from .workload import Workload


@dataclass(frozen=True)
class Config:
    vocab: int = 256
    dim: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    hidden: int = 172
    rope_theta: float = 10000.0
    eps: float = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.dim // cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.dim, bias=False)

    sdpa = False  # attention as matmul/softmax/matmul ops (what localization needs), or as one SDPA call

    def forward(self, x, cos, sin, mask, cache: list | None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.cfg.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.cfg.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.cfg.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            if cache:  # decode: extend what earlier steps left
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        groups = self.cfg.heads // self.cfg.kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        if self.sdpa:  # one fused attention op (scripts/gpu-check runs it on each SDPA backend)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    def __init__(self, cfg: Config = Config()):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        half = cfg.dim // cfg.heads // 2
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (torch.arange(half).float() / half),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, cache: list[list] | None = None) -> torch.Tensor:
        b, s = input_ids.shape
        start = cache[0][0].shape[2] if cache and cache[0] else 0
        pos = torch.arange(start, start + s).float()
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        mask = None
        if s > 1:  # data-dependent: a single decode token needs no mask
            mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache[i] if cache is not None else None)
        return self.lm_head(self.norm(x))


def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic weights independent of the global RNG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[-1])))
    return model


def greedy_generate(model: TinyLlama, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Prefill then ``n - 1`` single-token decode steps, each a named carving step."""
    cache: list[list] = [[] for _ in model.layers]
    tokens = prompt
    with step("prefill"):
        logits = model(prompt, cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    tokens = torch.cat([tokens, nxt], dim=1)
    for k in range(1, n):
        with step(f"decode {k}"):
            logits = model(nxt, cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


def build() -> Workload:
    model = init_weights(TinyLlama()).eval()
    prompt = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 64]])
    return Workload(model=model, inputs=(prompt,), name="zoo:tiny-llama",
                    description="tiny Llama decoder, 8-token prompt",
                    generate=lambda n: greedy_generate(model, prompt, n))


def build_sdpa() -> Workload:
    """The same model and prompt with attention as ``scaled_dot_product_attention`` (one op per call)."""
    workload = build()
    for layer in workload.model.layers:
        layer.self_attn.sdpa = True
    workload.name, workload.description = "tiny-llama (SDPA)", "tiny Llama decoder, SDPA attention"
    return workload
