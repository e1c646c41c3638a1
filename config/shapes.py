# The shapes pipeline: one preset for every stage (python train_<stage>.py config/shapes.py).
# Each `<section>_config` dict applies only to the script whose config class has that SECTION.

# SigLIP teacher (train_siglip.py). 64 px images with patch 8 -> an 8x8 grid of 64 tokens: the
# DualToken tokenizer initialises from this tower and reconstructs from those 64 positions, so each
# token covers 8x8 pixels; a coarser grid (32 px / patch 8 -> 4x4) would need 16x16 pixels per token and
# blur the small (~10 px) objects, a finer one (patch 4 -> 256 tokens) costs 4x the attention and
# sequence length downstream for the MLLM. Widths are sized for ~3 minutes on 2 free CPU cores.
siglip_config = dict(
    out_dir="out-shapes/siglip",
    image_size=64,
    patch_size=8,
    vision_width=128,
    vision_layers=4,
    vision_heads=4,
    text_width=128,
    text_layers=2,
    text_heads=4,
    max_len=96,       # byte tokens: a two-object caption is at most 91 bytes + eos
    batch_size=64,
    micro_batch=64,
    max_steps=300,
    warmup=30,
    lr=2e-3,
    min_lr=1e-4,
    eval_interval=100,
    ckpt_interval=100,
)

# DualToken tokenizer (train_tokenizer.py), initialised from and distilled to the teacher above. The
# teacher has 4 blocks: pixel codes from block 1 (the "first quarter" rule; no earlier block for the
# released 0.6 shortcut), semantic codes from block 3 (second-to-last, as 26 of 27), re-entering block 4.
# 8x8 grid x depth 4 from one 512-code book per branch (code width 32 = SigLIP width 96 / 3 heads).
# The decoder is the released layout shrunk to the floor GroupNorm(32) allows: 32/64 channels, one
# ResBlock per level, 8 -> 16 -> 32 -> 64 px; its full-resolution convs are most of the compute.
# CPU choices (not the release): trainable="after_sem" (patch/pos embeddings and blocks 1-3 frozen, so the
# pixel branch reads fixed features and only block 4 + the head adapt to the quantized input: about half
# the backward), lr 2e-3 instead of 7.2e-5 for a few hundred steps, LPIPS and GAN off (flat-colour images
# are scored by PSNR; LPIPS's VGG would cost more than the whole tokenizer here).
tokenizer_config = dict(
    out_dir="out-shapes/tokenizer",
    init_from="out-shapes/siglip",
    max_objects=2,
    eval_size=540,
    layer_recon=1,
    layer_shortcut=None,
    layer_sem=3,
    codebook_size=512,
    code_dim=32,
    depth=4,
    dec_ch=32,
    dec_ch_mult=(1, 1, 2, 2),
    dec_num_res_blocks=0,
    dec_attn_resolutions=(),
    dec_latent_channels=64,
    trainable="after_sem",
    batch_size=16,
    micro_batch=16,
    max_steps=240,
    warmup=10,
    lr=2e-3,
    min_lr=1e-4,
    log_interval=10,
    image_interval=60,
    eval_interval=240,
    ckpt_interval=60,
)
