"""
The unified MLLM's depth heads (design §5): a small causal transformer over the depth axis of one image
position (RQ-Transformer / VILA-U style) that predicts the residual quantizer's codes coarse to fine. Depth 1
reads the LLM's hidden state through a 2-layer MLP; depth d > 1 reads the running sum of the codebook vectors
chosen at depths < d; one classifier per depth. Sampling runs one pass per depth over a KV cache (step).
"""
import torch
import torch.nn as nn

from llm import Block, KVCache, Linear, RMSNorm


def mlp2(n_in, n_hidden, n_out):
    """The paper's 2-layer projector (Linear, GELU, Linear)."""
    return nn.Sequential(Linear(n_in, n_hidden), nn.GELU(), Linear(n_hidden, n_out))


def code_vectors(book, codes):
    """book (D, K, d), codes (N, D) -> the codebook vector of every depth (N, D, d)."""
    return book[torch.arange(codes.shape[1], device=codes.device)[None], codes]


class DepthHead(nn.Module):
    """Causal transformer over the depth axis of one position (RQ-Transformer / VILA-U style)."""

    def __init__(self, cfg, K, d, D):
        super().__init__()
        self.code_logits = cfg.head_code_logits
        Ch = cfg.head_n_embd or cfg.n_embd
        nh = cfg.head_n_head or cfg.n_head
        if Ch % nh:
            raise ValueError(f"head_n_embd {Ch} is not divisible by head_n_head {nh}")
        self.proj = mlp2(cfg.n_embd, Ch, Ch)  # LLM hidden state -> depth 1
        self.code_in = Linear(d, Ch)  # partial sum of code vectors -> depth d > 1
        self.pos = nn.Parameter(torch.randn(D, Ch) * 0.02)
        self.blocks = nn.ModuleList(Block(Ch, nh, nh, Ch // nh, 4 * Ch, cfg.rms_norm_eps)
                                    for _ in range(cfg.head_n_layer))
        self.norm = RMSNorm(Ch, cfg.rms_norm_eps)
        self.cls = nn.ModuleList(Linear(Ch, K, bias=False) for _ in range(D))
        self.to_code = nn.ModuleList(Linear(Ch, d, bias=False) for _ in range(D)) if self.code_logits else None
        self.log_scale = nn.Parameter(torch.zeros(D)) if self.code_logits else None

    def classify(self, x, i, book):
        """x (M, Ch) at depth i -> logits (M, K): a free linear classifier, plus with code_logits the
        negative squared distance of a predicted code-space vector z to book[i]'s codes, scaled. The free
        part keeps a multimodal choice possible (a distance to one z alone is unimodal: under doubt z drifts
        to the mean of the candidates and the nearest code to that mean can be anything: measured with the
        distance term alone, 5.7 false objects per generated image, docs/experiments.md run p4)."""
        logits = self.cls[i](x)
        if not self.code_logits:
            return logits
        z = self.to_code[i](x).float()  # (M, d)
        c = book[i].float()  # (K, d)
        return logits.float() + self.log_scale[i].exp() * (2 * z @ c.t() - c.pow(2).sum(-1))  # -|z-c|^2 + |z|^2

    def forward(self, h, cum, last_only=False, book=None):
        """h (M, C) hidden states, cum (M, n, d) partial sums for depths 1..n -> logits of depths
        1..n+1 (M, n+1, K), or only depth n+1 (M, K) when sampling. book (D, K, d): the codebooks (needed
        with code_logits)."""
        n = cum.shape[1]
        x = torch.cat([self.proj(h)[:, None], self.code_in(cum)], 1) + self.pos[:n + 1]  # (M, n+1, Ch)
        for blk in self.blocks:
            x = blk(x, None, "causal" if n else None)
        x = self.norm(x)
        if last_only:
            return self.classify(x[:, n], n, book)  # (M, K)
        return torch.stack([self.classify(x[:, i], i, book) for i in range(n + 1)], 1)  # (M, n+1, K)

    def new_cache(self, M, device, dtype):
        """A KV cache over the D depths of M positions (sampling: one head pass per depth)."""
        blk = self.blocks[0].attn if len(self.blocks) else None
        nh, hd = (blk.nh, blk.hd) if blk is not None else (1, 1)
        return KVCache(len(self.blocks), M, nh, self.pos.shape[0], hd, device, dtype)

    def step(self, x_in, d, cache, book=None):
        """Depth d of the sampling loop: x_in (M, Ch), this depth's input before its depth embedding (proj(h)
        at d = 0, code_in(partial sum of depths < d) after) -> logits (M, K). The keys and values of depths
        < d come from `cache`; attending to all of them is the causal mask of forward."""
        x = (x_in + self.pos[d])[:, None]  # (M, 1, Ch)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None, None, cache, i)
        cache.len += 1
        return self.classify(self.norm(x)[:, 0], d, book)
