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
# teacher has 4 blocks: semantic codes from block 3 (second-to-last, as 26 of 27), re-entering block 4.
# Not in the release, chosen for generation (docs/experiments.md, 2026-11-30):
# - pixel codes from the patch embedding before positions (layer_recon=0) through per-token projections
#   (pix_attn=False): a code stack is a function of its own 8x8 patch, so a flat background gets one stack
#   per colour (5 stacks for 2872 background patches of 5 colours; after block 1 with attention,
#   a user's report: 4678 for 4889) and an object's codes do not depend on the rest of the image;
# - a codebook per depth (shared_codebook=False): coarse to fine, the first code alone gets the checker's
#   colour right on 80 % of decodings and all attributes on 36 % (2 codes: 66 %), against 21 % / 1.5 % with
#   one shared book, whose first depth used 15 of 512 codes;
# - 1000 steps (500 gave the checker 0.54 on decodings of true codes, 1000 gave 0.72-0.74).
# The decoder is the released layout shrunk to the floor GroupNorm(32) allows (32/64 channels, one ResBlock
# per level, 6 -> 12 -> 24 -> 48 px) plus decoder patch_skip=256, a per-cell MLP that paints each token's 8x8
# patch (tokenizer.Decoder). CPU choices (not the release): trainable="after_sem" (patch/pos embeddings
# and blocks 1-3 frozen), lr 2e-3 for a few hundred steps, LPIPS and GAN off.
tokenizer_config = dict(
    out_dir="out-shapes/tokenizer",
    init_from="out-shapes/siglip",
    max_objects=2,
    eval_size=540,
    layer_recon=0,
    layer_shortcut=None,
    pix_attn=False,
    layer_sem=3,
    vq_pix=dict(codebook_size=512, code_dim=32, depth=6, shared_codebook=False),
    vq_sem=dict(codebook_size=512, code_dim=32, depth=6, shared_codebook=False),
    decoder=dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=0, attn_resolutions=(), latent_channels=64,
                 patch_skip=256),
    trainable="after_sem",
    batch_size=16,
    micro_batch=16,
    max_steps=1000,
    warmup=20,
    lr=2e-3,
    min_lr=1e-4,
    log_interval=10,
    image_interval=500,
    eval_interval=1000,
    ckpt_interval=500,
)

# The unified MLLM (train_mllm.py) on the tokenizer above: a from-scratch tiny LLM trained on all three
# sample kinds at once (paper stages 1-4 collapsed into one "all" stage: nothing is pretrained here, so
# there is no LLM to protect by freezing). The code cache holds 4000 train images (each seen several times
# with different questions / caption dropout) + 200 held-out val images. Not in the paper, each measured
# in docs/experiments.md (2026-11-30):
# - text_tokenizer="words": the world's closed vocabulary (59 words + 7 specials) instead of 263 bytes;
# - vis_norm + image_pos=36: a normalised projector (its output no longer grows into a large constant the
#   trunk ignores) and a learned table of the 36 image positions; each off alone (2 seeds, 2000 steps): QA
#   0.626 against 0.656 and drawings 0.05 against 0.12 without vis_norm, position questions 0.15 against 0.29
#   without image_pos (docs/experiments.md, "the demo's MLLM switches");
# - head_code_logits=True: depth classifiers also score codes by distance to the frozen books; off, no caption
#   was drawn right in either seed (same section);
# - gen_caption_loss=1.0: each generated image position also predicts its caption's words. Without it the
#   caption's colour never reached the state that draws an object's first patch (linear probe 0.16, chance;
#   swapping the colour word left the code loss unchanged) and drawn colours were chance (0.12-0.25); with
#   it, at 6000 steps: probe 1.00, the swap costs 2.1 nats on that patch, drawn colour 0.44;
# - gen_ground_loss=1.0: the state that draws a patch also predicts the words of the object in its cell
#   (none: background). At 3000 steps: generation 0.18 and 0.05 in two runs against 0.02-0.06 in three
#   runs without it; at 15000 steps 0.50 against 0.41; QA unchanged (docs/experiments.md, 2026-11-30);
# - lr 1e-3 with weight decay 0.1 (3e-3 was worse), code losses 1/6 per stack (a mean over the 6 depths).
# Generated images carry both code stacks, as in the paper (gen_sem=True, the default): at equal steps it drew
# 0.41 of captions right against 0.19 for pixel codes only, and in the quick start's wall time (3400 of its
# steps cost what 4500 pixel-only steps do) QA 0.73 / drawings 0.20 against 0.70 / 0.16 (docs/experiments.md,
# "why two vocabularies": the rows dual / pix_gen and "the quick start at equal wall time").
# CPU choices: width 128 x 4 layers, ONE-layer depth heads of width 96 (the paper has 3), 4 questions per
# understanding image, torch's default threads; 3400 steps, where the quick start's 15 minutes end with a
# margin.
# Longer: config/shapes_long.py.
mllm_config = dict(
    out_dir="out-shapes/mllm",
    tokenizer="out-shapes/tokenizer",
    max_objects=2,
    train_size=4000,
    eval_size=200,
    text_tokenizer="words",
    n_layer=4,
    n_embd=128,
    n_head=4,
    n_kv_head=2,
    intermediate_size=384,
    head_n_layer=1,
    head_n_embd=96,
    head_n_head=2,
    vis_norm=True,
    image_pos=36,
    head_code_logits=True,
    gen_caption_loss=1.0,
    gen_ground_loss=1.0,
    # the sampler this run records (eval.py / sample.py default to it; the paper's is CFG 3, temperature 1).
    # Measured on the 15000-step model (100 val captions, seed 0, docs/experiments.md 2026-11-30): all
    # attributes right 0.16 at CFG 3 (1.7 extra objects per image), 0.34 unguided, 0.38 at CFG 1.5, 0.41
    # at CFG 1.5 with depths 2.. greedy; on the 3000-step quick start all settings gave 0.02-0.05
    cfg_scale=1.5,
    fine_temperature=0.0,
    mix=(0.35, 0.1, 0.55),
    qa_per_image=4,
    caption_dropout=0.1,
    pix_loss_weight=1 / 6,
    sem_loss_weight=1 / 6,
    batch_size=16,
    micro_batch=16,
    max_steps=3400,
    warmup=20,
    lr=1e-3,
    weight_decay=0.1,
    eval_qa=20,                  # held-out images, every question of each (~200 questions; eval.py asks 100 images)
    eval_gen=100,
    eval_batch=50,
    threads=0,
    log_interval=10,
    sample_interval=1500,
    ckpt_interval=500,
)
