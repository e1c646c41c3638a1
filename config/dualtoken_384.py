# The released 384-px DualToken tokenizer recipe (design §1-§3) for train_tokenizer.py on GPUs:
#   torchrun --standalone --nproc_per_node=8 train_tokenizer.py config/dualtoken_384.py \
#       --init_from=/path/to/siglip2-so400m-patch14-384 --data=/path/to/cc12m.jsonl \
#       --lpips_vgg_path=/path/to/vgg16-397923af.pth --lpips_lin_path=/path/to/lpips_v0.1_vgg.pth
# init_from is any HF-format SigLIP folder (the released code uses SigLIP2-So400m/14-384, the paper
# SigLIP v1 So/14-384); it is both the initialisation and the frozen teacher. data: image-caption
# folder / .jsonl or an ImageFolder root (captions are not used by this stage).
tokenizer_config = dict(
    out_dir="out-dualtoken-384",
    layer_recon=6,          # pixel branch: block 6 ...
    layer_shortcut=4,       # ... + 0.6 x block 4 (released code only)
    weight_shortcut=0.6,
    layer_sem=26,           # semantic branch: block 26 of 27; its codes re-enter block 27
    vq_pix=dict(codebook_size=16384, code_dim=32, depth=8),
    vq_sem=dict(codebook_size=16384, code_dim=32, depth=8),
    # decoder levels 24:1024, 48:512, 96:512, 192:128, 384:128 channels, 3 ResBlocks per level
    decoder=dict(ch=128, ch_mult=(1, 1, 4, 4, 8), num_res_blocks=2, attn_resolutions=(24,),
                 latent_channels=1024),
    trainable="vision",     # released stage 1: the whole vision tower
    batch_size=256,         # released code (the paper's table says 64)
    micro_batch=16,         # 8 GPUs x 16 x accumulation 2; the 384-px decoder activations dominate memory
    lr=7.2e-5,
    min_lr=0.0,
    warmup=10_000,
    # not stated by the release: ~2 epochs of CC12M (~12M pairs) at batch 256
    max_steps=94_000,
    gan_start=23_000,       # "after half an epoch" of CC12M at batch 256
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
