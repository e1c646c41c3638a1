# The released 256-px DualToken tokenizer recipe for train_tokenizer.py on GPUs:
#   torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/dualtoken_256.py \
#       --init_from=/path/to/siglip2-so400m-patch16-256 --data=/path/to/cc12m.jsonl \
#       --lpips_vgg_path=/path/to/vgg16-397923af.pth --lpips_lin_path=/path/to/lpips_v0.1_vgg.pth
# SigLIP2-So400m/16 at 256 px: a 16x16 grid (256 tokens), depth 4 (the paper says 8, the release 4),
# decoder latent 16x16 so no resize, attention at 16; otherwise the 384 recipe.
tokenizer_config = dict(
    out_dir="out-dualtoken-256",
    layer_recon=6,
    layer_shortcut=4,
    weight_shortcut=0.6,
    layer_sem=26,
    vq_pix=dict(codebook_size=16384, code_dim=32, depth=4),
    vq_sem=dict(codebook_size=16384, code_dim=32, depth=4),
    decoder=dict(ch=128, ch_mult=(1, 1, 4, 4, 8), num_res_blocks=2, attn_resolutions=(16,),
                 latent_channels=1024),  # 256 / 2^4 = 16: five levels 16:1024, 32:512, 64:512, 128:128, 256:128
    trainable="vision",
    batch_size=256,
    micro_batch=32,         # 8 GPUs x 32, no accumulation
    lr=7.2e-5,
    min_lr=0.0,
    warmup=10_000,
    max_steps=94_000,       # not stated by the release: ~2 epochs of CC12M at batch 256
    gan_start=23_000,       # "after half an epoch"
    disc_lr=7.2e-5,
    weight_decay=1e-4,
    beta1=0.5,
    beta2=0.9,
    grad_clip=0.0,
    dtype="bfloat16",
    num_workers=8,
    log_interval=20,
    image_interval=1000,
    eval_interval=5000,
    ckpt_interval=1000,
)
