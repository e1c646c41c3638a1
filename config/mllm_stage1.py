# MLLM stage 1 (paper 3.4): LLM frozen, the visual input projector learns to read dual codes from captions.
#   torchrun --standalone --nproc_per_node=8 train_mllm.py config/mllm_stage1.py \
#       --tokenizer=/path/to/dualtoken --init_from=/path/to/Qwen2.5-3B --text_tokenizer=/path/to/Qwen2.5-3B/tokenizer.json \
#       --data=/path/to/captions.jsonl --eval_data=/path/to/val.jsonl
# Paper: lr 1e-3, batch 64. Steps are not given in the paper: set max_steps for your data.
out_dir = "out-mllm/stage1"
trainable = "input"
mix = (0.0, 1.0, 0.0)        # captioning only
lr = 1e-3
vis_lr = 1e-3
batch_size = 64
micro_batch = 8
max_steps = 10_000
warmup = 500
head_n_layer = 3             # paper: 3-layer depth transformers (untrained in this stage)
weight_decay = 0.0
sample_interval = 1000
ckpt_interval = 1000
eval_qa = 200
eval_gen = 0
