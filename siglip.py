"""
SigLIP (Zhai et al. 2023) from scratch: the ViT image tower, the text tower, the pairwise sigmoid loss,
Hugging Face weight loading/saving with exact parity and zero-shot classification (image preprocessing: data.py's
transforms).

DualToken (design §1) builds its tokenizer on this vision tower and needs to stop,
tap and resume it between blocks, so SigLIPVision exposes `embed`, `run_blocks(h, start, stop)` and
`pool` besides the usual forward. The text tower is only used frozen, for zero-shot scoring.

Weights use the Hugging Face `SiglipModel` names on disk (config.json + model.safetensors), so Google's
checkpoints, the authors' DualToken checkpoint (`siglip_model.<hf name>`) and a teacher trained here all
load through one explicit, strict name table (`hf_name_table`). q/k/v are fused into one Linear here
(one matmul instead of three) and split again by name when saving.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError
from folders import model_kind

# -----------------------------------------------------------------------------
# configuration (field names are Hugging Face's, so config.json maps 1:1)

# config.json keys that say nothing about the architecture (generation/bookkeeping fields every HF
# config may carry). Anything else we do not know is an error: an unknown architecture feature must not
# load silently into a model that ignores it.
_HF_GENERIC_KEYS = {
    "_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version", "model_type",
    "initializer_factor", "initializer_range", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "use_bfloat16", "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "finetuning_task",
    "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "problem_type", "_attn_implementation_autoset", "pad_token_id",
    "bos_token_id", "eos_token_id", "text_config_dict", "vision_config_dict", "num_labels",
}
_ACTS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}  # -> F.gelu(approximate=)


@dataclass
class SigLIPVisionConfig:
    # defaults = transformers' SiglipVisionConfig, because released config.json files omit them
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True  # MAP attention-pooling head


@dataclass
class SigLIPTextConfig:
    # defaults = transformers' SiglipTextConfig
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    projection_size: Optional[int] = None  # None -> hidden_size (HF's rule)
    pad_token_id: Optional[int] = 1  # token ids are not used by the model, kept for the round trip
    bos_token_id: Optional[int] = 49406
    eos_token_id: Optional[int] = 49407

    def __post_init__(self):
        if self.projection_size is None:
            self.projection_size = self.hidden_size


@dataclass
class SigLIPConfig:
    vision: SigLIPVisionConfig = dataclasses.field(default_factory=SigLIPVisionConfig)
    text: Optional[SigLIPTextConfig] = dataclasses.field(default_factory=SigLIPTextConfig)  # None: vision-only

    @classmethod
    def from_hf(cls, d, where="config.json"):
        """Build from a Hugging Face config dict (SiglipModel or SiglipVisionModel)."""
        mt = d.get("model_type", "siglip")
        if mt == "siglip":
            vision = _sub_config(SigLIPVisionConfig, d.get("vision_config") or {}, f"{where}: vision_config")
            text = _sub_config(SigLIPTextConfig, d.get("text_config") or {}, f"{where}: text_config")
            _sub_config(None, {k: v for k, v in d.items() if k not in ("vision_config", "text_config")}, where)
            return cls(vision=vision, text=text)
        if mt == "siglip_vision_model":
            return cls(vision=_sub_config(SigLIPVisionConfig, d, where), text=None)
        raise ValueError(f"{where}: model_type {mt!r} is not supported (expected 'siglip' or "
                         f"'siglip_vision_model'; SigLIP2 NaFlex 'siglip2' uses a different architecture)")

    def to_hf(self):
        vision = dict(dataclasses.asdict(self.vision), model_type="siglip_vision_model")
        if self.text is None:
            return dict(vision, architectures=["SiglipVisionModel"])
        text = dict(dataclasses.asdict(self.text), model_type="siglip_text_model")
        return {"architectures": ["SiglipModel"], "model_type": "siglip", "initializer_factor": 1.0,
                "text_config": text, "vision_config": vision}


def read_config(folder):
    """The SigLIPConfig of a Hugging Face-format SigLIP folder; a folder of another kind (a DualToken tokenizer, an
    MLLM) is a UserError that says what it is."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"from_pretrained: no config.json in {folder!r}")
    with open(cfg_path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or raw.get("model_type", "siglip") not in ("siglip", "siglip_vision_model") \
            or "format" in raw or "mllm" in raw or "rqvaesiglip" in raw:
        raise UserError(f"{folder!r} is {model_kind(raw)}: a SigLIP folder is needed here")
    return SigLIPConfig.from_hf(raw, where=cfg_path)


def _sub_config(klass, d, where):
    known = {f.name for f in dataclasses.fields(klass)} if klass else set()
    unknown = sorted(k for k in d if k not in known and k not in _HF_GENERIC_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown architecture field(s) {unknown}; this SigLIP implements {sorted(known)}")
    if klass is None:
        return None
    kw = {k: v for k, v in d.items() if k in known}
    for k in ("image_size", "patch_size"):  # HF allows [h, w]; SigLIP checkpoints are square
        if isinstance(kw.get(k), (list, tuple)):
            if len(set(kw[k])) != 1:
                raise ValueError(f"{where}: non-square {k} {kw[k]} is not supported")
            kw[k] = kw[k][0]
    cfg = klass(**kw)
    if cfg.hidden_act not in _ACTS:
        raise ValueError(f"{where}: hidden_act {cfg.hidden_act!r} not supported (one of {sorted(_ACTS)})")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{where}: hidden_size {cfg.hidden_size} not divisible by "
                         f"num_attention_heads {cfg.num_attention_heads}")
    return cfg


def tiny_config(text=True):
    """A few-kilobyte SigLIP for tests: 32 px, patch 8 (4x4 grid), width 64, text width 48."""
    v = SigLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=112,
                           num_hidden_layers=4, num_attention_heads=4)
    t = SigLIPTextConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_size=64,
                         bos_token_id=None, eos_token_id=1)
    return SigLIPConfig(vision=v, text=t if text else None)

# -----------------------------------------------------------------------------
# modules


class Attention(nn.Module):
    """Bidirectional multi-head self-attention (SigLIP uses no mask in either tower)."""

    def __init__(self, d, n_head, dropout=0.0):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(d, 3 * d)  # HF q_proj, k_proj, v_proj stacked on the output dim
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, d, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.approx = nn.Linear(d, hidden), nn.Linear(hidden, d), _ACTS[act]

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approx))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.ln_1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = Attention(d, cfg.num_attention_heads, cfg.attention_dropout)
        self.ln_2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class MAPHead(nn.Module):
    """Multihead attention pooling: one learned probe attends over all tokens, then a residual MLP.
    Mirrors HF's use of nn.MultiheadAttention (fused in_proj with bias), written out with SDPA."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.probe = nn.Parameter(torch.randn(1, 1, d) * d ** -0.5)
        self.in_proj = nn.Linear(d, 3 * d)  # rows: q, k, v
        self.out_proj = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, h):
        B, T, C = h.shape
        H, hd = self.n_head, C // self.n_head
        wq, wkv = self.in_proj.weight.split([C, 2 * C])
        bq, bkv = self.in_proj.bias.split([C, 2 * C])
        q = F.linear(self.probe, wq, bq).view(1, 1, H, hd).transpose(1, 2).expand(B, H, 1, hd)  # (B, H, 1, hd)
        k, v = F.linear(h, wkv, bkv).view(B, T, 2, H, hd).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        y = self.out_proj(F.scaled_dot_product_attention(q, k, v).reshape(B, C))  # (B, C)
        return y + self.mlp(self.ln(y))


class SigLIPVision(nn.Module):
    def __init__(self, cfg: SigLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.image_size // p  # valid padding: 384 px / patch 14 -> 27 (uses 378 px)
        self.patch = nn.Conv2d(cfg.num_channels, d, kernel_size=p, stride=p)
        self.pos = nn.Parameter(torch.randn(self.grid * self.grid, d) * d ** -0.5)  # (N, D)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.post_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.head = MAPHead(cfg) if cfg.vision_use_head else None

    def pos_embed(self, gh, gw):
        """Position embedding for a gh x gw grid: the learned table, or its bicubic resize
        (align_corners=False, like HF's interpolate_pos_encoding) for any other grid."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos
        D = self.pos.shape[1]
        pos = self.pos.view(1, self.grid, self.grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(gh * gw, D)  # (gh*gw, D)

    def embed(self, pixels):
        """pixels (B, C, H, W) in [-1, 1] -> patch tokens + position embedding (B, N, D), raster order."""
        c, p = self.cfg.num_channels, self.cfg.patch_size
        if pixels.dim() != 4 or pixels.shape[1] != c or min(pixels.shape[2:]) < p:
            raise ValueError(f"pixels: expected (B, {c}, H, W) with H, W >= {p}, got {tuple(pixels.shape)}")
        x, (gh, gw) = self.patchify(pixels)
        return x + self.pos_embed(gh, gw)  # (B, N, D)

    def patchify(self, pixels):
        """pixels (B, C, H, W) -> (patch embeddings WITHOUT positions (B, N, D), (gh, gw)): each token a
        function of its own patch alone (DualToken's optional patch-local pixel branch reads these)."""
        x = self.patch(pixels.to(self.patch.weight.dtype))  # (B, D, gh, gw)
        gh, gw = x.shape[2:]
        return x.flatten(2).transpose(1, 2), (gh, gw)  # (B, N, D)

    def run_blocks(self, h, start=0, stop=None):
        """Run self.blocks[start:stop] (a python slice; block k in the paper is index k-1)."""
        for blk in self.blocks[start:stop]:
            h = blk(h)
        return h

    def pool(self, h):
        """Hidden state after the last block (B, N, D) -> pooled embedding (B, D): post-LN, MAP head."""
        if self.head is None:
            raise ValueError("pool: this vision tower has no MAP head (vision_use_head=False)")
        return self.head(self.post_ln(h))

    def forward(self, pixels, output_hidden_states=False):
        h = self.embed(pixels)
        hs = [h]
        for blk in self.blocks:
            h = blk(h)
            if output_hidden_states:
                hs.append(h)
        last = self.post_ln(h)
        out = dict(last_hidden_state=last, pooler_output=self.head(last) if self.head is not None else None)
        if output_hidden_states:
            out["hidden_states"] = hs  # [embeddings, after block 1, ..., after block L], before post-LN
        return out


class SigLIPText(nn.Module):
    """Token + position embedding, pre-LN blocks WITHOUT any mask (SigLIP texts are padded to a fixed
    length and the model saw the padding in training), final LN, the LAST position, a linear head."""

    def __init__(self, cfg: SigLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Parameter(torch.randn(cfg.max_position_embeddings, d) * 0.02)  # (T_max, D)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.final_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(d, cfg.projection_size)

    def check_ids(self, ids):
        """The id range check reads values back to the host: forward runs it in eager mode only (under
        torch.compile it would split the graph); train_siglip.py runs it on each CPU batch instead."""
        V = self.cfg.vocab_size
        if ids.numel() and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"ids: token ids must be in [0, {V}), got [{ids.min().item()}, {ids.max().item()}]")

    def forward(self, ids):
        """ids (B, T) with T <= max_position_embeddings -> dict(last_hidden_state (B, T, D), pooler_output (B, P))."""
        T_max = self.cfg.max_position_embeddings
        if ids.dim() != 2 or ids.shape[1] > T_max or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids: expected integer (B, T) with T <= {T_max}, got {tuple(ids.shape)} {ids.dtype}")
        if not torch.compiler.is_compiling():
            self.check_ids(ids)
        h = self.tok(ids) + self.pos[: ids.shape[1]]  # (B, T, D)
        for blk in self.blocks:
            h = blk(h)
        h = self.final_ln(h)
        return dict(last_hidden_state=h, pooler_output=self.head(h[:, -1]))


class SigLIP(nn.Module):
    def __init__(self, config: SigLIPConfig):
        super().__init__()
        self.config = config
        self.vision = SigLIPVision(config.vision)
        self.text = SigLIPText(config.text) if config.text is not None else None
        if self.text is not None:
            if config.text.projection_size != config.vision.hidden_size:
                raise ValueError(f"text projection_size {config.text.projection_size} must equal the vision "
                                 f"hidden_size {config.vision.hidden_size} (the two embeddings are compared)")
            # SigLIP paper sec. 3.2: t' = log 10, b = -10 so the start is not swamped by the many negatives
            self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.full((1,), -10.0))
        else:
            self.logit_scale = self.logit_bias = None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):  # lecun normal, zero bias (as big_vision)
            nn.init.trunc_normal_(m.weight, std=(m.weight[0].numel()) ** -0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=m.weight.shape[1] ** -0.5)

    def encode_image(self, pixels):
        """(B, 3, H, W) -> pooled image embedding (B, D), not normalised."""
        return self.vision(pixels)["pooler_output"]

    def encode_text(self, ids):
        """(B, T) token ids -> text embedding (B, D), not normalised."""
        if self.text is None:
            raise ValueError("encode_text: this SigLIP is vision-only (loaded without text weights)")
        return self.text(ids)["pooler_output"]

    def logits(self, img_emb, txt_emb):
        """Cosine similarity * exp(logit_scale) + logit_bias -> (B_img, B_txt)."""
        img = F.normalize(img_emb, dim=-1)
        txt = F.normalize(txt_emb, dim=-1)
        return img @ txt.t() * self.logit_scale.exp() + self.logit_bias

    def forward(self, pixels, ids):
        """-> logits_per_image (B_img, B_txt)."""
        return self.logits(self.encode_image(pixels), self.encode_text(ids))

    @staticmethod
    def sigmoid_loss(logits):
        """SigLIP pairwise sigmoid loss: every (image, text) pair is a binary problem, positives on the
        diagonal; summed over pairs and divided by the number of images (big_vision's normalisation)."""
        if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
            raise ValueError(f"logits: expected square (B, B) with positives on the diagonal, "
                             f"got {tuple(logits.shape)}")
        labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1  # +1 diag, -1 off
        return -F.logsigmoid(labels * logits).sum() / logits.shape[0]

    # ---- Hugging Face weights ----

    def hf_name_table(self):
        """[(our parameter name, [HF names])]: several HF names are concatenated on dim 0 (fused q/k/v)."""
        t = []

        wb = ("weight", "bias")

        def block(ours, hf):
            t.extend([(f"{ours}.ln_1.{w}", [f"{hf}.layer_norm1.{w}"]) for w in wb])
            t.extend([(f"{ours}.attn.qkv.{w}", [f"{hf}.self_attn.{n}_proj.{w}" for n in "qkv"]) for w in wb])
            t.extend([(f"{ours}.attn.proj.{w}", [f"{hf}.self_attn.out_proj.{w}"]) for w in wb])
            t.extend([(f"{ours}.ln_2.{w}", [f"{hf}.layer_norm2.{w}"]) for w in wb])
            t.extend([(f"{ours}.mlp.{f}.{w}", [f"{hf}.mlp.{f}.{w}"]) for f in ("fc1", "fc2") for w in wb])

        v = "vision_model"
        t.extend([(f"vision.patch.{w}", [f"{v}.embeddings.patch_embedding.{w}"]) for w in wb])
        t.append(("vision.pos", [f"{v}.embeddings.position_embedding.weight"]))
        for i in range(len(self.vision.blocks)):
            block(f"vision.blocks.{i}", f"{v}.encoder.layers.{i}")
        t.extend([(f"vision.post_ln.{w}", [f"{v}.post_layernorm.{w}"]) for w in wb])
        if self.vision.head is not None:
            t.append(("vision.head.probe", [f"{v}.head.probe"]))
            t.extend([(f"vision.head.in_proj.{w}", [f"{v}.head.attention.in_proj_{w}"]) for w in wb])
            t.extend([(f"vision.head.out_proj.{w}", [f"{v}.head.attention.out_proj.{w}"]) for w in wb])
            t.extend([(f"vision.head.ln.{w}", [f"{v}.head.layernorm.{w}"]) for w in wb])
            t.extend([(f"vision.head.mlp.{f}.{w}", [f"{v}.head.mlp.{f}.{w}"]) for f in ("fc1", "fc2") for w in wb])
        if self.text is not None:
            s = "text_model"
            t.append(("text.tok.weight", [f"{s}.embeddings.token_embedding.weight"]))
            t.append(("text.pos", [f"{s}.embeddings.position_embedding.weight"]))
            for i in range(len(self.text.blocks)):
                block(f"text.blocks.{i}", f"{s}.encoder.layers.{i}")
            t.extend([(f"text.final_ln.{w}", [f"{s}.final_layer_norm.{w}"]) for w in wb])
            t.extend([(f"text.head.{w}", [f"{s}.head.{w}"]) for w in wb])
            t.extend([("logit_scale", ["logit_scale"]), ("logit_bias", ["logit_bias"])])
        ours = set(dict(self.named_parameters()))
        assert ours == {o for o, _ in t}, f"name table out of sync: {sorted(ours ^ {o for o, _ in t})}"
        return t

    def hf_state_dict(self):
        """Our weights under Hugging Face SiglipModel names (fused tensors split back)."""
        params = dict(self.named_parameters())
        out = {}
        for ours, hfs in self.hf_name_table():
            for name, x in zip(hfs, params[ours].detach().chunk(len(hfs), dim=0)):
                out[name] = x
        return out

    @torch.no_grad()
    def load_hf_state_dict(self, sd, prefix=""):
        """Strict load of HF-named weights. With a prefix (e.g. "siglip_model." for the authors' DualToken
        checkpoint) only keys under it are considered and every one of them must be used; keys outside the
        prefix belong to other modules. `module.` / `_orig_mod.` wrappers are stripped first.
        Raises ValueError naming every missing, unexpected and mis-shaped key."""
        clean = {}
        for k, x in sd.items():
            while k.startswith(("module.", "_orig_mod.")):  # DDP / torch.compile wrappers
                k = k.split(".", 1)[1]
            if k.startswith(prefix):
                clean[k[len(prefix):]] = x
        # documented ignores: transformers < 4.40 saved the constant position_ids buffers
        clean = {k: x for k, x in clean.items() if not k.endswith("embeddings.position_ids")}
        # transformers >= 5 saves a SiglipVisionModel without the "vision_model." level
        if self.text is None and clean and not any(k.startswith("vision_model.") for k in clean):
            clean = {"vision_model." + k: x for k, x in clean.items()}
        params = dict(self.named_parameters())
        table = self.hf_name_table()
        expected = {h for _, hfs in table for h in hfs}
        missing = sorted(expected - set(clean))
        unexpected = sorted(set(clean) - expected)
        bad = []
        for ours, hfs in table:
            want = list(params[ours].shape)
            want[0] //= len(hfs)
            bad += [f"{h}: checkpoint {list(clean[h].shape)} vs model {want}"
                    for h in hfs if h in clean and list(clean[h].shape) != want]
        if missing or unexpected or bad:
            raise ValueError(f"SigLIP weights (prefix {prefix!r}) do not match the model: missing {missing}, "
                             f"unexpected {unexpected}, wrong shape {bad}")
        for ours, hfs in table:
            params[ours].copy_(torch.cat([clean[h] for h in hfs], dim=0))

    @classmethod
    def from_pretrained(cls, folder):
        """Load a Hugging Face-format SigLIP folder: config.json + model.safetensors (or the sharded
        model.safetensors.index.json). A checkpoint without text weights gives a vision-only model."""
        config = read_config(folder)
        single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(single):
            sd = read_safetensors(single)
        elif os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd = {}
            for s in shards:
                sd.update(read_safetensors(os.path.join(folder, s)))
        else:
            raise UserError(f"from_pretrained: neither model.safetensors nor model.safetensors.index.json "
                            f"in {folder!r}")
        if config.text is not None and not any(k.startswith("text_model.") for k in sd):
            config = SigLIPConfig(vision=config.vision, text=None)
        model = cls(config)
        model.load_hf_state_dict(sd)
        return model

    def save_pretrained(self, folder):
        """Write config.json + model.safetensors in Hugging Face's layout and names, each atomically (a crash
        mid-save leaves the previous files whole)."""
        import train_utils as tu
        tu.write_json(self.config.to_hf(), os.path.join(folder, "config.json"))
        sd = {k: x.clone() for k, x in self.hf_state_dict().items()}  # no shared storage (safetensors refuses it)
        tu.atomic_save_safetensors(sd, os.path.join(folder, "model.safetensors"), {"format": "pt"})

# -----------------------------------------------------------------------------
# zero-shot classification


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, templates, batch_size=256):
    """Class names x prompt templates ("a photo of a {}.") -> classifier (D, n_classes): per class the
    mean of the normalised text embeddings of all its prompts, renormalised (CLIP's prompt ensembling).
    `tokenizer(texts, max_len) -> (B, max_len)` is any tokenizer from text.py."""
    if model.text is None:
        raise ValueError("zero_shot_classifier: the model is vision-only (no text tower)")
    if not classnames or not templates:
        raise ValueError(f"zero_shot_classifier: need classnames and templates, got {len(classnames)} "
                         f"and {len(templates)}")
    T = model.config.text.max_position_embeddings
    dev = next(model.parameters()).device
    prompts = [t.format(c) for c in classnames for t in templates]
    embs = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i:i + batch_size], T).to(dev)
        embs.append(F.normalize(model.encode_text(ids).float(), dim=-1))
    e = torch.cat(embs).view(len(classnames), len(templates), -1).mean(1)  # (C, D)
    return F.normalize(e, dim=-1).t()  # (D, C)


def zero_shot_accuracy(image_emb, classifier, labels, topk=(1, 5)):
    """image_emb (B, D) (normalised here), classifier (D, C), labels (B,) -> {k: top-k accuracy}."""
    if image_emb.dim() != 2 or classifier.dim() != 2 or image_emb.shape[1] != classifier.shape[0]:
        raise ValueError(f"zero_shot_accuracy: image_emb {tuple(image_emb.shape)} and classifier "
                         f"{tuple(classifier.shape)} must be (B, D) and (D, C)")
    if labels.shape != (image_emb.shape[0],):
        raise ValueError(f"zero_shot_accuracy: labels {tuple(labels.shape)} must be ({image_emb.shape[0]},)")
    if max(topk) > classifier.shape[1]:
        raise ValueError(f"zero_shot_accuracy: topk {topk} exceeds the {classifier.shape[1]} classes")
    scores = F.normalize(image_emb.float(), dim=-1) @ classifier.float().to(image_emb.device)  # (B, C)
    pred = scores.topk(max(topk), dim=-1).indices  # (B, kmax)
    hit = pred == labels.to(pred.device)[:, None]
    return {k: hit[:, :k].any(1).float().mean().item() for k in topk}

@torch.no_grad()
def caption_scores(model, tokenizer, images, texts, perm=None, batch_size=64):
    """How well images match captions by this SigLIP (the CLIPScore idea, Hessel et al. 2021). images:
    uint8 (n, H, W, 3); texts: n strings; image i is scored against texts[perm[i]] (default texts[i]).
    With cos_i the cosine of the two embeddings -> dict(n, cos, prob,
      clip_score = mean_i 100 * max(cos_i, 0)  (torchmetrics' scale; Hessel's 2.5 * max(cos, 0) is 0.025 x it),
      sigmoid = mean_i sigmoid(exp(logit_scale) * cos_i + logit_bias)  (SigLIP's own probability that the
        pair matches, what its loss trains; calibrated by the model, where raw cosines are not)).
    Images are resized to the tower's size as HF's processor does (squashed, not cropped); texts are padded
    to the text tower's full length, as zero_shot_classifier batches them."""
    import numpy as np
    from PIL import Image
    if model.text is None:
        raise UserError("caption_scores: this SigLIP has no text tower (load a folder with text weights)")
    if len(images) != len(texts):
        raise ValueError(f"caption_scores: {len(images)} images for {len(texts)} texts")
    dev = next(model.parameters()).device
    S, T = model.config.vision.image_size, model.config.text.max_position_embeddings
    texts = [texts[j] for j in perm] if perm is not None else list(texts)

    def squash(im):  # HF SiglipImageProcessor: resize to S x S (bicubic), [-1, 1]
        im = Image.fromarray(np.asarray(im)).convert("RGB").resize((S, S), Image.BICUBIC)
        return torch.from_numpy(np.array(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1  # (3, S, S)

    cos = []
    for k in range(0, len(texts), batch_size):
        x = torch.stack([squash(im) for im in images[k:k + batch_size]]).to(dev)
        img = F.normalize(model.encode_image(x).float(), dim=-1)  # (B, D)
        txt = F.normalize(model.encode_text(tokenizer(texts[k:k + batch_size], T).to(dev)).float(), dim=-1)
        cos.append((img * txt).sum(-1).cpu())
    cos = torch.cat(cos).double()
    prob = torch.sigmoid(cos * model.logit_scale.double().exp().cpu() + model.logit_bias.double().cpu())
    return dict(n=len(cos), clip_score=(100 * cos.clamp(min=0)).mean().item(), sigmoid=prob.mean().item(),
                cos=cos.tolist(), prob=prob.tolist())

# -----------------------------------------------------------------------------
# files


def read_safetensors(path):
    """All tensors of a .safetensors file; a missing, truncated or foreign file is a UserError naming it
    (safetensors' own message does not say which file)."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    try:
        return load_file(path)
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); it is damaged or not safetensors") from None
