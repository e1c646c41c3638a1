"""
The decoder-only LLM's pieces, laid out as Qwen2 / LLaMA (so mllm_hf.py's name table stays one line per
tensor): RMSNorm, RoPE (with LLaMA 3.1's llama3 scaling), a KV cache, grouped-query attention, the SwiGLU
MLP, the pre-norm block, and the top-k / top-p sampler. mllm.py builds its trunk and depth transformers here.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Normalised in fp32 and cast back before the weight, like the HF Qwen2 / LLaMA reference."""

    def __init__(self, n, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def rope_inv_freq(cfg):
    """Inverse RoPE frequencies; llama3 scaling divides the long wavelengths by `factor` and blends the
    middle band (LLaMA 3.1's recipe; HF `_compute_llama3_parameters`)."""
    hd = cfg.head_dim or cfg.n_embd // cfg.n_head
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    rs = cfg.rope_scaling
    kind = None if rs is None else rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return inv
    if kind != "llama3":
        raise ValueError(f"rope_scaling: unsupported rope type {kind!r} (supported: default, llama3)")
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(mid, (1 - smooth) * out / factor + smooth * out, out)


def apply_rope(x, cos, sin):
    """HF's half-split rotation (not interleaved pairs): the layout the released checkpoints expect."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys/values for all layers; `valid` remembers which slots are padding so that a
    left-padded batch can keep decoding, `next_pos` is each row's next RoPE position. Two ways to fill it:
    `len` slots so far, each call appending T and attending over those (prefill, mllm.py's loops), or after
    make_static one token per call at the slot `at`, a tensor, attending over every slot with the ones not yet
    written hidden by `valid`: no shape or Python number changes from step to step, which is what lets
    torch.compile trace the step once (decode.py)."""

    def __init__(self, n_layer, B, n_kv, max_len, hd, device, dtype):
        self.k = torch.zeros(n_layer, B, n_kv, max_len, hd, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(B, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=device)
        self.len = 0
        self.at = None

    def make_static(self):
        self.at = torch.tensor([self.len], device=self.k.device)  # (1,) the next slot

    def update(self, layer, k, v):
        if self.at is not None:  # one token (B, nkv, 1, hd) written in place; the caller masks by `valid`
            self.k[layer].index_copy_(2, self.at, k)
            self.v[layer].index_copy_(2, self.at, v)
            return self.k[layer], self.v[layer]
        L0, T = self.len, k.shape[2]
        if L0 + T > self.k.shape[3]:
            raise ValueError(f"KV cache full: {L0} + {T} > {self.k.shape[3]} slots")
        self.k[layer, :, :, L0:L0 + T] = k
        self.v[layer, :, :, L0:L0 + T] = v
        return self.k[layer, :, :, :L0 + T], self.v[layer, :, :, :L0 + T]


SMALL_ROWS = 4  # at most this many rows: a compiled product on a CPU is written as a reduction (Linear)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose product over at most SMALL_ROWS rows, when torch.compile traces
    it for a CPU without autocast, is written as a multiply and a sum over the input features. Inductor fuses
    that into one loop over the weight: a decode step (2 rows with CFG) then streams each weight 1.7-4.7x faster
    than MKL's GEMM does on so few rows, and such a step is bound by reading weights (docs/experiments.md,
    "drawing and training speed"). Eager, other shapes, devices and autocast: F.linear. The two round
    differently. Traced but run op by op (dynamo's "eager" backend, a debugging path) the product holds a
    (rows, out, in) temporary."""

    def forward(self, x):
        if (torch.compiler.is_compiling() and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
                and x.numel() <= SMALL_ROWS * x.shape[-1]):
            y = (x.unsqueeze(-2) * self.weight).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, C, nh, nkv, hd, qkv_bias, o_bias):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = Linear(C, nh * hd, bias=qkv_bias)
        self.k_proj = Linear(C, nkv * hd, bias=qkv_bias)
        self.v_proj = Linear(C, nkv * hd, bias=qkv_bias)
        self.o_proj = Linear(nh * hd, C, bias=o_bias)

    def forward(self, x, rope, mask, cache=None, layer=0):
        """mask: "causal", None (attend to everything given) or a bool (B, 1, T, L) tensor."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, L, hd)
        causal = isinstance(mask, str)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                           enable_gqa=self.nkv != self.nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, C, H, bias):
        super().__init__()
        self.gate_proj = Linear(C, H, bias=bias)
        self.up_proj = Linear(C, H, bias=bias)
        self.down_proj = Linear(H, C, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, C, nh, nkv, hd, H, eps, qkv_bias=False, o_bias=False, mlp_bias=False):
        super().__init__()
        self.ln1 = RMSNorm(C, eps)
        self.attn = Attention(C, nh, nkv, hd, qkv_bias, o_bias)
        self.ln2 = RMSNorm(C, eps)
        self.mlp = MLP(C, H, mlp_bias)

    def forward(self, x, rope, mask, cache=None, layer=0):
        x = x + self.attn(self.ln1(x), rope, mask, cache, layer)
        return x + self.mlp(self.ln2(x))


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None, noise=None):
    """(B, V) logits -> (B,) ids. temperature 0 = greedy; top_k / top_p as in VILA-U's sampler. The draw is
    torch.multinomial's own for one sample, argmax(p / q) with q ~ Exp(1) of p's shape, written out (same ids,
    same generator use, no host read of p's range): noise (B, V) passes q in, drawn beforehand (decode.py)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        top = torch.topk(logits, min(top_k, logits.shape[-1])).values  # (B, k) sorted, descending
        logits = logits.masked_fill(logits < top[:, -1:], float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest prefix of the sorted logits whose mass reaches top_p. After top-k only its survivors
        # can be kept: topk's k, already sorted, not all V. Logits that tie with the k-th survive too (more than
        # k: bf16); their mass then counts, as in a full sort. A cut among tied logits keeps all of them (a full
        # sort kept whichever its order put first)
        if top_k is None:
            srt = torch.sort(logits, descending=True).values  # (B, V)
            p = F.softmax(srt, -1)
        else:
            srt, more = top, (logits >= top[:, -1:]).sum(-1, keepdim=True) > top.shape[-1]  # (B, 1)
            p = torch.where(more, (top - torch.logsumexp(logits, -1, keepdim=True)).exp(), F.softmax(top, -1))
        n = ((p.cumsum(-1) - p) <= top_p).sum(-1, keepdim=True)  # (B, 1) kept, >= 1
        logits = logits.masked_fill(logits < srt.gather(-1, n - 1), float("-inf"))
    p = F.softmax(logits, -1)
    q = torch.empty_like(p).exponential_(generator=generator) if noise is None else noise
    return (p / q).argmax(-1)
