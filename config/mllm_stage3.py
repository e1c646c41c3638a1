# MLLM stage 3 (paper 3.4): LLM frozen, output projectors + depth heads learn text-to-image.
#   torchrun --standalone --nproc_per_node=8 train_mllm.py config/mllm_stage3.py --tokenizer=/path/to/dualtoken \
#       --init_from=out-mllm/stage2 --text_tokenizer=/path/to/Qwen2.5-3B/tokenizer.json \
#       --data=/path/to/captions.jsonl --eval_data=/path/to/val.jsonl
# Paper: lr 1e-4, batch 128; sampling as VILA-U: temperature 1, top-k 900, top-p 0.96, CFG 3.
out_dir = "out-mllm/stage3"
trainable = "output"
mix = (0.0, 0.0, 1.0)
caption_dropout = 0.1
lr = 1e-4
vis_lr = 1e-4
batch_size = 128
micro_batch = 4
max_steps = 10_000
warmup = 500
head_n_layer = 3
temperature = 1.0
top_k = 900
top_p = 0.96
cfg_scale = 3.0
sample_interval = 1000
ckpt_interval = 1000
eval_qa = 0
eval_gen = 64
