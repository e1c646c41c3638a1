# MLLM stage 2 (paper 3.4): understanding SFT, everything unfrozen. Starts from stage 1's out_dir.
#   torchrun --standalone --nproc_per_node=8 train_mllm.py config/mllm_stage2.py --tokenizer=/path/to/dualtoken \
#       --init_from=out-mllm/stage1 --text_tokenizer=/path/to/Qwen2.5-3B/tokenizer.json \
#       --data=/path/to/vqa.jsonl --eval_data=/path/to/vqa_val.jsonl
# The depth heads get no gradient here (no generation samples): DDP runs with find_unused_parameters.
# Paper: lr 2e-5, batch 256.
# Memory (python bench.py memory): weights + gradients + AdamW of the 3B model take up to ~65 GB per GPU under
# DDP, before activations; on smaller cards add --parallel=fsdp (8 GPUs: ~8 GB each) and, for activations,
# --activation_checkpointing=True.
out_dir = "out-mllm/stage2"
trainable = "all"
mix = (0.8, 0.2, 0.0)        # questions, plus some captions
qa_per_image = 1
lr = 2e-5
vis_lr = 2e-5
batch_size = 256
micro_batch = 8
max_steps = 5000
warmup = 200
head_n_layer = 3
sample_interval = 1000
ckpt_interval = 1000
eval_qa = 500
eval_gen = 0
