# The shapes pipeline trained longer: apply after the quick-start preset, for the tokenizer and MLLM stages.
#   python train_tokenizer.py config/shapes.py config/shapes_long.py
#   python train_mllm.py config/shapes.py config/shapes_long.py
# Measured on the 2-core dev CPU, 2026-11-30 (docs/experiments.md, one run each):
# - tokenizer, 2000 steps (6.2 min): 33.4 dB / SSIM 0.974, zero-shot 99.3 % (teacher 99.4 %), ceiling (the
#   checker on decodings of true codes) 0.90-0.91 (1000 steps, the quick start: 0.72);
# - MLLM, 15000 steps (32 min) on that tokenizer with the preset's caption-word and grounding losses
#   (code of the commit after a439f9f): eval.py mllm QA 0.820, generation all-correct 0.50 (CFG 1.5,
#   depths 2.. greedy; 0.43 unguided). Without the grounding loss: QA 0.819, generation 0.41.
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
