"""
Analytic FLOP counts of one training step, pure functions of the configs and the batch shape: what
`bench.py gpu` divides by the step time for TFLOP/s and MFU; tests/test_bench.py checks each against
torch.utils.flop_counter.FlopCounterMode running the real modules forward and backward.

Conventions (those behind MFU as PaLM and nanoGPT report it):
- A matmul (M x K) @ (K x N) costs 2MKN; a convolution 2 * output positions * C_in * C_out * k * k.
- Backward costs 2x forward for a layer whose input needs a gradient (one product for the input gradient,
  one for the weight gradient), 1x for a trainable layer fed by something without a gradient (the patch
  embedding reads pixels, the MLLM's code projections read the frozen codebooks, LPIPS's frozen VGG still
  passes the gradient to the reconstruction), 0 for work done without autograd (the teacher, the residual
  quantizer's nearest-code search). So a step is 3x forward for most of a model, the familiar 6N per token.
- Attention counts the full T x T score matrix, causal or not (QK^T and PV: 4 * Tq * Tk * width), backward
  2x: flash attention also recomputes the scores in backward (FlopCounterMode counts 2.5x there), but
  like activation recomputation that is hardware work, not model work, and MFU leaves it out.
- Only matmuls, convolutions and attention count. Norms, activations, softmax, the losses, embedding
  lookups, the interpolations and the EMA codebook update are linear in the elements, not in elements x
  width: FlopCounterMode ignores them too, and at the widths benchmarked they are a few percent of the time.
Every function returns {part: FLOPs} so a reader sees where the work is; sum(d.values()) is the step.
"""
from losses import VGG16_CHANNELS, VGG16_CONVS


def linear(n, d_in, d_out):
    return 2 * n * d_in * d_out


def conv(positions, c_in, c_out, k):
    return 2 * positions * c_in * c_out * k * k


def attn(n_q, n_k, width):
    """QK^T and PV of one sequence, summed over heads (width = heads * head dim)."""
    return 4 * n_q * n_k * width

# -----------------------------------------------------------------------------
# the tokenizer (tokenizer.DualToken trained as train_tokenizer.py does with trainable="vision")


def vit_block(v, n):
    """One SigLIP block on n tokens: fused qkv, attention, output projection, 2-layer MLP."""
    D, F = v.hidden_size, v.intermediate_size
    return linear(n, D, 3 * D) + attn(n, n, D) + linear(n, D, D) + linear(n, D, F) + linear(n, F, D)


def map_head(v, n, B):
    """SigLIP's attention-pooling head for B images of n tokens: the probe's query is one row per batch."""
    D, F = v.hidden_size, v.intermediate_size
    return linear(1, D, D) + B * (linear(n, D, 2 * D) + attn(1, n, D) + linear(1, D, D) + linear(1, D, F)
                                  + linear(1, F, D))


def attn_projection(d_in, d_out, n, attn_path=True):
    """tokenizer.AttnProjection on n tokens: linear path, the optional attention path (heads of width
    min(d_in, d_out) spanning max(d_in, d_out)), then the GeGLU at d_out."""
    wide = max(d_in, d_out)
    f = linear(n, d_in, d_out) + 2 * linear(n, d_out, 2 * d_out) + linear(n, 2 * d_out, d_out)
    if attn_path:
        f += linear(n, d_in, 3 * wide) + attn(n, n, wide) + linear(n, d_out, d_out)
    return f


def resblock(res, c_in, c_out, k1=3):
    f = conv(res * res, c_in, c_out, k1) + conv(res * res, c_out, c_out, 3)
    return f + (conv(res * res, c_in, c_out, 1) if c_in != c_out else 0)


def attn_block(res, c):
    """The decoder's single-head attention over res x res positions with 1x1-conv q, k, v, out."""
    return 4 * conv(res * res, c, c, 1) + attn(res * res, res * res, c)


def decoder(d):
    """tokenizer.Decoder for one image, walking the levels as its __init__ builds them."""
    n = len(d.ch_mult)
    c, res = d.ch * d.ch_mult[-1], d.resolution // 2 ** (n - 1)
    lat = res
    f = conv(res * res, d.latent_channels, c, 3) + 2 * resblock(res, c, c) + attn_block(res, c)
    for i in reversed(range(n)):
        c_out = d.ch * d.ch_mult[i]
        for _ in range(d.num_res_blocks + 1):
            f += resblock(res, c, c_out)
            c = c_out
            if res in d.attn_resolutions:
                f += attn_block(res, c)
        if i != 0:
            res *= 2
            f += conv(res * res, c, c, 3)  # Upsample: nearest x2, then a 3x3 conv at the new size
    f += conv(res * res, c, d.out_ch, 3)
    if d.patch_skip:
        up = 2 ** (n - 1)
        f += conv(lat * lat, d.latent_channels, d.patch_skip, 1) + conv(lat * lat, d.patch_skip, d.out_ch * up * up, 1)
    return f


def lpips(R, chns=VGG16_CHANNELS):
    """losses.LPIPS on one (x, x_hat) pair of R x R images: VGG16's convs up to relu5_3 on both images
    (one batch of 2), and the 1x1 linear heads on the squared differences."""
    f, c_in, res = 0, 3, R
    for stage, (c, n) in enumerate(zip(chns, VGG16_CONVS)):
        if stage:
            res //= 2  # MaxPool2d(2, 2)
        for _ in range(n):
            f += 2 * conv(res * res, c_in, c, 3)
            c_in = c
        f += conv(res * res, c, 1, 1)
    return f


def tokenizer_step(cfg, B, with_lpips=False):
    """One training step of a DualToken (tokenizer.DualTokenConfig) on B images: the frozen teacher's
    forward (semantic targets), the tokenizer forward and backward, LPIPS when on; the GAN off (the first
    quarter of the released schedule). Semantic branch off: no teacher, and only the blocks the pixel
    branch reads run."""
    v, g = cfg.siglip.vision, cfg.grid
    N, D, L = g * g, v.hidden_size, v.num_hidden_layers
    cp, cs = cfg.vq_pix.code_dim, cfg.vq_sem.code_dim
    sem, own_sem = cfg.semantic_branch, cfg.semantic_branch and not cfg.tie_branches
    blocks = L if sem else max(cfg.layer_recon, cfg.layer_shortcut or 0)
    patch = B * conv(N, v.num_channels, D, v.patch_size)
    # the patch embedding reads pixels: forward + weight gradient, when its output is used (some block
    # runs); layer_recon 0 adds a second patch pass (patchify) that the pixel branch reads directly
    vit = 3 * (B * blocks * vit_block(v, N) + (map_head(v, N, B) if sem else 0))
    vit += patch * (2 if blocks else 1) + 2 * patch * (cfg.layer_recon == 0)
    proj = attn_projection(D, cp, N, cfg.pix_attn) + attn_projection(cp, D, N, cfg.pix_attn)
    if cfg.layer_shortcut is not None:
        proj += attn_projection(D, cp, N)
    if own_sem:
        proj += attn_projection(D, cs, N)
    if sem:
        proj += attn_projection(cp if cfg.tie_branches else cs, D, N)
    lat = cfg.decoder_latent_shape[0] if cfg.decoder_latent_shape else g
    dec = resblock(lat, D, cfg.decoder.latent_channels, k1=1) + decoder(cfg.decoder)  # post-quant ResBlock first
    # nearest-code search, no gradient: one (N, K) distance product per depth per quantizer
    search = cfg.vq_pix.depth * linear(B * N, cp, cfg.vq_pix.codebook_size)
    if own_sem:
        search += cfg.vq_sem.depth * linear(B * N, cs, cfg.vq_sem.codebook_size)
    out = {"vit": vit, "projections": 3 * B * proj, "decoder": 3 * B * dec, "rvq_search": search}
    if sem:
        out["teacher"] = patch + B * L * vit_block(v, N) + map_head(v, N, B)
    if with_lpips:
        out["lpips"] = 2 * B * lpips(v.image_size)  # frozen VGG: forward + the input gradient
    return out

# -----------------------------------------------------------------------------
# the MLLM (mllm.MLLM trained as train_mllm.py does with trainable="all")


def llm_layer(cfg, n):
    """One trunk layer on n tokens of sequences of length T is llm_layer(n) + T x attention (see mllm_step)."""
    C, hd, I = cfg.n_embd, cfg.head_dim or cfg.n_embd // cfg.n_head, cfg.intermediate_size
    q, kv = cfg.n_head * hd, cfg.n_kv_head * hd
    return linear(n, C, q) + 2 * linear(n, C, kv) + linear(n, q, C) + 3 * linear(n, C, I)


def depth_head(cfg, M, K, d, D):
    """-> (forward FLOPs with input gradients, forward FLOPs fed by the frozen books) of one depth head on
    M target positions: hidden-state projection, code inputs for depths 2..D, the causal transformer over
    the D depths, one classifier per depth (plus the code-distance logits with head_code_logits)."""
    Ch = cfg.head_n_embd or cfg.n_embd
    blk = 4 * linear(D, Ch, Ch) + 3 * linear(D, Ch, 4 * Ch) + attn(D, D, Ch)  # GQA-free: q, k, v, o all Ch
    f3 = M * (linear(1, cfg.n_embd, Ch) + linear(1, Ch, Ch) + cfg.head_n_layer * blk + D * linear(1, Ch, K))
    f2 = M * linear(D - 1, d, Ch)
    if cfg.head_code_logits:
        f3 += M * D * linear(1, Ch, d)
        f2 += M * D * linear(1, d, K)  # z @ codebook^T: the gradient reaches z only
    return f3, f2


def mllm_step(cfg, B, T, n_img, n_gen):
    """One training step of an MLLM (mllm.MLLMConfig) on B sequences of T positions (padding included:
    the trunk computes it), n_img image positions read through the projector, n_gen of them with trained
    codes (depth heads, and the caption / grounding heads when gen_caption_loss / gen_ground_loss > 0)."""
    C, hd = cfg.n_embd, cfg.head_dim or cfg.n_embd // cfg.n_head
    trunk = cfg.n_layer * (llm_layer(cfg, B * T) + B * attn(T, T, cfg.n_head * hd))
    out = {"trunk": 3 * trunk, "lm_head": 3 * linear(B * T, C, cfg.vocab_size),
           # the projector reads the frozen books' vectors: no input gradient, unless its LayerNorm (vis_norm,
           # trainable) comes first
           "vis_in": (3 if cfg.vis_norm else 2) * linear(n_img, cfg.pix_dim + cfg.sem_dim, C) + 3 * linear(n_img, C, C)}
    heads = [(cfg.pix_vocab, cfg.pix_dim, cfg.pix_depth)] + ([(cfg.sem_vocab, cfg.sem_dim, cfg.sem_depth)]
                                                             if cfg.gen_sem else [])
    f3f2 = [depth_head(cfg, n_gen, *h) for h in heads]
    out["depth_heads"] = sum(3 * a + 2 * b for a, b in f3f2)
    if cfg.gen_caption_loss > 0:
        out["caption_head"] = 3 * linear(n_gen, C, cfg.vocab_size)
    if cfg.gen_ground_loss > 0:  # on the states that predict codes (n_gen of them in a batch without padding)
        out["ground_head"] = 3 * linear(n_gen, C, cfg.vocab_size)
    return out
