"""
The frozen image tokenizer (a tokenizer.DualToken) as the MLLM's codec: images -> the codes the MLLM reads
(image_codes: the code cache, eval.py and sample.py all take codes from here), the codes it draws -> images
(generate_images, with the sampler's settings a run records), and torch.compile of its heavy parts. Like
mllm.py, this file imports no vision code: the tokenizer is passed in.
"""
import torch

from sequences import gen_prompt

# ----------------------------------------------------------------------------------------------------
# the image sampler's settings

SAMPLING_KEYS = ("cfg_scale", "temperature", "fine_temperature", "top_k", "top_p")
PAPER_SAMPLING = dict(cfg_scale=3.0, temperature=1.0, fine_temperature=None, top_k=None, top_p=None)


def sampling_settings(cfg, info):
    """The image sampler: each of SAMPLING_KEYS set on cfg (not None), else what the MLLM's trainer
    recorded in its config.json ("sampling": what its own evaluation drew with), else PAPER_SAMPLING.
    Off switches on the command line: cfg_scale <= 0, top_k <= 0, top_p outside (0, 1), fine_temperature < 0
    (= temperature)."""
    rec = {**PAPER_SAMPLING, **(info.get("sampling") or {})}
    s = {k: rec[k] if getattr(cfg, k) is None else getattr(cfg, k) for k in SAMPLING_KEYS}
    off = dict(cfg_scale=lambda v: v <= 0, top_k=lambda v: v <= 0, top_p=lambda v: not 0 < v < 1,
               fine_temperature=lambda v: v < 0, temperature=lambda v: False)
    return {k: None if v is not None and off[k](v) else v for k, v in s.items()}


# ----------------------------------------------------------------------------------------------------
# images <-> codes

def two_vocabularies(image_tok):
    """True when the image tokenizer has a semantic code stack of its own (the released layout); False for
    one vocabulary: tied branches (one RVQ at the deep layer, decoded and distilled: VILA-U-like) or no
    semantic branch. Such a tokenizer gives the MLLM pixel codes only (image_codes' sem is None)."""
    return image_tok.quantizer_sem is not None


@torch.no_grad()
def image_codes(image_tok, x):
    """(B, 3, R, R) -> (pix (B, N, Dp), sem (B, N, Ds)) in raster order, what the MLLM reads: the code cache
    (train_mllm.py), eval.py's QA / caption swap and sample.py answer take codes from here (eval.py's
    tokenizer ceiling and sample.py reconstruct call DualToken.encode itself). DualToken.encode runs in fp32
    with autocast off, so codes do not depend on the caller's autocast (bf16 changes deep residual codes).
    sem is None for a one-vocabulary tokenizer (two_vocabularies): a tied one's semantic codes ARE its pixel codes."""
    pix, sem = image_tok.encode(x)  # (B, h, w, D) each
    return pix.flatten(1, 2), sem.flatten(1, 2) if two_vocabularies(image_tok) else None


def compile_tokenizer(image_tok):
    """sample.py / eval.py --compile=True: torch.compile, in place, the image tokenizer's heavy fixed-shape
    parts: each SigLIP block (dynamo serves all blocks of one shape from one graph), the pre- / post-quant
    projections, the post-quant ResBlock and the conv decoder. Module.compile keeps parameter names. The
    quantizers' search loop runs eagerly between them. The MLLM's decoding is compiled apart, step by step
    (MLLM.generate_image's compile_decode: decode.py)."""
    t = image_tok
    parts = [*t.siglip.vision.blocks, t.prequant_pix, t.prequant_shortcut, t.prequant_sem, t.postquant_pix,
             t.postquant_sem, t.post_quant_conv, t.decoder]
    for m in parts:
        if m is not None:
            m.compile()
    return image_tok


@torch.no_grad()
def generate_images(model, image_tok, text_tok, captions, generator=None, batch_size=16, **sampling):
    """Captions -> decoded images (B, 3, R, R) in about [-1, 1], one per caption, and the pixel codes
    (B, h, w, Dp). Only the pixel codes are decoded (design §5). sampling: MLLM.generate_image's
    cfg_scale (None = no guidance), temperature, fine_temperature, top_k, top_p, compile_decode."""
    g = image_tok.config.grid
    images, codes = [], []
    for i in range(0, len(captions), batch_size):
        prompts = [gen_prompt(text_tok, c) for c in captions[i:i + batch_size]]
        pix, _ = model.generate_image(prompts, g * g, generator=generator, **sampling)
        pix = pix.view(len(prompts), g, g, -1)  # (B, h, w, Dp)
        images.append(image_tok.decode(pix.to(next(image_tok.parameters()).device)).float())
        codes.append(pix)
    return torch.cat(images), torch.cat(codes)

