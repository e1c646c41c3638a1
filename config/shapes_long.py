# The shapes pipeline trained longer: apply after the quick-start preset, for the tokenizer and MLLM stages.
#   python train_tokenizer.py config/shapes.py config/shapes_long.py
#   python train_mllm.py config/shapes.py config/shapes_long.py
# Measured 2026-12-01 at commit 2899a1a (docs/experiments.md, one run each) on a 2-core Intel Xeon VM:
# - tokenizer, 2000 steps (312 s): 33.3 dB / SSIM 0.972, zero-shot 99.6 % (teacher 99.6 %), ceiling (the
#   checker on decodings of true codes) 0.92 (the quick start's 1000 steps: 0.60-0.72);
# - MLLM, 30000 steps (53 min, cosine over the 30000) on that tokenizer: eval.py mllm QA 0.863 (one object
#   0.99, two 0.79), generation all-correct 0.67 with CFG 1.5 at temperature 1 (depths 2.. greedy; 0.70
#   unguided; 0.76 of 300 captions with the sampler recorded below). Issue 15's targets (QA >= 0.95,
#   generation >= 0.80) are not reached; the curve rose to the end (trainer's eval: QA 0.67 / 0.74 / 0.84
#   / 0.85 / 0.88 / 0.90, generation 0.01 / 0.33 / 0.51 / 0.58 / 0.63 / 0.65 at 5 / 11 / 22 / 27 / 36 / 53
#   min). At 15000 steps (2026-11-30): QA 0.820, generation 0.50.
# - 2026-12-01, MLLM trained at d63e1ca, eval.py of a6e02a3, the 2-core Intel Xeon VM: 45000 steps on 40000
#   cached images (4536 s incl. its evals): eval.py mllm
#   QA 0.925 (one object 1.00, two 0.885; position 0.80, every other type >= 0.88), generation all-correct
#   0.89 with CFG 1.2 / T 0.6 (0.93 unguided; 300 captions: 0.877 both), ceiling 0.92-0.94. Generation and
#   ceiling targets met; QA (>= 0.95) not. docs/experiments.md.
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
    max_steps=45000,
    train_size=40000,            # 10x the quick start's: on 4000 the long run memorised (train QA 0.968, val 0.921)
    eval_interval=3000,
    sample_interval=6000,
    ckpt_interval=3000,
    # the sampler this run records (eval.py / sample.py default to it): CFG 1.2 at temperature 0.6, depths
    # 2.. greedy. Measured on the 30000-step model and on its continuation (eval.py mllm, 300 val captions,
    # seed 0, docs/experiments.md 2026-12-01; chosen on those same captions among 5 settings): all
    # attributes right 0.76 / 0.76, against 0.65 / 0.62 with the quick-start preset's CFG 1.5 at
    # temperature 1 (extra objects per image 0.05-0.07 against 0.24-0.29) and 0.74 / 0.74 unguided at 0.6
    cfg_scale=1.2,
    temperature=0.6,
)
