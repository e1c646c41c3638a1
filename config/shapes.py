# The shapes pipeline: one preset for every stage (python train_<stage>.py config/shapes.py).
# Each `<section>_config` dict applies only to the script whose config class has that SECTION.

# SigLIP teacher (train_siglip.py). 48 px images with patch 8 -> a 6x6 grid of 36 tokens, and each of the
# world's 3x3 cells is exactly 2x2 patches: an object never straddles a patch boundary that cuts through its
# cell, so the patch embedding sees each object in the same framing every time. Measured on 2 idle cores:
# at 64 px / patch 8 (cells of 21.3 px cut across patches) the same tower reached 46-48 % zero-shot in
# 300 steps (shape near chance, colour 99.6 %; a linear probe on its embedding read shape at 48 %), at 48 px
# it reached 97 % at step 300 and 99-100 % from step 400. The DualToken tokenizer initialises from this
# tower and reconstructs from those 36 positions (8x8 pixels per token).
siglip_config = dict(
    out_dir="out-shapes/siglip",
    image_size=48,
    patch_size=8,
    vision_width=96,
    vision_layers=4,
    vision_heads=4,   # head dim 24
    text_width=64,    # short, templated captions need little text capacity; projected to 96
    text_layers=2,
    text_heads=2,
    max_objects=1,    # measured at 64 px: one object per image learned ~4x faster than 1-2 (37% vs 9%
                      # zero-shot at step 120)
    caption_drop=0.5, # each object's size / position phrase dropped with p=0.5 ("a red circle" too)
    max_len=48,       # byte tokens: a one-object caption is at most 43 bytes + eos
    batch_size=64,
    micro_batch=64,
    max_steps=500,
    warmup=40,
    lr=1e-3,
    min_lr=1e-4,
    eval_interval=100,
    ckpt_interval=100,
    threads=0,        # torch's default: both cores (fastest on idle cores; 1 on a busy shared box)
)

# DualToken tokenizer (train_tokenizer.py), initialised from and distilled to the teacher above. The
# teacher has 4 blocks: pixel codes from block 1 (the "first quarter" rule; no earlier block for the
# released 0.6 shortcut), semantic codes from block 3 (second-to-last, as 26 of 27), re-entering block 4.
# 6x6 grid x depth 6 from one 512-code book per branch (code width 32 = SigLIP width 96 / 3 heads; depth 4
# measured 25.3 dB, depth 6 25.9 dB without the skip below, at the same speed, in the previous session).
# The decoder is the released layout shrunk to the floor GroupNorm(32) allows: 32/64 channels, one
# ResBlock per level, 6 -> 12 -> 24 -> 48 px; its full-resolution convs are most of the compute (~75 % of
# a step, profiled). Not in the release: dec_patch_skip=256, a per-cell MLP that paints each token's 8x8
# patch, added to the conv output (tokenizer.Decoder; 25.9 -> 28.0 dB at 450 steps, one run each).
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
    depth=6,
    dec_ch=32,
    dec_ch_mult=(1, 1, 2, 2),
    dec_num_res_blocks=0,
    dec_attn_resolutions=(),
    dec_latent_channels=64,
    dec_patch_skip=256,
    trainable="after_sem",
    batch_size=16,
    micro_batch=16,
    max_steps=500,    # 450 steps: 27.99 dB, 500: 28.28 dB (one run each, same teacher); ~4.5 min
    warmup=20,
    lr=2e-3,
    min_lr=1e-4,
    log_interval=10,
    image_interval=250,
    eval_interval=500,
    ckpt_interval=250,
)

# The unified MLLM (train_mllm.py) on the tokenizer above: a from-scratch tiny LLM trained on all three
# sample kinds at once (paper stages 1-4 collapsed into one "all" stage: nothing is pretrained here, so
# there is no LLM to protect by freezing). Byte-level text; the code cache holds 4000 train images (each
# seen several times with different questions / caption dropout) + 200 held-out val images.
# CPU choices (not the paper): width 128 x 4 layers, ONE-layer depth heads of width 96 (the paper has 3;
# the heads run 36 positions x 6 depths x 2 stacks per generated image and dominate the cost), 4 questions
# per understanding image (the 38 image tokens are paid once), lr 3e-3, torch's default threads (on idle
# cores 2 threads ran 1.6x faster than 1; on a loaded shared box 1 thread was faster: set threads=1 there).
mllm_config = dict(
    out_dir="out-shapes/mllm",
    tokenizer="out-shapes/tokenizer",
    max_objects=2,
    train_size=4000,
    eval_size=200,
    n_layer=4,
    n_embd=128,
    n_head=4,
    n_kv_head=2,
    intermediate_size=384,
    head_n_layer=1,
    head_n_embd=96,
    head_n_head=2,
    mix=(0.35, 0.1, 0.55),
    qa_per_image=4,
    caption_dropout=0.1,
    batch_size=16,
    micro_batch=16,
    max_steps=420,    # 600 until the tokenizer took 500 steps; 540 measured 923 s for the quick start
    warmup=20,
    lr=3e-3,
    weight_decay=0.0,
    eval_qa=200,
    eval_gen=100,
    eval_batch=50,
    threads=0,
    log_interval=10,
    sample_interval=100,
    ckpt_interval=100,
)
