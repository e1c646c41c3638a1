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
