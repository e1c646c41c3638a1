# The shapes MLLM trained longer: apply after the quick-start preset, for the MLLM stage only.
#   python train_mllm.py config/shapes.py config/shapes_long.py
# Same tokenizer, model and recipe as config/shapes.py; 5x the steps (about 30 min on 2 cores), with the
# held-out evaluation every 1500 steps in out-shapes/mllm-long/log.jsonl (the curve of QA and generation
# against CPU minutes in docs/experiments.md comes from this run).
mllm_config = dict(
    out_dir="out-shapes/mllm-long",
    max_steps=15000,
    eval_interval=1500,
    sample_interval=3000,
    ckpt_interval=1500,
)
