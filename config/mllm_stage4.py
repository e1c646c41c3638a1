# MLLM stage 4 (paper 3.4): everything unfrozen, understanding and generation mixed. Starts from stage 3.
#   torchrun --standalone --nproc_per_node=8 train_mllm.py config/mllm_stage4.py --tokenizer=/path/to/dualtoken \
#       --init_from=out-mllm/stage3 --text_tokenizer=/path/to/Qwen2.5-3B/tokenizer.json \
#       --data=/path/to/mixed.jsonl --eval_data=/path/to/val.jsonl
# Paper: lr 1e-5, batch 512 then 256 (run twice: the second time --batch_size=256 --init_from=out-mllm/stage4
# --out_dir=out-mllm/stage4b). The paper's pure-text samples are not a sample kind here.
# Memory (python bench.py memory): weights + gradients + AdamW of the 3B model take up to ~65 GB per GPU under
# DDP, before activations; on smaller cards add --parallel=fsdp (8 GPUs: ~8 GB each) and, for activations,
# --activation_checkpointing=True.
out_dir = "out-mllm/stage4"
trainable = "all"
mix = (0.4, 0.1, 0.5)
caption_dropout = 0.1
lr = 1e-5
vis_lr = 1e-5
batch_size = 512
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
eval_qa = 200
eval_gen = 64
