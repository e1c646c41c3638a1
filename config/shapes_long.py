# The shapes pipeline trained longer: apply after the quick-start preset, for the tokenizer and MLLM stages.
#   python train_tokenizer.py config/shapes.py config/shapes_long.py
#   python train_mllm.py config/shapes.py config/shapes_long.py
# Measured on the idle 2-core dev CPU, 2026-11-30 (docs/experiments.md, one run each):
# - tokenizer, 2000 steps (6.2 min): 33.4 dB / SSIM 0.974, zero-shot 99.3 % (teacher 99.4 %), ceiling (the
#   checker on decodings of true codes) 0.90 (1000 steps, the quick start: 0.72);
# - MLLM, 15000 steps (28 min), on a 1000-step tokenizer of the same recipe: held-out QA 0.885, generation
#   0.01-0.06. The MLLM on this 2000-step tokenizer was not run end to end.
tokenizer_config = dict(
    out_dir="out-shapes/tokenizer-long",
    max_steps=2000,
    eval_interval=2000,
    image_interval=1000,
    ckpt_interval=1000,
)
mllm_config = dict(
    out_dir="out-shapes/mllm-long",
    tokenizer="out-shapes/tokenizer-long",
    max_steps=15000,
    eval_interval=1500,
    sample_interval=3000,
    ckpt_interval=1500,
)
