"""
The DualToken image tokenizer: one SigLIP vision tower, two residual-VQ vocabularies.

    images (B,3,R,R) -> SigLIP blocks 1..layer_sem
        h[layer_recon] (+ w * h[layer_shortcut]) -> PreQuantPix -> pixel RVQ -> pixel codes
            -> PostQuantPix -> resize -> PostQuantResBlock -> conv decoder -> images
        h[layer_sem] -> PreQuantSem -> semantic RVQ -> semantic codes
            -> PostQuantSem -> (replaces the hidden state) blocks layer_sem+1.. -> post LN + MAP head -> pooled

Faithful to the authors' released checkpoint (design §1); the module
names below mirror their state_dict so the weight-loading table stays short and obvious.
`DualToken.from_pretrained` loads our folders and the authors' release (authors.py; `python convert.py CKPT
OUT_DIR` writes it in our layout once).
"""
import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import authors
import train_utils as tu
from configurator import UserError
from folders import model_kind
from rvq import ResidualVQ
from siglip import SigLIP, SigLIPConfig

# -----------------------------------------------------------------------------
# config


@dataclass
class QuantizerConfig:
    codebook_size: int = 16384
    code_dim: int = 32
    depth: int = 8
    shared_codebook: bool = True  # released: one book for every depth; False: a book per depth (not released)
    decay: float = 0.99  # the codebooks' EMA
    restart_unused: bool = True
    # released code: pixel book updated after every depth ("rq"), semantic once after all depths ("rq_ema")
    ema_update: str = "per_depth"


@dataclass
class DecoderConfig:
    """taming / RQ-VAE conv decoder; ch_mult is listed from high to low resolution, as in taming."""
    ch: int = 128
    ch_mult: tuple = (1, 1, 4, 4, 8)  # the latent grid is resolution / 2^(len - 1)
    num_res_blocks: int = 2  # each level has num_res_blocks + 1 ResBlocks
    attn_resolutions: tuple = (24,)  # the levels (in px) with self-attention: the latent grid of a 384 px tower
    latent_channels: int = 1024  # authors' "decoder_in_channels": output width of the post-quant ResBlock
    out_ch: int = 3
    resolution: int = 384
    dropout: float = 0.0
    # not in the release (0 there): hidden width of a per-cell MLP whose output, unpatchified, is added to
    # the decoder's output (each latent cell paints its own 2^(levels-1)-pixel square patch); see Decoder
    patch_skip: int = 0


@dataclass
class DualTokenConfig:
    siglip: SigLIPConfig = None
    layer_recon: int = 6          # 1-based block index feeding the pixel branch; 0 (not in the release): the
                                  # patch embedding before positions, so each token sees only its own patch
    layer_shortcut: Optional[int] = 4  # None disables the shortcut (the paper does not mention it)
    weight_shortcut: float = 0.6
    layer_sem: int = 26           # 1-based block index feeding the semantic branch
    vq_pix: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(ema_update="per_depth"))
    vq_sem: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(ema_update="deferred"))
    decoder_latent_shape: Optional[tuple] = (24, 24)  # pixel grid is resized to this before the decoder
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # the paper's ablation (design §9, ablation.py); the defaults are the released model
    semantic_branch: bool = True  # False: pixel branch only, no semantic modules (recon-only runs (b), (c))
    tie_branches: bool = False    # True: ONE pixel quantizer at layer_recon == layer_sem whose output is both
                                  # decoded and re-enters the tower (VILA-U-like run (a)): no prequant_sem /
                                  # quantizer_sem; postquant_sem reads the pixel codes
    # not in the release (True there): False drops the attention path of the pixel branch's pre- and
    # post-quant projections, so with layer_recon=0 a pixel code stack is a function of its own patch only
    # (a flat background gets one stack per colour; an object's codes do not depend on the rest of the
    # image), which makes the codes far easier for an autoregressive model to predict
    pix_attn: bool = True

    def __post_init__(self):
        if self.siglip is None:  # a trainer's config, completed from its teacher's tower (train_tokenizer.build)
            return
        v = self.siglip.vision
        L, D = v.num_hidden_layers, v.hidden_size
        if not 0 <= self.layer_recon <= self.layer_sem <= L:
            raise UserError(f"need 0 <= layer_recon ({self.layer_recon}) <= layer_sem ({self.layer_sem}) "
                            f"<= num_hidden_layers ({L})")
        if self.tie_branches and not (self.semantic_branch and self.layer_recon == self.layer_sem):
            raise UserError(f"tie_branches=True needs semantic_branch=True and layer_recon == layer_sem, got "
                            f"semantic_branch={self.semantic_branch}, layer_recon={self.layer_recon}, "
                            f"layer_sem={self.layer_sem}")
        if self.layer_shortcut is not None and not 1 <= self.layer_shortcut <= self.layer_sem:
            raise UserError(f"layer_shortcut ({self.layer_shortcut}) must be in 1..layer_sem ({self.layer_sem})")
        for name, q in (("vq_pix", self.vq_pix), ("vq_sem", self.vq_sem)):
            if D % q.code_dim:
                raise UserError(f"{name}.code_dim ({q.code_dim}) must divide the SigLIP width ({D})")
        d = self.decoder
        if d.resolution != v.image_size:
            raise UserError(f"decoder.resolution ({d.resolution}) != SigLIP image_size ({v.image_size})")
        lat = d.resolution // 2 ** (len(d.ch_mult) - 1)
        shape = tuple(self.decoder_latent_shape or (self.grid, self.grid))  # None: the code grid, unresized
        if shape != (lat, lat):
            raise UserError(f"decoder_latent_shape {self.decoder_latent_shape} (grid {self.grid}) != decoder "
                            f"input grid ({lat}, {lat}) implied by resolution {d.resolution}, ch_mult {d.ch_mult}")

    @property
    def grid(self):
        v = self.siglip.vision
        return v.image_size // v.patch_size

    def to_dict(self):
        """config_to_dict(self): what mllm.tokenizer_hash reads without importing this file."""
        return config_to_dict(self)


def config_to_dict(cfg):
    """Our own config.json layout: the DualToken fields plus the SigLIP config in HF form."""
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "siglip"}
    d = json.loads(json.dumps(d, default=lambda o: dataclasses.asdict(o)))
    return {"format": "nano-dualtoken", "dualtoken": d, "siglip": cfg.siglip.to_hf()}


def _dataclass(klass, d, where, tuples=()):
    valid = {f.name for f in dataclasses.fields(klass)}
    if set(d) - valid:
        raise ValueError(f"unknown key(s) {sorted(set(d) - valid)} in {where}; valid: {sorted(valid)}")
    return klass(**{k: tuple(v) if k in tuples and v is not None else v for k, v in d.items()})


def config_from_dict(d):
    """Inverse of config_to_dict (our config.json)."""
    if d.get("format") != "nano-dualtoken":
        raise ValueError(f"not a nano-dualtoken config (format={d.get('format')!r})")
    return config_from_fields(d["dualtoken"], SigLIPConfig.from_hf(d["siglip"], where="config.json siglip"))


def config_from_fields(fields, siglip):
    """DualTokenConfig from its fields as plain dicts (our config.json's "dualtoken", or authors.config_fields)."""
    t = dict(fields, siglip=siglip)
    t["vq_pix"] = _dataclass(QuantizerConfig, t["vq_pix"], "config.json vq_pix")
    t["vq_sem"] = _dataclass(QuantizerConfig, t["vq_sem"], "config.json vq_sem")
    t["decoder"] = _dataclass(DecoderConfig, t["decoder"], "config.json decoder", ("ch_mult", "attn_resolutions"))
    return _dataclass(DualTokenConfig, t, "config.json dualtoken", ("decoder_latent_shape",))

# -----------------------------------------------------------------------------
# projections between the SigLIP width and the code width


class ProjAttention(nn.Module):
    """Attention whose output width differs from its input width (released AttentionBlock).

    heads = max(in, out) / min(in, out), head dim = min(in, out). Going down (in > out) the head outputs
    are AVERAGED into one code-width vector; going up (in < out) they are concatenated. One qkv matrix
    without bias plus learned q and v biases; the k bias is fixed at zero (a BEiT/EVA habit: a k bias only
    shifts every logit of a query equally, so softmax ignores it).
    """

    def __init__(self, d_in, d_out, causal=False):
        super().__init__()
        self.d_in, self.d_out, self.causal = d_in, d_out, causal
        self.down = d_in > d_out
        wide = max(d_in, d_out)
        self.n_head = wide // min(d_in, d_out)
        self.qkv = nn.Linear(d_in, 3 * wide, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(wide))
        self.v_bias = nn.Parameter(torch.zeros(wide))
        self.proj = nn.Linear(d_out, d_out)

    def forward(self, x):
        B, N, _ = x.shape
        wide = self.q_bias.shape[0]
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, 3*wide)
        q, k, v = qkv.view(B, N, 3, self.n_head, wide // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, N, hd)
        if self.down:
            y = y.mean(dim=1)  # (B, N, hd = d_out)
        else:
            y = y.transpose(1, 2).reshape(B, N, wide)  # (B, N, d_out)
        return self.proj(y)


class GeGLU(nn.Module):
    """Gated MLP with its own LayerNorm (eps 1e-6, unlike the 1e-5 LayerNorms around it)."""

    def __init__(self, d, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.w0 = nn.Linear(d, hidden)
        self.w1 = nn.Linear(d, hidden)
        self.w2 = nn.Linear(hidden, d)

    def forward(self, x):
        x = self.norm(x)
        return self.w2(F.gelu(self.w0(x), approximate="tanh") * self.w1(x))


class AttnProjection(nn.Module):
    """y = Linear(LN3(x)) + Attn(LN1(x));  y = y + GeGLU(LN2(y)).  Used 5x (3 down, 2 up).

    The linear path carries the per-token content, the attention path mixes context; the GeGLU is a
    residual refinement at the output width. Note the GeGLU input is normalised twice (norm2, then its own
    norm) exactly as in the released code. Post-quant projections (up) are causal over the raster order
    so an autoregressive model's prefix of codes decodes to the same features.
    """

    def __init__(self, d_in, d_out, causal=False, attn=True):
        super().__init__()
        if max(d_in, d_out) % min(d_in, d_out):
            raise ValueError(f"AttnProjection: widths {d_in} and {d_out} must divide one another")
        # attn=False (not in the release): per-token only, no mixing across positions
        self.norm1 = nn.LayerNorm(d_in) if attn else None
        self.attn = ProjAttention(d_in, d_out, causal) if attn else None
        self.proj = nn.Linear(d_in, d_out)
        self.norm3 = nn.LayerNorm(d_in)
        self.norm2 = nn.LayerNorm(d_out)
        self.mlp = GeGLU(d_out, 2 * d_out)

    def forward(self, x):
        y = self.proj(self.norm3(x))
        if self.attn is not None:
            y = y + self.attn(self.norm1(x))
        return y + self.mlp(self.norm2(y))


# -----------------------------------------------------------------------------
# conv decoder (taming-transformers / RQ-VAE layout and names)


def GroupNorm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, dropout=0.0, k1=3):
        super().__init__()
        self.norm1 = GroupNorm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, k1, padding=k1 // 2)
        self.norm2 = GroupNorm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


def PostQuantResBlock(c_in, c_out, dropout=0.0):
    """The released bridge from the SigLIP width to the decoder width: a ResBlock whose first conv is 1x1."""
    return ResBlock(c_in, c_out, dropout, k1=1)


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, 1x1-conv q/k/v/out, residual."""

    def __init__(self, c):
        super().__init__()
        self.norm = GroupNorm(c)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """conv_in -> mid (Res, Attn, Res) -> up levels from low to high resolution -> GN, SiLU, conv_out.

    `up[i]` is level i counted from the HIGHEST resolution (taming's indexing, which the checkpoint keys
    use), so the forward walks `up` backwards. Level i>0 ends with a x2 upsample. No tanh at the end.

    patch_skip > 0 (0 in the release) adds a per-cell MLP of the latent (1x1 conv, GELU, 1x1 conv of that
    hidden width), pixel-shuffled so that each latent cell paints its own f x f patch (f = 2^(levels-1)),
    to the conv stack's output. Why: a small conv stack learns slowly to carry colour and shape through
    three nearest-neighbour upsamplings, while a per-patch MLP on the same features draws flat shapes
    almost at once (a probe: an MLP from the frozen block-1 features to each 8x8 patch, 29 dB in seconds).
    Measured on the shapes preset (48 px, 450 steps, pixel depth 6, one run each): 25.9 dB without the
    skip (an earlier run), 27.5 with a linear one (a single 1x1 conv), 28.0 with the MLP (hidden 256), at no measurable cost
    in speed. The convs then mostly mend the patch borders.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(c, c, cfg.dropout)
        self.mid.attn_1 = AttnBlock(c)
        self.mid.block_2 = ResBlock(c, c, cfg.dropout)
        up = []
        for i in reversed(range(n)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            c_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResBlock(c, c_out, cfg.dropout))
                c = c_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(c))
            if i != 0:
                level.upsample = Upsample(c)
                res *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = GroupNorm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)
        self.f = 2 ** (n - 1)
        self.patch_skip = nn.Sequential(nn.Conv2d(cfg.latent_channels, cfg.patch_skip, 1), nn.GELU(),
                                        nn.Conv2d(cfg.patch_skip, cfg.out_ch * self.f ** 2, 1)) \
            if cfg.patch_skip > 0 else None

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.patch_skip is not None:
            out = out + F.pixel_shuffle(self.patch_skip(z), self.f)  # (B, 3*f*f, h, w) -> (B, 3, f*h, f*w)
        return out

# -----------------------------------------------------------------------------
# the tokenizer


class DualTokenOutput(NamedTuple):
    recon: torch.Tensor        # (B, 3, R, R) decoded pixel codes, about [-1, 1], unclamped
    pooled: torch.Tensor       # (B, D) MAP-head embedding through the quantized semantic path (or None*)
    zq_sem: torch.Tensor       # (B, N, D) post-quant semantic features (replace block layer_sem's output) (None*)
    h_sem: torch.Tensor        # (B, N, D) block layer_sem output (the semantic branch input) (None*)
    zq_pix: torch.Tensor       # (B, N, c) quantized pixel latent (straight-through)
    pix_codes: torch.Tensor    # (B, h, w, depth) int64
    sem_codes: torch.Tensor    # (B, h, w, depth) int64 (None*; the pixel codes when tie_branches)
    commit_pix: torch.Tensor   # () commitment loss of the pixel RVQ
    commit_sem: torch.Tensor   # () commitment loss of the semantic RVQ
    stats: dict                # {"pix": {...}, "sem": {...}} usage / perplexity per depth (rvq.code_stats)
    # * None when config.semantic_branch is False (the recon-only ablations); commit_sem is then 0


def _rvq(q: QuantizerConfig):
    return ResidualVQ(dim=q.code_dim, codebook_size=q.codebook_size, depth=q.depth,
                      shared_codebook=q.shared_codebook, decay=q.decay, restart_unused=q.restart_unused,
                      ema_update=q.ema_update)


class DualToken(nn.Module):

    def __init__(self, config: DualTokenConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.siglip.vision.hidden_size
        self.siglip = SigLIP(cfg.siglip)  # both towers; the text tower is only used for zero-shot scoring
        self.prequant_pix = AttnProjection(D, cfg.vq_pix.code_dim, attn=cfg.pix_attn)
        self.prequant_shortcut = AttnProjection(D, cfg.vq_pix.code_dim) if cfg.layer_shortcut is not None else None
        own_sem = cfg.semantic_branch and not cfg.tie_branches  # a semantic quantizer of its own (released)
        self.prequant_sem = AttnProjection(D, cfg.vq_sem.code_dim) if own_sem else None
        self.quantizer_pix = _rvq(cfg.vq_pix)
        self.quantizer_sem = _rvq(cfg.vq_sem) if own_sem else None
        self.postquant_pix = AttnProjection(cfg.vq_pix.code_dim, D, causal=True, attn=cfg.pix_attn)
        c_sem = cfg.vq_pix.code_dim if cfg.tie_branches else cfg.vq_sem.code_dim
        self.postquant_sem = AttnProjection(c_sem, D, causal=True) if cfg.semantic_branch else None
        self.post_quant_conv = PostQuantResBlock(D, cfg.decoder.latent_channels)
        self.decoder = Decoder(cfg.decoder)

    # ---------------------------------------------------------------- pieces

    def check_images(self, images):
        R = self.config.siglip.vision.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, R, R):
            raise ValueError(f"images: expected (B, 3, {R}, {R}) in [-1, 1], got {tuple(images.shape)}")

    def _grid(self, x):
        """(B, N, C) -> (B, h, w, C) raster grid."""
        B, N, C = x.shape
        g = self.config.grid
        if N != g * g:
            raise ValueError(f"expected {g * g} tokens, got {tuple(x.shape)}")
        return x.view(B, g, g, C)

    def encode_latents(self, images):
        """Blocks 1..layer_sem -> (latent_pix, latent_sem, h_sem); latents are (B, h, w, c) quantizer inputs.
        Without a semantic quantizer of its own latent_sem is None (and h_sem too without a semantic branch:
        then only the blocks the pixel branch reads run)."""
        self.check_images(images)
        cfg, vis = self.config, self.siglip.vision
        h = vis.embed(images)  # (B, N, D)
        kept = {0: vis.patchify(images)[0]} if cfg.layer_recon == 0 else {}  # layer 0: patches, no positions
        stops = {cfg.layer_recon} | ({cfg.layer_shortcut} - {None}) | ({cfg.layer_sem} if cfg.semantic_branch else set())
        stops = sorted(stops - {0})
        start = 0
        for stop in stops:  # run the blocks in segments, keeping the outputs the branches need
            h = vis.run_blocks(h, start, stop)
            kept[stop], start = h, stop
        p = self.prequant_pix(kept[cfg.layer_recon])  # (B, N, c)
        if self.prequant_shortcut is not None:  # released code only: 0.6 x a projection of block 4
            p = p + cfg.weight_shortcut * self.prequant_shortcut(kept[cfg.layer_shortcut])
        h_sem = kept.get(cfg.layer_sem)
        latent_sem = self._grid(self.prequant_sem(h_sem)) if self.prequant_sem is not None else None
        return self._grid(p), latent_sem, h_sem

    def _quantize_sem(self, latent_pix, latent_sem, pix_out=None):
        """-> (zq_sem32, sem_codes, commit_sem) of the semantic code stack. Tied (run (a)): the pixel
        quantizer's output IS the semantic stack (pass pix_out to reuse a pass already made); its commitment
        is counted once, as commit_pix, so commit_sem is 0."""
        if self.quantizer_sem is not None:
            return self.quantizer_sem(latent_sem)
        if not self.config.tie_branches:
            raise ValueError("this tokenizer has no semantic branch (semantic_branch=False): no semantic codes")
        zq, codes, commit = pix_out if pix_out is not None else self.quantizer_pix(latent_pix)
        return zq, codes, torch.zeros_like(commit)

    def _semantic_tail(self, zq_sem32):
        """(B, h, w, c) quantized semantic latent -> (zq_sem (B, N, D), pooled (B, D)): PostQuantSem, then
        the remaining SigLIP blocks and the MAP head run on it instead of block layer_sem's output."""
        B = zq_sem32.shape[0]
        zq_sem = self.postquant_sem(zq_sem32.reshape(B, -1, zq_sem32.shape[-1]))  # (B, N, D)
        vis = self.siglip.vision
        h = vis.run_blocks(zq_sem, self.config.layer_sem, len(vis.blocks))
        return zq_sem, vis.pool(h)

    def decoder_input(self, zq_pix):
        """(B, N, c) or (B, h, w, c) quantized pixel latent -> (B, latent_channels, H', W') decoder input."""
        B, c = zq_pix.shape[0], zq_pix.shape[-1]
        x = self.postquant_pix(zq_pix.reshape(B, -1, c))  # (B, N, D)
        g = self.config.grid
        x = x.view(B, g, g, -1).permute(0, 3, 1, 2)  # (B, D, h, w)
        if self.config.decoder_latent_shape is not None:
            # 27x27 -> 24x24 at 384 px: the decoder upsamples by 2^4 and 27 * 16 != 384
            x = F.interpolate(x, size=tuple(self.config.decoder_latent_shape), mode="bilinear")
        return self.post_quant_conv(x)

    def decode_latent(self, zq_pix):
        return self.decoder(self.decoder_input(zq_pix))

    # ---------------------------------------------------------------- public API

    def forward(self, images):
        """Without a semantic branch pooled / zq_sem / sem_codes are None and commit_sem is 0; tied, the
        semantic codes are the pixel codes. stats has one entry per quantizer that exists."""
        latent_pix, latent_sem, h_sem = self.encode_latents(images)
        pix_out = self.quantizer_pix(latent_pix)
        zq_pix, pix_codes, commit_pix = pix_out  # (B, h, w, c), (B, h, w, L), ()
        zq_sem = pooled = sem_codes = None
        commit_sem = torch.zeros_like(commit_pix)
        if self.config.semantic_branch:
            zq_sem32, sem_codes, commit_sem = self._quantize_sem(latent_pix, latent_sem, pix_out)
            zq_sem, pooled = self._semantic_tail(zq_sem32)
        recon = self.decode_latent(zq_pix)
        B = images.shape[0]
        stats = {"pix": self.quantizer_pix.last_stats}
        if self.quantizer_sem is not None:
            stats["sem"] = self.quantizer_sem.last_stats
        return DualTokenOutput(recon, pooled, zq_sem, h_sem, zq_pix.reshape(B, -1, zq_pix.shape[-1]),
                               pix_codes, sem_codes, commit_pix, commit_sem, stats)

    @contextlib.contextmanager
    def _books_frozen(self):
        """Quantizers in eval mode for the duration: encoding must never move the EMA codebooks, even when
        a training loop calls it on a model in train mode."""
        qs = [q for q in (self.quantizer_pix, self.quantizer_sem) if q is not None]
        modes = [q.training for q in qs]
        for q in qs:
            q.eval()
        try:
            yield
        finally:
            for q, m in zip(qs, modes):
                q.train(m)

    @torch.no_grad()
    def encode(self, images):
        """images (B, 3, R, R) in [-1, 1] -> (pix_codes, sem_codes), each (B, h, w, depth) int64.
        Only blocks 1..layer_sem run. sem_codes is None without a semantic branch, pix_codes when tied.
        Precision: ONE for every caller: autocast off and the images cast to the weights' dtype (fp32, as
        every script loads the tokenizer). This is the only function that makes codes for the MLLM (the
        code cache, eval.py, sample.py; codec.image_codes flattens them): under bf16 autocast the deep
        residual codes come out different, and the model would be evaluated on codes it never trained on."""
        with torch.autocast(images.device.type, enabled=False):
            return self._encode(images.to(next(self.parameters()).dtype))

    def _encode(self, images):
        latent_pix, latent_sem, _ = self.encode_latents(images)
        with self._books_frozen():
            pix_out = self.quantizer_pix(latent_pix)
            if not self.config.semantic_branch:
                return pix_out[1], None
            return pix_out[1], self._quantize_sem(latent_pix, latent_sem, pix_out)[1]

    def decode(self, pix_codes):
        """pix_codes (B, h, w, depth) -> images (B, 3, R, R), about [-1, 1], not clamped."""
        g, L = self.config.grid, self.config.vq_pix.depth
        if pix_codes.ndim != 4 or tuple(pix_codes.shape[1:]) != (g, g, L):
            raise ValueError(f"pix_codes: expected (B, {g}, {g}, {L}), got {tuple(pix_codes.shape)}")
        return self.decode_latent(self.quantizer_pix.embed(pix_codes))

    def encode_image(self, images):
        """Pooled semantic embedding (B, D) through the QUANTIZED path (what zero-shot scoring uses);
        not normalised, like SigLIP's own image embedding."""
        if not self.config.semantic_branch:
            raise ValueError("encode_image: this tokenizer has no semantic branch (semantic_branch=False)")
        latent_pix, latent_sem, _ = self.encode_latents(images)
        with self._books_frozen():
            zq = self._quantize_sem(latent_pix, latent_sem)[0]
        return self._semantic_tail(zq)[1]

    def encode_text(self, input_ids):
        return self.siglip.encode_text(input_ids)

    # ---------------------------------------------------------------- weights

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, siglip_config=None):
        """Load a tokenizer folder (or its weights file with config.json beside it), the format detected by its
        config.json: ours (written by save_pretrained) or the authors' release (design §1; translated by
        authors.py in memory; siglip_config: a SigLIP folder or config.json when the tower path their
        config.json records is not on this machine). Memory: the model is built on the meta device (no
        allocation, no random init), safetensors are read lazily (their `.pt` with mmap), and every tensor is
        ASSIGNED, not copied, so the weights live once (fused q/k/v and dtype casts are the new tensors)."""
        folder, weights = checkpoint_files(path)
        with open(os.path.join(folder, "config.json")) as f:
            raw = json.load(f)
        if authors.is_theirs(raw):
            sd = read_weights(weights)
            sig = authors.siglip_config(raw, folder, siglip_config, with_text=authors.has_text(sd))
            with torch.device("meta"):
                model = cls(config_from_fields(authors.config_fields(raw, sig), sig))
            model.load_weights(authors.state_dict_from_authors(model, sd), dtype)
            return model.eval()
        if raw.get("format") != "nano-dualtoken":
            raise UserError(f"{path!r} is {model_kind(raw)}: a DualToken tokenizer folder is needed here")
        with torch.device("meta"):
            model = cls(config_from_dict(raw))
        model.load_weights(read_weights(weights), dtype)
        return model.eval()

    def load_weights(self, sd, dtype=None):
        """Strict assign of a state_dict in our names into this (possibly meta) model; floating-point
        tensors cast to dtype when given."""
        if dtype is not None:
            sd = {k: x.to(dtype) if x.is_floating_point() else x for k, x in sd.items()}
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
               for k, v in own.items() if k in sd and sd[k].shape != v.shape]
        if missing or unexpected or bad:
            raise UserError(f"DualToken weights do not match the model: missing {missing}, "
                            f"unexpected {unexpected}, wrong shape {bad}")
        self.load_state_dict(sd, strict=True, assign=True)
        left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:  # a non-persistent buffer would stay on meta: it must be rebuilt, not loaded
            raise ValueError(f"tensors not materialised by the checkpoint: {left}")

    def save_pretrained(self, folder):
        """config.json (our layout) + model.safetensors (our names; a shared codebook is one (1, K, c) tensor),
        each written atomically: a crash mid-save leaves the previous export intact (train_tokenizer.py
        exports here at every checkpoint)."""
        tu.write_json(config_to_dict(self.config), os.path.join(folder, "config.json"))
        tu.atomic_save_safetensors(self.state_dict(), os.path.join(folder, "model.safetensors"), {"format": "pt"})

    @classmethod
    def from_siglip(cls, path, **overrides):
        """New tokenizer on any HF-format SigLIP folder, as the paper starts. Returns (tokenizer, teacher):
        the teacher is a separate frozen SigLIP in eval mode (the distillation target of design §3 section 2),
        kept out of the tokenizer so its state_dict, parameters and optimizer never see it.
        overrides: DualTokenConfig fields (e.g. vq_pix=QuantizerConfig(depth=4), layer_sem=26)."""
        teacher = SigLIP.from_pretrained(path).eval().requires_grad_(False)
        model = cls(default_config(teacher.config, **overrides))
        model.siglip.load_state_dict(teacher.state_dict())
        return model, teacher


@torch.no_grad()
def teacher_features(teacher, images, layer_sem):
    """Distillation targets of design §3 from the frozen original SigLIP: (T_sem (B, N, D) = output
    of block layer_sem, T_pool (B, D) = its pooled embedding after all blocks)."""
    vis = teacher.vision
    h = vis.run_blocks(vis.embed(images), 0, layer_sem)
    return h, vis.pool(vis.run_blocks(h, layer_sem, None))


def checkpoint_files(path):
    """-> (folder holding config.json, weights file)."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"tokenizer folder {path!r} has no config.json")
        for name in ("model.safetensors", "model.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return path, os.path.join(path, name)
        raise UserError(f"tokenizer folder {path!r} holds neither model.safetensors nor model.pt")
    if not os.path.isfile(path):
        raise UserError(f"tokenizer checkpoint {path!r} does not exist")
    if not path.endswith((".safetensors", ".pt", ".pth", ".bin")):
        raise UserError(f"tokenizer {path!r}: expected its folder or the weights file (.safetensors / .pt), "
                        f"not {os.path.basename(path)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"no config.json next to {path!r}")
    return folder, path


def read_weights(path):
    """The state_dict in `path` (safetensors, or the authors' `.pt`), `_orig_mod.` / `module.` prefixes stripped."""
    try:
        sd = _read_weights_unchecked(path)
    except UserError:
        raise
    except Exception as e:  # truncated / damaged: zip, pickle, safetensors header errors that do not name the file
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); it is damaged or not a checkpoint") from None
    return {k.split("_orig_mod.")[-1].removeprefix("module."): x for k, x in sd.items()}


def _read_weights_unchecked(path):
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("shared_codebook_aliases", "{}"))
        for dropped, kept in aliases.items():  # safetensors cannot hold aliased tensors: restore them
            if kept not in sd:
                raise UserError(f"{path}: alias {dropped!r} -> {kept!r}, but {kept!r} is not in the file")
            sd[dropped] = sd[kept]
        return sd
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path}: expected the authors' {{'state_dict': ...}} checkpoint, got "
                        f"{sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__}")
    return ckpt["state_dict"]

# -----------------------------------------------------------------------------
# presets


def default_config(siglip_config, **overrides):
    """DualTokenConfig for a SigLIP tower with the released choices, resolution-dependent parts derived:
    decoder latent = R/16 (5 levels, attention at the latent grid), layers 6 / 4 (x0.6) / L-1."""
    v = siglip_config.vision
    lat = v.image_size // 16
    kw = dict(siglip=siglip_config, layer_recon=6, layer_shortcut=4, weight_shortcut=0.6,
              layer_sem=v.num_hidden_layers - 1, decoder_latent_shape=(lat, lat),
              decoder=DecoderConfig(resolution=v.image_size, attn_resolutions=(lat,)))
    kw.update(overrides)
    return DualTokenConfig(**kw)


def tiny_config():
    """The reference fixture's shapes: 32 px, patch 8 (4x4 grid), width 64, 6 blocks, codes 16-d x depth 3."""
    import siglip
    s = siglip.tiny_config()
    s.vision.num_hidden_layers = 6
    q = dict(codebook_size=32, code_dim=16, depth=3, shared_codebook=True)
    return DualTokenConfig(siglip=s, layer_recon=2, layer_shortcut=1, weight_shortcut=0.6, layer_sem=5,
                           vq_pix=QuantizerConfig(**q, ema_update="per_depth"),
                           vq_sem=QuantizerConfig(**q, ema_update="deferred"), decoder_latent_shape=(4, 4),
                           decoder=DecoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1,
                                                 attn_resolutions=(4,), latent_channels=32, resolution=32))

