"""The seed workloads: small, seeded models of the kinds tapml's users port.

- ``music-transformer``: a GPT-2-style symbolic-music decoder with an arrival-time
  event vocabulary (time, duration, note·instrument triplets), as in the
  Anticipatory Music Transformer; generation emits events.
- ``ternary-llama``: the tiny Llama with every linear layer ternarized as in
  TernaryLLM — weights in {-1, 0, +1} with learnable per-channel scale and shift.
- ``unet3d``: a 3D convolutional U-Net of the kind used for low-dose PET
  translation (conv3d, group norm, down/upsampling, skip connections).
- ``ape-attention``: context chunks encoded in parallel with shared position
  offsets, then attended to together with adjusted attention scaling, as in
  adaptive parallel encoding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import tiny_llama
from .workload import Workload

SEEDS = {
    "music-transformer": ("GPT-2-style symbolic-music transformer (time/duration/note-instrument events); "
                          "--generate N emits events", True),
    "ternary-llama": ("tiny Llama with ternarized linear layers ({-1,0,+1} × per-channel scale + shift)", True),
    "unet3d": ("3D convolutional U-Net (conv3d, group norm, down/upsampling, skips) on a 16³ volume", False),
    "ape-attention": ("parallel-encoded context chunks (shared positions) attended with adjusted scaling", False),
}

# -- music ------------------------------------------------------------------------------------
TIME, DURATION, NOTE = 0, 100, 200  # token offsets: 100 arrival times, 100 durations, 128 notes × 2 instruments
VOCAB = NOTE + 256 + 3


def _music() -> Workload:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=VOCAB - 3, eos_token_id=VOCAB - 2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    events = [(0, 10, 60), (10, 10, 64), (20, 20, 67), (20, 40, 128 + 48)]  # C major triad, then a bass note
    prompt = torch.tensor([[tok for t, d, n in events for tok in (TIME + t, DURATION + d, NOTE + n)]])

    def generate(n: int) -> torch.Tensor:
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=VOCAB - 1)

    return Workload(model=model, inputs={"input_ids": prompt}, name="zoo:music-transformer", generate=generate,
                    description="music transformer on 4 note events")


# -- ternary ----------------------------------------------------------------------------------
class TernaryLinear(nn.Module):
    """y = (x · ternary(W)ᵀ) · scale + shift, ternary(W) ∈ {-1, 0, +1} per TernaryLLM."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        out = linear.out_features
        self.scale = nn.Parameter(self.weight.detach().abs().mean(dim=1))
        self.shift = nn.Parameter(torch.zeros(out))

    def forward(self, x):
        w = self.weight
        threshold = 0.7 * w.abs().mean(dim=1, keepdim=True)
        ternary = torch.where(w.abs() > threshold, torch.sign(w), torch.zeros_like(w))
        return nn.functional.linear(x, ternary) * self.scale + self.shift


def _ternarize(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, TernaryLinear(child))
        else:
            _ternarize(child)
    return module


def _ternary() -> Workload:
    model = _ternarize(tiny_llama.init_weights(tiny_llama.TinyLlama())).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TernaryLinear):
                m.shift.copy_(0.01 * torch.randn(m.shift.shape, generator=g))
    prompt = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 64]])
    return Workload(model=model, inputs=(prompt,), name="zoo:ternary-llama",
                    generate=lambda n: tiny_llama.greedy_generate(model, prompt, n),
                    description="ternary tiny Llama, 8-token prompt")


# -- unet3d -----------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, cout)

    def forward(self, x):
        x = nn.functional.silu(self.norm1(self.conv1(x)))
        return nn.functional.silu(self.norm2(self.conv2(x)))


class UNet3D(nn.Module):
    def __init__(self, channels=(8, 16, 32)):
        super().__init__()
        c1, c2, c3 = channels
        self.enc1, self.enc2 = _Block(1, c1), _Block(c1, c2)
        self.bottleneck = _Block(c2, c3)
        self.up2 = nn.ConvTranspose3d(c3, c2, 2, stride=2)
        self.dec2 = _Block(2 * c2, c2)
        self.up1 = nn.ConvTranspose3d(c2, c1, 2, stride=2)
        self.dec1 = _Block(2 * c1, c1)
        self.head = nn.Conv3d(c1, 1, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool3d(e1, 2))
        b = self.bottleneck(nn.functional.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return x + self.head(d1)  # residual: predict the full-dose correction


def _unet() -> Workload:
    torch.manual_seed(0)
    model = UNet3D().eval()
    g = torch.Generator().manual_seed(0)
    volume = torch.rand(1, 1, 16, 16, 16, generator=g).pow(2)  # nonnegative, skewed like PET activity
    return Workload(model=model, inputs=(volume,), name="zoo:unet3d", description="3D U-Net on a 16³ volume")


# -- adaptive parallel encoding ---------------------------------------------------------------
class APEAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x):
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    sdpa = False  # attention as matmul/softmax/matmul ops, or as one SDPA call (scripts/gpu-check)

    def forward(self, x, context_kv=None, temperature: float = 1.0, context_scale: float = 1.0):
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))
        s = x.shape[1]
        if self.sdpa:
            return self._sdpa(x, q, k, v, context_kv, temperature, context_scale), (k, v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        scores = scores + torch.full((s, s), float("-inf")).triu(1)
        if context_kv is not None:
            ck, cv = context_kv
            # APE: context attention sharpened by a temperature and re-weighted by a scaling factor
            cscores = q @ ck.transpose(-2, -1) / (math.sqrt(self.head_dim) * temperature) + math.log(context_scale)
            scores = torch.cat([cscores, scores], dim=-1)
            v = torch.cat([cv, v], dim=2)
        out = torch.softmax(scores, dim=-1) @ v
        return self.out(out.transpose(1, 2).reshape(x.shape)), (k, v)

    def _sdpa(self, x, q, k, v, context_kv, temperature: float, context_scale: float):
        """The same attention as one SDPA call: the temperature folded into the context keys, the context
        scaling and the causal mask into an additive mask."""
        s = x.shape[1]
        mask = torch.full((s, s), float("-inf")).triu(1)
        if context_kv is not None:
            ck, cv = context_kv
            k, v = torch.cat([ck / temperature, k], dim=2), torch.cat([cv, v], dim=2)
            mask = torch.cat([torch.full((s, ck.shape[2]), math.log(context_scale)), mask], dim=-1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(x.shape))


class APEModel(nn.Module):
    def __init__(self, vocab=256, dim=32, heads=4, layers=2, max_pos=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_pos, dim)
        self.layers = nn.ModuleList(APEAttention(dim, heads) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, chunks: torch.Tensor, query: torch.Tensor, temperature: float = 0.8, context_scale: float = 0.5):
        n, length = chunks.shape
        # every chunk is encoded in parallel from the same position offset (0)
        ctx = self.embed(chunks) + self.pos(torch.arange(length))[None]
        x = self.embed(query) + self.pos(length + torch.arange(query.shape[1]))[None]
        for attn, norm in zip(self.layers, self.norms, strict=True):
            ctx_out, (ck, cv) = attn(norm(ctx))
            # all chunks' keys/values side by side for the query
            ck = ck.permute(1, 0, 2, 3).reshape(1, ck.shape[1], -1, ck.shape[-1])
            cv = cv.permute(1, 0, 2, 3).reshape(1, cv.shape[1], -1, cv.shape[-1])
            y, _ = attn(norm(x), (ck, cv), temperature, context_scale)
            ctx, x = ctx + ctx_out, x + y
        return self.head(x)


def _ape() -> Workload:
    torch.manual_seed(0)
    model = APEModel().eval()
    g = torch.Generator().manual_seed(0)
    chunks = torch.randint(0, 256, (3, 12), generator=g)
    query = torch.randint(0, 256, (1, 6), generator=g)
    return Workload(model=model, inputs=(chunks, query), name="zoo:ape-attention",
                    description="3 context chunks of 12 tokens, 6 query tokens")


_BUILDERS = {"music-transformer": _music, "ternary-llama": _ternary, "unet3d": _unet, "ape-attention": _ape}


def build_ape_sdpa() -> Workload:
    """zoo:ape-attention with its attention as ``scaled_dot_product_attention`` (same numbers, one op per call)."""
    workload = _ape()
    for layer in workload.model.layers:
        layer.sdpa = True
    workload.name, workload.description = "ape-attention (SDPA)", "APE attention, SDPA calls"
    return workload


def build(name: str) -> Workload:
    return _BUILDERS[name]()
