"""
The unified DualToken MLLM (paper section 3.3; design §4-§5): a decoder-only LLM (Qwen2 / Qwen2.5 /
LLaMA compatible) that reads images as dual code stacks and writes them back through two depth heads.

Input format (one interleaved sequence; sequences.py's `build_sequence` + `collate_sequences` produce it)
    idx            (B, T) long  token ids; at image positions any id (build_sequence writes pad_id)
    image_mask     (B, T) bool  True at image positions (one position per tokenizer grid cell)
    pix_codes      (N, Dp) long pixel codes of the N = image_mask.sum() image positions, in the order
                                of image_mask.nonzero(): row by row, left to right in each row
    sem_codes      (N, Ds) long semantic codes, same order
    attention_mask (B, T)       1 = real token, 0 = padding (left or right); RoPE positions are
                                cumsum(attention_mask) - 1, so a left-padded row equals the unpadded one
    gen_mask       (B, T) bool  image positions whose codes are trained (images being generated); default
                                all image positions
    targets        (B, T) long  text target of position t (normally idx[t+1]) or -1; sequences.`make_targets`
                                masks image, padding and (optionally) prompt targets
Delimiters: <im_start> ... <im_end> around an image the model reads, <image_gen_*> around one it writes.

Visual input: e_pix = sum over depths of the pixel codebook vectors of a position, e_sem likewise;
[e_pix ; e_sem] -> Linear, GELU, Linear -> LLM width, written over the token embedding at that position.
config.input_codes "pix" / "sem" reads one stack: the MLP's input is that stack's embedding alone (design §10).

Visual output, next-token style: the hidden state at position t predicts the codes of image position
t + 1 (so <image_gen_start> predicts the first image position, and the last image position predicts
<image_gen_end> through the text head). Per head (pixel, semantic; they never see each other): a 2-layer
MLP projects the hidden state to depth 1 of a small causal depth transformer; the input at depth d > 1 is
the projected partial sum of the codebook vectors of depths < d (the residual quantizer's running
reconstruction, as in RQ-Transformer), plus a learned depth embedding; one classifier per depth.
Loss = w_text * text CE + w_pix * sum_d pixel CE_d + w_sem * sum_d semantic CE_d (weights 1 by default).

The frozen tokenizer codebooks enter as tensors through `set_codebooks` (this file never imports the
tokenizer); they are stored as buffers of shape (depth, K, d), a shared book repeated per depth.

The decoder blocks (RMSNorm, RoPE, KV cache, attention, MLP) live in llm.py, the depth heads in
depth_head.py, the sequence layout in sequences.py; loading a Hugging Face LLM in mllm_hf.py; our export is
MLLM.from_pretrained / save_pretrained, loaded with its image and text tokenizers by loaders.py.
"""
import contextlib
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import decode
from configurator import UserError
from depth_head import DepthHead, code_vectors, mlp2
from folders import model_kind
from llm import Block, KVCache, Linear, RMSNorm, rope_inv_freq, sample_logits
from sequences import build_sequence, collate_sequences, image_positions

@dataclass
class MLLMConfig:
    SECTION = "mllm"  # configurator: `mllm_config = dict(...)` in a pipeline preset
    # LLM trunk. The defaults are the shapes-world model: byte vocabulary 0..255 + the 7 special tokens
    vocab_size: int = 263
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: Optional[int] = None  # None -> n_embd // n_head (LLaMA configs may say otherwise)
    intermediate_size: int = 688
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # None or HF's llama3 dict (rope_type, factor, ...)
    qkv_bias: bool = True  # Qwen2 always; LLaMA's attention_bias (which also sets o_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    max_seq_len: int = 2048
    # special token ids (None = the vocabulary has no such token); defaults: text.PromptTokenizer("bytes")'s
    pad_id: Optional[int] = 256
    eos_id: Optional[int] = 257
    bos_id: Optional[int] = 258
    im_start_id: Optional[int] = 259
    im_end_id: Optional[int] = 260
    image_gen_start_id: Optional[int] = 261
    image_gen_end_id: Optional[int] = 262
    # visual vocabularies: must match the tokenizer (set_codebooks checks)
    pix_vocab: int = 512
    pix_dim: int = 32
    pix_depth: int = 4
    sem_vocab: int = 512
    sem_dim: int = 32
    sem_depth: int = 4
    # depth heads (paper: 3 layers each); None -> the LLM width / heads
    head_n_layer: int = 3
    head_n_embd: Optional[int] = None
    head_n_head: Optional[int] = None
    # visual input path, not in the paper (the defaults keep its layout: an unnormalised 2-layer MLP).
    # vis_norm: LayerNorm on the projector input and an RMSNorm (weight starts at vis_gain) on its output,
    # so image inputs stay on the text embeddings' scale instead of growing into a large near-constant
    # vector the trunk learns to ignore. image_pos > 0: a learned table of that many image positions added
    # to each image input (its index inside its image), which RoPE alone gives only relative to the text
    vis_norm: bool = False
    vis_gain: float = 0.1
    image_pos: int = 0
    # input_codes: the code stacks an image position reads. "both" (the paper): the pixel and semantic
    # embeddings concatenated. "pix" / "sem": that stack alone; the projector's first Linear then has only
    # that stack's input columns, so the other stack is absent from the model (not zeros fed through
    # trained weights). "sem" needs gen_sem (an image being drawn must carry the stack the model reads
    # back). input_codes="pix" with gen_sem False uses no semantic stack at all: the model of a
    # one-vocabulary tokenizer (design §10)
    input_codes: str = "both"
    # gen_sem False (not in the paper): an image being generated carries its pixel codes only: no semantic
    # depth head, no semantic loss on it, and the semantic half of its input is zero. The decoder reads only
    # pixel codes; the semantic stack of a generated image is high-entropy (deep, global features) and,
    # sampled, feeds the trunk inputs it never saw in training
    gen_sem: bool = True
    # head_code_logits True (not in the paper): each depth's classifier also predicts a vector z in code space
    # and adds -|z - c_k|^2 (times a learned scale) to code k's logit, the residual quantizer's own
    # nearest-code rule. Codes that look alike get alike logits from the first step, so the head need not
    # learn every code's identity from examples alone
    head_code_logits: bool = False
    # gen_caption_loss w > 0 (not in the paper): every position of an image being generated also predicts
    # which words its caption holds (a multi-label BCE through a small linear head, weight w). Measured on the
    # shapes preset (docs/experiments.md, 2026-11-30): the caption's colour was fully readable from the
    # state at <image_gen_start> (linear probe 1.00) and absent from the state that predicts an object's
    # first patch (0.16, chance), so the drawn colour was a guess; this term asks each image position to
    # carry the caption, which the depth heads can then use
    gen_caption_loss: float = 0.0
    # gen_ground_loss w > 0 (not in the paper): the state that predicts a generated patch's codes also predicts
    # the words of the object that patch lies in (none: background), from per-patch word ids the data gives
    # (forward's ground_words; the shapes world knows each object's cell). The caption loss above asks every
    # patch for the whole caption; this asks it WHERE each described object goes, the grounding the long run
    # lacked: it drew extra objects and missed the count on 0.26 of captions (docs/experiments.md)
    gen_ground_loss: float = 0.0
    # loss = text_w * text CE + pix_w * pix CE + sem_w * sem CE, each code CE summed over its depths (the paper: an
    # unweighted sum). With 2 stacks x 6 depths of 512 codes (the shapes preset) the code terms start ~13x the text
    # term (12 ln 512 vs ln 258) and dominate the shared trunk's loss; a larger text weight gives understanding a
    # bigger share
    text_loss_weight: float = 1.0
    pix_loss_weight: float = 1.0
    sem_loss_weight: float = 1.0

    @classmethod
    def from_dict(cls, d):
        """The "mllm" dict of an export's config.json. An export may carry `gen_input_drop`, a training switch
        this model does not have (it hid some inputs of a generated image); at 0.0 it changed nothing, so the key
        is dropped; any other value names a model this code cannot rebuild."""
        d = dict(d)
        drop = d.pop("gen_input_drop", 0.0)
        if drop != 0.0:
            raise UserError(f"this MLLM was trained with gen_input_drop={drop}, a switch this code does not have: "
                            f"only an export with gen_input_drop 0.0 (or none) loads")
        return cls(**d)


# the fields an LLM checkpoint defines (the trunk and its special ids, mllm_hf.config_from_hf): those above
# MLLMConfig's "visual vocabularies"; the others are the visual side a trainer sets
_names = [f.name for f in fields(MLLMConfig)]
LLM_FIELDS = tuple(_names[:_names.index("pix_vocab")])


INPUT_CODES = ("both", "pix", "sem")


def tiny_config(**kw):
    """A model that builds in milliseconds: for tests."""
    return MLLMConfig(**dict(dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, max_seq_len=256,
                                  pix_vocab=32, pix_dim=8, pix_depth=3, sem_vocab=24, sem_dim=6, sem_depth=2,
                                  head_n_layer=2, head_n_embd=32, head_n_head=2), **kw))


# ----------------------------------------------------------------------------------------------------
# the model

class MLLM(nn.Module):
    def __init__(self, cfg, trunk_device=None):
        """trunk_device="meta": the LLM trunk (embed, layers, norm, lm_head) is built without memory or
        init, for mllm_hf.from_pretrained to assign a checkpoint to; the visual side is built as usual."""
        super().__init__()
        self.config = cfg
        C, hd = cfg.n_embd, cfg.head_dim or cfg.n_embd // cfg.n_head
        if cfg.n_head % cfg.n_kv_head:
            raise ValueError(f"n_head {cfg.n_head} is not a multiple of n_kv_head {cfg.n_kv_head}")
        with torch.device(trunk_device) if trunk_device else contextlib.nullcontext():
            self.embed = nn.Embedding(cfg.vocab_size, C)
            self.layers = nn.ModuleList(Block(C, cfg.n_head, cfg.n_kv_head, hd, cfg.intermediate_size,
                                              cfg.rms_norm_eps, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias)
                                        for _ in range(cfg.n_layer))
            self.norm = RMSNorm(C, cfg.rms_norm_eps)
            self.lm_head = Linear(C, cfg.vocab_size, bias=False)
        # a plain fp32 tensor, not a buffer: model.to(bfloat16) must not round the RoPE frequencies
        self.inv_freq = rope_inv_freq(cfg)
        # visual side: frozen codebooks (set_codebooks), input projector, two depth heads
        if cfg.input_codes not in INPUT_CODES:
            raise ValueError(f"input_codes={cfg.input_codes!r}: expected one of {INPUT_CODES}")
        if cfg.input_codes == "sem" and not cfg.gen_sem:
            raise ValueError("input_codes='sem' needs gen_sem=True: a drawn image is read back through its "
                             "semantic codes, so they must be generated")
        self.reads_pix = cfg.input_codes in ("both", "pix")
        self.reads_sem = cfg.input_codes in ("both", "sem")
        self.register_buffer("pix_book", torch.zeros(cfg.pix_depth, cfg.pix_vocab, cfg.pix_dim))
        uses_sem = self.reads_sem or cfg.gen_sem  # else no semantic stack anywhere: no book to hold
        if uses_sem:
            self.register_buffer("sem_book", torch.zeros(cfg.sem_depth, cfg.sem_vocab, cfg.sem_dim))
        else:
            self.sem_book = None
        d_in = cfg.pix_dim * self.reads_pix + cfg.sem_dim * self.reads_sem  # the stacks read, concatenated
        self.vis_in = mlp2(d_in, C, C)
        self.vis_in_norm = nn.LayerNorm(d_in) if cfg.vis_norm else None
        self.vis_out_norm = RMSNorm(C, cfg.rms_norm_eps) if cfg.vis_norm else None
        self.image_pos = nn.Parameter(torch.randn(cfg.image_pos, C) * 0.02) if cfg.image_pos else None
        self.pix_head = DepthHead(cfg, cfg.pix_vocab, cfg.pix_dim, cfg.pix_depth)
        self.sem_head = DepthHead(cfg, cfg.sem_vocab, cfg.sem_dim, cfg.sem_depth) if cfg.gen_sem else None
        self.cap_head = nn.Linear(C, cfg.vocab_size) if cfg.gen_caption_loss > 0 else None
        self.ground_head = nn.Linear(C, cfg.vocab_size) if cfg.gen_ground_loss > 0 else None
        self.apply(self._init_weights)
        if self.vis_out_norm is not None:
            nn.init.constant_(self.vis_out_norm.weight, cfg.vis_gain)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.loss_parts = {}

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def set_codebooks(self, pix_codebook, sem_codebook=None):
        """(K, d) shared book, or (n_books, K, d) with n_books 1 (shared) or depth (one per depth).
        sem_codebook may be None only for a model without a semantic stack (see input_codes)."""
        cfg = self.config
        if self.sem_book is not None and sem_codebook is None:
            raise ValueError("set_codebooks: this model reads or draws semantic codes and needs sem_codebook")
        books = [("pix_codebook", pix_codebook, self.pix_book, cfg.pix_vocab, cfg.pix_dim, cfg.pix_depth)]
        if self.sem_book is not None:
            books.append(("sem_codebook", sem_codebook, self.sem_book, cfg.sem_vocab, cfg.sem_dim, cfg.sem_depth))
        for name, book, buf, K, d, D in books:
            b = book.detach()[None] if book.dim() == 2 else book.detach()
            if b.dim() != 3 or b.shape[0] not in (1, D) or tuple(b.shape[1:]) != (K, d):
                raise ValueError(f"{name}: expected ({K}, {d}) or (1 or {D}, {K}, {d}), got "
                                 f"{tuple(book.shape)}")
            buf.copy_(b.expand(D, K, d))

    # --- trunk -----------------------------------------------------------------------------------

    def new_cache(self, B, max_len):
        cfg, p = self.config, self.embed.weight
        return KVCache(cfg.n_layer, B, cfg.n_kv_head, max_len, cfg.head_dim or cfg.n_embd // cfg.n_head,
                       p.device, p.dtype)

    def trunk(self, x, attention_mask=None, cache=None):
        """Input embeddings x (B, T, C) -> final-norm hidden states (B, T, C). With a cache, x is appended
        after the cached slots (prefill when the cache is empty, decode otherwise)."""
        B, T, _ = x.shape
        am = None if attention_mask is None else attention_mask.bool()
        rel = torch.arange(T, device=x.device).expand(B, T) if am is None else (am.cumsum(1) - 1).clamp(min=0)
        L0 = 0 if cache is None else cache.len
        if cache is not None:
            cache.valid[:, L0:L0 + T] = True if am is None else am
            rel = rel + cache.next_pos[:, None]
            cache.next_pos += T if am is None else am.sum(1)
            valid = cache.valid[:, :L0 + T]
        else:
            valid = am
        # nothing padded: no mask, SDPA keeps its fused kernels. Compiled, the host read is skipped and the mask
        # built (train_mllm.py drops an all-ones attention_mask on the host instead, keeping the fused path)
        if valid is None or (not torch.compiler.is_compiling() and bool(valid.all())):
            mask = None if T == 1 else ("causal" if L0 == 0 else self._mask(None, L0, T, x.device))
        else:
            mask = self._mask(valid, L0, T, x.device)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        freqs = rel[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), -1)[:, None]  # (B, 1, T, hd)
        rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        for i, blk in enumerate(self.layers):
            x = blk(x, rope, mask, cache, i)
        if cache is not None:
            cache.len += T
        return self.norm(x)

    @staticmethod
    def _mask(valid, L0, T, device):
        """(B or 1, 1, T, L) bool: causal over cache slots, padding keys hidden. Every query also sees
        itself so that a padding query never has an all-masked row (NaN); its output is never used."""
        q = L0 + torch.arange(T, device=device)[:, None]
        k = torch.arange(L0 + T, device=device)[None]
        m = (k <= q)[None] if valid is None else (k <= q)[None] & valid[:, None, :]  # (B, T, L)
        return (m | (k == q)[None])[:, None]

    # --- inputs ----------------------------------------------------------------------------------

    def visual_input_modules(self):
        """The modules that turn codes into LLM inputs (stage 1 trains these alone)."""
        return [m for m in (self.vis_in, self.vis_in_norm, self.vis_out_norm) if m is not None]

    def set_trainable(self, mode):
        """requires_grad per training stage (paper 3.4; design §6): "all" (stages 2 and 4), "input" (stage 1: the
        visual input projector and the image position table only), "output" (stage 3: the depth heads, their
        output projectors included)."""
        if mode not in ("all", "input", "output"):
            raise ValueError(f"trainable={mode!r}: expected 'all', 'input' or 'output'")
        self.requires_grad_(mode == "all")
        parts = dict(all=[], input=[*self.visual_input_modules(), self.image_pos], output=[self.pix_head, self.sem_head])
        for m in parts[mode]:
            if m is not None:
                m.requires_grad_(True)

    def embed_images(self, pix_codes, sem_codes, pos=None, sem_off=None):
        """(N, Dp), (N, Ds) codes -> (N, C) LLM inputs, from the stacks config.input_codes reads (the other
        may be None). pos (N,): each position's index inside its image (used when config.image_pos > 0;
        required then). Reading both, sem_codes None or sem_off (N,) bool True: that row's semantic half is
        zero (a generated image without semantic codes, config.gen_sem False)."""
        e = []
        if self.reads_pix:
            e.append(code_vectors(self.pix_book, pix_codes).sum(1))  # (N, dp)
        if self.reads_sem:
            if sem_codes is None:
                if not self.reads_pix:
                    raise ValueError("embed_images: input_codes='sem' needs sem_codes")
                e_sem = e[0].new_zeros(e[0].shape[0], self.config.sem_dim)
            else:
                e_sem = code_vectors(self.sem_book, sem_codes).sum(1)  # (N, ds)
                if sem_off is not None:
                    e_sem = e_sem.masked_fill(sem_off[:, None], 0.0)
            e.append(e_sem)
        e = torch.cat(e, -1).to(self.embed.weight.dtype)  # (N, dp + ds), or one stack's width
        if self.vis_in_norm is not None:
            e = self.vis_in_norm(e)
        y = self.vis_in(e)
        if self.vis_out_norm is not None:
            y = self.vis_out_norm(y)
        if self.image_pos is not None:
            if pos is None or pos.shape != y.shape[:1]:
                raise ValueError(f"embed_images: image_pos={self.config.image_pos} needs pos ({y.shape[0]},), got "
                                 f"{None if pos is None else tuple(pos.shape)}")
            self._check_image_pos(pos)
            y = y + self.image_pos[pos].to(y.dtype)
        return y

    def _check_image_pos(self, pos):  # a host read: skipped when compiling (check_inputs serves compiled callers)
        if not torch.compiler.is_compiling() and pos.numel() and (pos.min() < 0 or pos.max() >= self.config.image_pos):
            raise ValueError(f"embed_images: image position {int(pos.max())} outside the table of "
                             f"{self.config.image_pos} (image_pos); images here are larger")

    def check_inputs(self, idx, image_mask=None, pix_codes=None, sem_codes=None, **unused):
        """embed_inputs' checks that read values back to the host (id / code ranges, image count): eager only,
        as each would split a compiled graph; a compiled caller runs them on the batch before it goes to the
        device (train_mllm.py: on the CPU batch, no device sync)."""
        cfg = self.config
        if idx.dim() != 2:
            raise ValueError(f"idx: expected (B, T), got {tuple(idx.shape)}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= cfg.vocab_size):
            raise ValueError(f"idx: ids must lie in [0, {cfg.vocab_size}), got [{idx.min()}, {idx.max()}]")
        if image_mask is None or not image_mask.any():
            return
        if image_mask.shape != idx.shape:
            raise ValueError(f"image_mask: expected {tuple(idx.shape)}, got {tuple(image_mask.shape)}")
        N = int(image_mask.sum())
        stacks = [("pix_codes", pix_codes, cfg.pix_depth, cfg.pix_vocab)]
        if self.reads_sem or (self.sem_book is not None and sem_codes is not None):  # needed, or given and used
            stacks.append(("sem_codes", sem_codes, cfg.sem_depth, cfg.sem_vocab))
        for name, c, D, K in stacks:
            if c is None or tuple(c.shape) != (N, D):
                raise ValueError(f"{name}: expected ({N}, {D}) for {N} image positions, got "
                                 f"{None if c is None else tuple(c.shape)}")
            if c.min() < 0 or c.max() >= K:
                raise ValueError(f"{name}: codes must lie in [0, {K}), got [{c.min()}, {c.max()}]")
        if self.image_pos is not None:
            self._check_image_pos(image_positions(image_mask.bool())[image_mask.bool()])

    def embed_inputs(self, idx, image_mask=None, pix_codes=None, sem_codes=None, gen_mask=None):
        """Token embeddings, image inputs written over the image positions by index_copy: no shape depends on
        tensor values (no boolean indexing, no .item()), so torch.compile traces one graph."""
        cfg = self.config
        if not torch.compiler.is_compiling():
            self.check_inputs(idx, image_mask, pix_codes, sem_codes)
        x = self.embed(idx)  # (B, T, C)
        if image_mask is None or pix_codes is None or pix_codes.shape[0] == 0:
            return x
        B, T, C = x.shape
        N, m = pix_codes.shape[0], image_mask.bool()
        mf = m.flatten()  # (B*T,)
        # flat position of each code row; non-image positions scatter into a spare slot N, cut off
        row = torch.where(mf, mf.cumsum(0) - 1, N)  # (B*T,)
        at = torch.zeros(N + 1, dtype=torch.long, device=x.device).scatter_(
            0, row, torch.arange(B * T, device=x.device))[:N]  # (N,)
        pos = image_positions(m).flatten()[at] if self.image_pos is not None else None
        g = gen_mask.bool().flatten()[at] if gen_mask is not None else None  # (N,)
        off = g if g is not None and not cfg.gen_sem else None
        y = self.embed_images(pix_codes, sem_codes, pos, off).to(x.dtype)  # autocast: the MLP may give bf16
        return x.reshape(B * T, C).index_copy(0, at, y).view(B, T, C)

    # --- training forward ------------------------------------------------------------------------

    def forward(self, idx, targets=None, image_mask=None, pix_codes=None, sem_codes=None,
                attention_mask=None, gen_mask=None, ground_words=None):
        """-> (logits (B, T, V), loss or None). The loss parts (detached) land in self.loss_parts.
        ground_words (N, W) long, aligned with the code rows, -1 padded: each image position's object words
        (gen_ground_loss; all -1 = background)."""
        cfg = self.config
        x = self.embed_inputs(idx, image_mask, pix_codes, sem_codes, gen_mask)
        h = self.trunk(x, attention_mask)
        logits = self.lm_head(h)  # (B, T, V)
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(f"targets: expected {tuple(idx.shape)}, got {tuple(targets.shape)}")
        zero = h.new_zeros(())
        t = targets.view(-1)  # mean over kept targets as sum / count (0 if none): no host read, no graph break
        text = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), t, ignore_index=-1, reduction="sum") \
            / (t != -1).sum().clamp(min=1)
        pix = sem = ground = zero
        if image_mask is not None and pix_codes is not None and pix_codes.shape[0]:
            sel, rows, hs = self._code_targets(h, image_mask, attention_mask, gen_mask)
            if hs.shape[0]:
                pix = self._depth_loss(self.pix_head, self.pix_book, hs, pix_codes[rows])
                if self.sem_head is not None:
                    if sem_codes is None:
                        raise ValueError("sem_codes: gen_sem=True trains the semantic head on them; got None")
                    sem = self._depth_loss(self.sem_head, self.sem_book, hs, sem_codes[rows])
                if self.ground_head is not None:
                    ground = self._ground_loss(hs, ground_words, rows, pix_codes.shape[0])
        loss = cfg.text_loss_weight * text + cfg.pix_loss_weight * pix + cfg.sem_loss_weight * sem
        self.loss_parts = dict(text=text.detach(), pix=pix.detach(), sem=sem.detach())
        if self.cap_head is not None:
            cap = self._caption_loss(idx, h, image_mask, attention_mask, gen_mask)
            loss = loss + cfg.gen_caption_loss * cap
            self.loss_parts["cap"] = cap.detach()
        if self.ground_head is not None:
            loss = loss + cfg.gen_ground_loss * ground
            self.loss_parts["ground"] = ground.detach()
        return logits, loss

    def _ground_loss(self, hs, ground_words, rows, N):
        """Mean BCE of each trained image position's prediction of its object's words (gen_ground_loss)."""
        V = self.config.vocab_size
        if ground_words is None or ground_words.dim() != 2 or ground_words.shape[0] != N:
            raise ValueError(f"ground_words: gen_ground_loss > 0 needs ({N}, W) for {N} image positions, got "
                             f"{None if ground_words is None else tuple(ground_words.shape)}")
        w = ground_words[rows]  # (M, W)
        y = torch.zeros(w.shape[0], V + 1, device=hs.device).scatter_(1, torch.where(w < 0, V, w), 1.0)[:, :V]
        return F.binary_cross_entropy_with_logits(self.ground_head(hs).float(), y)

    def caption_words(self, idx, image_mask, attention_mask, gen_mask):
        """(B, T) -> (B, V) multi-hot of the non-special tokens before each row's first generated image
        position (its caption; all zero for a row without one)."""
        cfg = self.config
        B, T = idx.shape
        t = torch.arange(T, device=idx.device)
        g = gen_mask.bool() & image_mask.bool()
        first = torch.where(g, t, T).min(1).values  # (B,) T where the row generates nothing
        txt = (t < first[:, None]) & ~image_mask.bool() & g.any(1, keepdim=True)
        if attention_mask is not None:
            txt &= attention_mask.bool()
        special = [i for i in (cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.im_start_id, cfg.im_end_id,
                               cfg.image_gen_start_id, cfg.image_gen_end_id) if i is not None]
        txt &= ~torch.isin(idx, torch.tensor(special, device=idx.device))
        return torch.zeros(B, cfg.vocab_size, device=idx.device).scatter_add_(1, idx, txt.float()).clamp_(max=1)

    def _caption_loss(self, idx, h, image_mask, attention_mask, gen_mask):
        """Mean BCE of every generated image position's caption-word prediction (gen_caption_loss)."""
        if image_mask is None or gen_mask is None:
            return h.new_zeros(())
        at = self._gen_positions(image_mask, gen_mask)  # (M,) flat b*T + t
        y = self.caption_words(idx, image_mask, attention_mask, gen_mask)[at // idx.shape[1]]  # (M, V)
        bce = F.binary_cross_entropy_with_logits(self.cap_head(h.flatten(0, 1)[at]).float(), y, reduction="sum")
        return bce / max(y.numel(), 1)  # the mean; 0 when nothing is generated

    @staticmethod
    @torch.compiler.disable  # M depends on the data (one graph break, as in _code_targets)
    def _gen_positions(image_mask, gen_mask):
        return (gen_mask.bool() & image_mask.bool()).flatten().nonzero().squeeze(1)

    @torch.no_grad()
    def image_code_nll(self, idx, image_mask, pix_codes, sem_codes, attention_mask=None, gen_mask=None):
        """Teacher-forced pixel-code loss of every generated image position: (B, T), nats summed over the
        pixel depths at each generated position (NaN elsewhere). For controls that ask where the model
        uses its prompt (eval.py's caption-word swap), which a batch-mean loss would blur."""
        x = self.embed_inputs(idx, image_mask, pix_codes, sem_codes, gen_mask)
        h = self.trunk(x, attention_mask)
        sel, rows, hs = self._code_targets(h, image_mask, attention_mask, gen_mask)
        codes = pix_codes[rows]  # (M, D)
        cum = code_vectors(self.pix_book, codes).cumsum(1)[:, :-1].to(h.dtype)
        logits = self.pix_head(hs, cum, book=self.pix_book).float()  # (M, D, K)
        nll = F.cross_entropy(logits.transpose(1, 2), codes, reduction="none").sum(1)  # (M,)
        out = torch.full(idx.shape, float("nan"), device=idx.device)
        out[sel] = nll
        return out

    @staticmethod
    @torch.compiler.disable  # M depends on the data: eager here costs a compiled forward one graph break, not three
    def _code_targets(h, image_mask, attention_mask, gen_mask):
        """The image positions whose codes are trained (generated ones when gen_mask is given) -> (sel (B, T)
        bool, rows (M,) each one's row in the flat code tensors, hs (M, C) the state at t-1 that predicts it)."""
        img = image_mask.bool()
        sel = img.clone() if gen_mask is None else img & gen_mask.bool()
        if attention_mask is not None:
            sel[:, 1:] &= attention_mask[:, :-1].bool()  # the predictor must be a real position
        sel[:, 0] = False  # nothing predicts position 0
        at = sel.flatten().nonzero().squeeze(1)  # (M,) flat positions b*T + t, t >= 1
        rows = (img.flatten().cumsum(0) - 1)[at]  # code row of each target position
        return sel, rows, h.flatten(0, 1)[at - 1]  # the state at t-1 (same row) predicts the codes at t

    @staticmethod
    def _depth_loss(head, book, hs, codes):
        """Sum over depths of the mean CE of that depth."""
        cum = code_vectors(book, codes).cumsum(1)[:, :-1].to(hs.dtype)  # (M, D-1, d)
        logits = head(hs, cum, book=book)  # (M, D, K)
        M, D, K = logits.shape
        return F.cross_entropy(logits.float().reshape(M * D, K), codes.reshape(M * D)) * D

    # --- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None,
                 compile_decode=False):
        """nanoGPT's text-only loop: (B, T) -> (B, T + max_new_tokens). use_cache=False recomputes the whole
        sequence every step (the reference); "static": decode.py's fixed-shape steps, compiled with compile_decode
        (True: inductor, or a backend's name; implies "static"), the same tokens from the same generator."""
        if not (use_cache or compile_decode):
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -self.config.max_seq_len:])
                nxt = sample_logits(logits[:, -1], temperature, top_k, generator=generator)
                idx = torch.cat([idx, nxt[:, None]], 1)
            return idx
        cache = self.new_cache(idx.shape[0], idx.shape[1] + max_new_tokens)
        h = self.trunk(self.embed(idx), cache=cache)
        if use_cache == "static" or compile_decode:
            return torch.cat([idx, decode.text_loop(self, h[:, -1], cache, max_new_tokens, temperature, top_k, None,
                                                    generator, decode.backend_of(compile_decode))], 1)
        for i in range(max_new_tokens):
            nxt = sample_logits(self.lm_head(h[:, -1]), temperature, top_k, generator=generator)
            idx = torch.cat([idx, nxt[:, None]], 1)
            if i + 1 < max_new_tokens:
                h = self.trunk(self.embed(nxt[:, None]), cache=cache)
        return idx

    @torch.no_grad()
    def generate_text(self, prompt_ids, images=None, max_new_tokens=64, temperature=0.0, top_k=None,
                      top_p=None, generator=None, use_cache=True, compile_decode=False):
        """Image + question -> answer. prompt_ids: list of B token lists (the question in the caller's
        template); images: None or (pix (B, N, Dp), sem (B, N, Ds)) codes (sem may be None when the model
        does not read it: config.input_codes). Sequence per row: [bos] [<im_start> image <im_end>] prompt.
        Returns B lists of new ids, each cut before eos. use_cache="static", compile_decode: as in generate."""
        cfg, B = self.config, len(prompt_ids)
        parts = [[list(p)] if images is None else [("und", images[0].shape[1]), list(p)] for p in prompt_ids]
        batch = collate_sequences(cfg, [build_sequence(cfg, ps) for ps in parts])
        pix = sem = None
        dev = self.embed.weight.device
        if images is not None:
            pix, sem = images
            if sem is None and self.reads_sem:
                raise ValueError(f"images: input_codes={cfg.input_codes!r} reads semantic codes; got None")
            if pix.shape[0] != B or (sem is not None and (sem.shape[0] != B or pix.shape[1] != sem.shape[1])):
                raise ValueError(f"images: expected pix (B={B}, N, Dp) and sem (B, N, Ds), got "
                                 f"{tuple(pix.shape)} and {None if sem is None else tuple(sem.shape)}")
            pix = pix.reshape(-1, pix.shape[-1]).to(dev)  # (B*N, Dp)
            sem = None if sem is None else sem.reshape(-1, sem.shape[-1]).to(dev)  # (B*N, Ds)
        batch = {k: v.to(dev) for k, v in batch.items()}
        cache = self.new_cache(B, batch["idx"].shape[1] + max_new_tokens)
        x = self.embed_inputs(batch["idx"], batch["image_mask"], pix, sem)
        h = self.trunk(x, batch["attention_mask"], cache)
        if use_cache == "static" or compile_decode:
            ids = decode.text_loop(self, h[:, -1], cache, max_new_tokens, temperature, top_k, top_p, generator,
                                   decode.backend_of(compile_decode), cfg.eos_id).tolist()
            return [r[:r.index(cfg.eos_id)] if cfg.eos_id in r else r for r in ids]
        out, done = [[] for _ in range(B)], [False] * B
        for i in range(max_new_tokens):
            nxt = sample_logits(self.lm_head(h[:, -1]), temperature, top_k, top_p, generator)
            for b, t in enumerate(nxt.tolist()):
                done[b] = done[b] or t == cfg.eos_id
                if not done[b]:
                    out[b].append(t)
            if all(done) or i + 1 == max_new_tokens:
                break
            h = self.trunk(self.embed(nxt[:, None]), cache=cache)
        return out

    def _sample_depths(self, head, book, h, B, cfg_scale, temperature, top_k, top_p, generator,
                       fine_temperature=None, use_cache=True, noise=None):
        """Sample all depths of one position. h (B or 2B, C); with CFG rows [cond; uncond] and the
        guided logits u + s * (c - u) at every depth; the sampled code is written to both halves.
        fine_temperature (None = temperature) applies to depths 2.. (0 = greedy there). use_cache: one head
        pass per depth over a KV cache (DepthHead.step); False re-runs the head over every earlier depth (D(D+1)/2
        passes: the reference). noise: one draw per depth for sample_logits, drawn beforehand (decode.py)."""
        D = book.shape[0]
        codes = torch.zeros(h.shape[0], D, dtype=torch.long, device=h.device)
        cache = head.new_cache(h.shape[0], h.device, h.dtype) if use_cache else None
        x, run = (head.proj(h), 0.0) if use_cache else (None, None)
        for d in range(D):
            if use_cache:
                if d:
                    run = run + book[d - 1][codes[:, d - 1]]  # (B', dim) partial sum of depths < d, in the book's dtype
                    x = head.code_in(run.to(h.dtype))
                logits = head.step(x, d, cache, book).float()  # (B', K)
            else:
                cum = code_vectors(book, codes[:, :d]).cumsum(1).to(h.dtype)  # (B', d, dim)
                logits = head(h, cum, last_only=True, book=book).float()  # (B', K)
            if cfg_scale is not None:
                c, u = logits[:B], logits[B:]
                logits = u + cfg_scale * (c - u)
            t = temperature if d == 0 or fine_temperature is None else fine_temperature
            s = sample_logits(logits, t, top_k, top_p, generator, None if noise is None else noise[d])
            codes[:, d] = s.repeat(h.shape[0] // B)
        return codes

    @torch.no_grad()
    def generate_image(self, prompt_ids, num_positions, cfg_scale=3.0, temperature=1.0, top_k=None,
                       top_p=None, generator=None, use_cache=True, fine_temperature=None, depth_cache=None,
                       compile_decode=False):
        """Caption -> (pix_codes (B, N, Dp), sem_codes (B, N, Ds)). prompt_ids: list of B caption token
        lists; sequence per row: [bos] caption <image_gen_start>, then N positions. CFG doubles the batch
        with the empty caption ([bos] <image_gen_start>); cfg_scale=None turns guidance (and the extra
        half) off. use_cache=False: no KV cache in the trunk nor along the depths (the reference path);
        depth_cache (None = use_cache) sets the depth heads' cache alone; "static" / compile_decode: as in
        generate. sem_codes is None when config.gen_sem is False (the caller decodes the pixel codes).
        fine_temperature (None = temperature): depths 2..'s, e.g. 0 to sample the coarse code only."""
        cfg, B = self.config, len(prompt_ids)
        if cfg.image_gen_start_id is None:
            raise ValueError("generate_image: config has no image_gen_start_id token")
        use_cache = "static" if compile_decode else use_cache
        dc = use_cache if depth_cache is None else depth_cache
        caps = [list(p) for p in prompt_ids] + ([[]] * B if cfg_scale is not None else [])
        batch = collate_sequences(cfg, [build_sequence(cfg, [c + [cfg.image_gen_start_id]]) for c in caps])
        dev = self.embed.weight.device
        am = batch["attention_mask"].to(dev)
        x = self.embed(batch["idx"].to(dev))  # (B', T, C)
        cache = self.new_cache(x.shape[0], x.shape[1] + num_positions) if use_cache else None
        h = self.trunk(x, am, cache)[:, -1]
        if use_cache == "static":
            return decode.image_loop(self, h, cache, B, num_positions, generator, decode.backend_of(compile_decode),
                                     cfg_scale, temperature, top_k, top_p, fine_temperature, dc)
        pix, sem, args = [], [], (B, cfg_scale, temperature, top_k, top_p, generator, fine_temperature, dc)
        for n in range(num_positions):
            p = self._sample_depths(self.pix_head, self.pix_book, h, *args)
            s = None if self.sem_head is None else self._sample_depths(self.sem_head, self.sem_book, h, *args)
            pix.append(p[:B])
            sem.append(None if s is None else s[:B])
            if n + 1 == num_positions:
                break
            e = self.embed_images(p, s, torch.full((p.shape[0],), n, device=p.device))[:, None]  # (B', 1, C)
            if use_cache:
                h = self.trunk(e, cache=cache)[:, -1]
            else:
                x = torch.cat([x, e], 1)
                am = torch.cat([am, am.new_ones(am.shape[0], 1)], 1)
                h = self.trunk(x, am)[:, -1]
        return torch.stack(pix, 1), None if self.sem_head is None else torch.stack(sem, 1)  # (B, N, Dp), (B, N, Ds)

    # --- weights ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder, device="cpu"):
        """Our export (save_pretrained's folder: train_mllm.py's out_dir) -> the MLLM in eval mode on device, read
        strictly (from_state_dict). The rest of its config.json (the image tokenizer's path and hash, the text
        tokenizer, the sampler, ...) is model.export_info. A Hugging Face LLM folder loads with mllm_hf."""
        from siglip import read_safetensors  # names the file when it is damaged
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise UserError(f"MLLM.from_pretrained: no config.json in {folder}")
        with open(path) as f:
            conf = json.load(f)
        if not isinstance(conf, dict) or "mllm" not in conf:
            raise UserError(f"{folder!r} is {model_kind(conf)}: an MLLM folder (train_mllm.py's out_dir) is needed here")
        cfg = MLLMConfig.from_dict(conf.pop("mllm"))
        where = os.path.join(folder, "model.safetensors")
        model = cls.from_state_dict(cfg, read_safetensors(where), where)
        model.export_info = conf
        return model.to(device).eval()

    @classmethod
    def from_state_dict(cls, cfg, sd, where="the state dict"):
        """An MLLM whose tensors ARE sd's, strictly (every key used, every shape checked): built on the meta
        device, no random init, so the weights live once (a 3B export costs one copy, not a random model plus
        the file). A tied head may be absent (the export stores it as embed.weight only)."""
        with torch.device("meta"):
            model = cls(cfg)
        if cfg.tie_word_embeddings and "embed.weight" in sd:
            sd = {**sd, "lm_head.weight": sd["embed.weight"]}
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
        if missing or unexpected or bad:
            raise UserError(f"{where} does not match its config: missing {missing}, unexpected {unexpected}, "
                            f"wrong shape {bad}")
        model.inv_freq = rope_inv_freq(cfg)  # a plain fp32 tensor, not in the state dict
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_word_embeddings:  # assign gave the head its own Parameter: one tensor, one Parameter
            model.lm_head.weight = model.embed.weight
        return model

    def save_pretrained(self, folder, extra=None):
        """config.json ({"mllm": the config, **extra}: how to talk to the model, e.g. the image tokenizer's path
        and hash, the text tokenizer's name) and model.safetensors, each written atomically. A tied output head
        is stored once (as embed.weight); from_pretrained re-ties it."""
        import train_utils as tu
        tu.write_json(dict(mllm=asdict(self.config), **(extra or {})), os.path.join(folder, "config.json"))
        sd = self.state_dict()
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight")
        tu.atomic_save_safetensors(sd, os.path.join(folder, "model.safetensors"), {"format": "pt"})
