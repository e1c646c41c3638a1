"""
Teach the unified LLM to read and draw with dual tokens (paper section 3.4; design §6).

    python train_tokenizer.py config/shapes.py && python train_mllm.py config/shapes.py     # CPU
    python train_mllm.py config/shapes.py --prepare=True      # only (re)build the code cache
    torchrun --standalone --nproc_per_node=8 train_mllm.py config/mllm_stage1.py \\
        --tokenizer=/path/to/dualtoken --init_from=/path/to/Qwen2.5-3B --data=/path/to/train.jsonl
    python train_mllm.py config/shapes.py --resume=True       # continue exactly where it stopped
    torchrun --standalone --nproc_per_node=8 train_mllm.py config/mllm_stage2.py --parallel=fsdp ...  # sharded

The frozen DualToken tokenizer runs ONCE over the data (the code cache: memory-mapped int16/int32 .npy
stacks of both vocabularies + a JSON index of the texts, stamped with a hash of the tokenizer's config
and weights; codecache.prepare_cache / CodeCache); training reads codes only. Codes come from
codec.image_codes (DualToken.encode: always fp32, autocast off), which eval.py and sample.py read images
through too. Under torchrun every rank encodes its shard; the cache appears in cache_dir only when complete.
Every micro-batch mixes three kinds of sample in fixed counts (so every trained module gets a gradient on
every rank, which plain DDP needs):
    und  [bos] <im_start> image <im_end> question-prompt answer <eos> ...   loss: each answer + eos
                                                                            (qa_per_image turns)
    cap  [bos] <im_start> image <im_end> caption-prompt   caption <eos>     loss: caption + eos
    gen  [bos] caption <image_gen_start> image <image_gen_end> <eos>        loss: every depth of both code
                                                                            stacks, <image_gen_end>, eos
A `caption_dropout` share of gen samples has the empty caption, [bos] <image_gen_start>: exactly the
unconditional prompt that MLLM.generate_image uses for classifier-free guidance.

Stages (paper 3.4) are presets: `trainable` = "input" (stage 1: LLM frozen, input projector only),
"all" (stage 2 understanding, stage 4 mixed), "output" (stage 3: LLM frozen, depth heads incl. their
output projectors, on generation). `lr` is the LLM's learning rate, `vis_lr` the visual modules'.

out_dir holds config.json (MLLMConfig + the tokenizer path and hash + the text tokenizer and prompt
format) and model.safetensors (codebooks included), written by MLLM.save_pretrained and read strictly by
MLLM.from_pretrained; train_state.pt (exact resume), log.jsonl, samples/step_*.png (per caption: its codes decoded | drawn),
eval.json (held-out QA accuracy and checker-judged generation accuracy with the recorded sampler: eval.py mllm's
protocol, evaluation.py, on the first eval_qa / eval_gen cached val images).

--parallel=fsdp (under torchrun): FSDP2 instead of DDP, for models whose weights, gradients and AdamW state do
not fit one GPU (`python bench.py memory` prints the table for the stage presets). build_sharded makes the
model; the training loop is the same; train_state.pt then names a folder of per-rank shards (exact resume,
sharding.save_sharded), and the export, evaluation and samples run on the weights gathered to rank 0
(`gathered`, held by `Plain`), so model.safetensors is the same file a DDP run writes.
"""
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np
import torch

import checker
import evaluation
import mllm_hf
import sharding
import train_utils as tu
from configurator import PROGRESS, UserError, config_dict, parse_config, run_main
from folders import hold_folder
from checker import ground_words
from codec import SAMPLING_KEYS, generate_images, two_vocabularies
from codecache import CodeCache, cache_meta, prepare_cache
from llm import rope_inv_freq
from loaders import check_words, load_image_tokenizer, tokenizer_hash
from mllm import INPUT_CODES, LLM_FIELDS, MLLM, MLLMConfig
from sequences import CAPTION_PROMPT, make_batch, sample_parts
from text import IMAGE_TOKENS, prompt_tokenizer

KINDS = ("und", "cap", "gen")


@dataclass
class TrainMLLMConfig:
    SECTION = "mllm"  # reads the `mllm_config = dict(...)` section of a pipeline preset
    # the model's fields this trainer sets from its tokenizers: no keys
    DERIVED = {**dict.fromkeys(("vocab_size", "pad_id", "eos_id", "bos_id", "im_start_id", "im_end_id",
                                "image_gen_start_id", "image_gen_end_id"), "the text tokenizer (text_tokenizer)"),
               **dict.fromkeys(("pix_vocab", "pix_dim", "pix_depth", "sem_vocab", "sem_dim", "sem_depth"),
                               "the image tokenizer (tokenizer)")}
    out_dir: str = "out-mllm"
    tokenizer: str = ""              # DualToken folder, ours or the authors' release; frozen
    # data: "shapes" or a .jsonl of {"image": path, "caption": text, "qa": [[question, answer], ...]}
    # (caption and qa optional per line; image paths relative to the file)
    data: str = "shapes"
    eval_data: str = ""              # real data: a held-out .jsonl of the same form
    cache_dir: str = ""              # "" -> out_dir/cache
    prepare: bool = False            # build the code cache and exit (a missing cache is built anyway)
    prepare_batch: int = 128
    max_objects: int = 2             # shapes
    holdout_pairs: tuple = ()        # shapes: ((colour, shape), ...) never in training (eval.py's holdout split)
    detail_qa: bool = False          # shapes: also ask the background's colour (data.ShapesConfig.detail_qa)
    train_size: int = 20_000         # shapes: images in the train cache
    eval_size: int = 200             # held-out images (shapes: val split)
    # LLM: from scratch (MLLMConfig's keys below) or a local HF Qwen2 / LLaMA folder, whose shape replaces the
    # trunk's keys (n_layer ...)
    init_from: str = ""
    text_tokenizer: str = ""         # "" / "bytes": byte-level; "words": the shapes world's closed word list;
                                     # else an HF tokenizer.json (needs `tokenizers`)
    model: MLLMConfig = field(default_factory=MLLMConfig)  # the MLLM; its keys are named alone: --n_layer=8
    # what trains: "all", "input" (vis_in only), "output" (pix/sem depth heads only)
    trainable: str = "all"
    mix: tuple = (0.4, 0.1, 0.5)     # und, cap, gen shares of each micro-batch (rounded to counts)
    qa_per_image: int = 1            # und samples: questions asked in turn about one image
    caption_dropout: float = 0.1     # gen samples with the empty caption (the CFG unconditional model)
    # optimisation
    batch_size: int = 64             # global batch per optimizer step
    micro_batch: int = 64
    max_steps: int = 2000
    stop_step: int = 0               # stop (with a checkpoint) after this step; 0: run to max_steps
    lr: float = 1e-4                 # LLM trunk (embeddings included)
    vis_lr: Optional[float] = None   # vis_in + depth heads; None -> lr
    min_lr_frac: float = 0.1         # cosine to lr * min_lr_frac
    # warm restarts: ((steps, peak), ...) summing to max_steps, each cycle a warmup to lr * peak then cosine to
    # lr * peak * min_lr_frac (tu.cycle_lr); () = one cycle of max_steps at peak 1 (plain cosine)
    lr_cycles: tuple = ()
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # evaluation / sampling
    # the image sampler of this run's evaluation; recorded in config.json as "sampling", where eval.py and
    # sample.py take their defaults from, so every evaluation of a model draws the same way
    cfg_scale: Optional[float] = 3.0  # None: no guidance
    temperature: float = 1.0
    fine_temperature: Optional[float] = None  # depths 2..; None = temperature
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    # held-out evaluation (evaluation.py: eval.py mllm's QA / generation protocol, on the cached codes)
    eval_qa: int = 20                # held-out images at the end, every question of each (eval.py: qa_images)
    eval_gen: int = 100              # held-out captions drawn at the end (shapes: checker-judged)
    eval_batch: int = 50
    eval_interval: int = 0           # > 0: the held-out evaluation above also every this many steps (log.jsonl)
    # system
    seed: int = 0
    device: str = ""
    threads: int = 0                 # CPU intra-op threads; 0 = torch's default
    dtype: str = "bfloat16"          # autocast on cuda; CPU runs fp32
    compile: Optional[bool] = None   # None -> on for cuda only
    log_interval: int = 10
    sample_interval: int = 500       # a few held-out answers + a PNG of drawn captions; 0: never
    ckpt_interval: int = 500
    # under torchrun: "ddp" (each GPU holds the whole model, its gradients and AdamW state) or "fsdp" (FSDP2:
    # all three sharded over the GPUs, each decoder block and depth head its own unit; see build_sharded)
    parallel: str = "ddp"
    fsdp_bf16: bool = True           # fsdp + dtype=bfloat16 on cuda: FSDP2's MixedPrecisionPolicy (bf16 gather and
                                     # compute, fp32 reduce-scatter and master weights) instead of autocast
    activation_checkpointing: bool = False  # recompute each decoder block's activations in the backward
    resume: bool = False
    overwrite: bool = False          # replace a model already in out_dir (else: refused, see tu.guard_out_dir)


# -----------------------------------------------------------------------------
# tokenizers: the frozen image tokenizer and the text side


def previous_stage(path):
    """The config.json of a train_mllm out_dir, or None (an HF folder, or no folder)."""
    p = os.path.join(path, "config.json") if path else ""
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        conf = json.load(f)
    return conf if "mllm" in conf else None


def mllm_text_tokenizer(cfg):
    """-> (the MLLM's text tokenizer, its name as the export records it; text.prompt_tokenizer builds it):
    the configured one, else the previous stage's, else "bytes"."""
    prev = previous_stage(cfg.init_from)
    name = cfg.text_tokenizer or (prev["text_tokenizer"] if prev else "") or "bytes"
    if name in ("bytes", "words") and cfg.init_from and not prev:
        raise UserError("init_from (a pretrained LLM) needs its text_tokenizer (tokenizer.json)")
    return prompt_tokenizer(name), name


def kind_counts(mix, micro_batch):
    """Shares -> per-micro-batch counts summing to micro_batch (largest remainder); a kind with a positive
    share gets at least one slot, so its modules see a gradient in every micro-batch."""
    w = np.asarray(mix, dtype=np.float64)
    if w.shape != (3,) or (w < 0).any() or w.sum() <= 0:
        raise UserError(f"mix: expected three non-negative shares (und, cap, gen), got {mix}")
    if micro_batch < int((w > 0).sum()):
        raise UserError(f"micro_batch {micro_batch} is smaller than the number of mixed kinds in mix={mix}")
    raw = w / w.sum() * micro_batch
    n = np.floor(raw).astype(int)
    n[(w > 0) & (n == 0)] = 1
    while n.sum() > micro_batch:
        n[np.argmax(n)] -= 1
    for i in np.argsort(-(raw - n)):
        if n.sum() == micro_batch:
            break
        n[i] += 1
    return dict(zip(KINDS, n.tolist()))

# -----------------------------------------------------------------------------
# model


def build_model(cfg, text_tok, image_tok, thash=None):
    """A new MLLM (from scratch or on an HF LLM folder), or the previous stage's train_mllm out_dir,
    with this run's loss weights."""
    model = _build_model(cfg, text_tok, image_tok, thash)
    for k in LOSS_WEIGHTS:
        setattr(model.config, k, getattr(cfg.model, k))
    return model


LOSS_WEIGHTS = ("text_loss_weight", "pix_loss_weight", "sem_loss_weight")  # a next stage sets its own


def _build_model(cfg, text_tok, image_tok, thash=None):
    if previous_stage(cfg.init_from):
        model = MLLM.from_pretrained(cfg.init_from)
        info = model.export_info
        if thash is not None and info["tokenizer_hash"] != thash:
            raise UserError(f"init_from={cfg.init_from!r} was trained on tokenizer {info['tokenizer_hash']}, "
                            f"this run uses {thash}")
        return model.train()
    q = image_tok.config
    codes = dict(pix_vocab=q.vq_pix.codebook_size, pix_dim=q.vq_pix.code_dim, pix_depth=q.vq_pix.depth,
                 sem_vocab=q.vq_sem.codebook_size, sem_dim=q.vq_sem.code_dim, sem_depth=q.vq_sem.depth)
    if cfg.init_from:  # the LLM's fields are the folder's; the visual side is this config's
        vis = {k: v for k, v in asdict(cfg.model).items() if k not in LLM_FIELDS}
        model = mllm_hf.from_pretrained(cfg.init_from, new_tokens=IMAGE_TOKENS, **{**vis, **codes})
        mc = model.config
        if text_tok.vocab_size > mc.vocab_size - len(IMAGE_TOKENS):
            raise UserError(f"text_tokenizer has {text_tok.vocab_size} ids, the LLM {mc.vocab_size - 4} before the "
                            f"image tokens")
        mc.eos_id = text_tok.eos_id  # the chat template's end of turn ends an answer
    else:
        # the one place where the special ids come from the tokenizer (MLLMConfig's defaults differ)
        ids = {f.strip("<>") + "_id": text_tok.token_id(f) for f in ("<bos>",) + IMAGE_TOKENS}
        model = MLLM(replace(cfg.model, vocab_size=text_tok.vocab_size, pad_id=text_tok.pad_id,
                             eos_id=text_tok.eos_id, **ids, **codes))
    model.set_codebooks(image_tok.quantizer_pix.codebook,
                        image_tok.quantizer_sem.codebook if two_vocabularies(image_tok) else None)
    return model


def build_sharded(cfg, text_tok, image_tok, thash, ctx, policy):
    """--parallel=fsdp: the model every rank trains, sharded. Rank 0 builds the plain model in CPU memory exactly
    as build_model does (the seeded init from scratch, the same numbers as a single-process run; or the previous
    stage's export / an HF folder, read strictly), every rank builds the same architecture on the meta device
    (no memory), shards it (each decoder block and each depth head one FSDP unit, then the root) and takes its
    own rows of rank 0's tensors as they are broadcast one by one (sharding.fsdp_load_full): the full model is never
    on a GPU, and in CPU memory on rank 0 only. A resume then overwrites the shards from its checkpoint."""
    import torch.distributed as dist
    plain = build_model(cfg, text_tok, image_tok, thash) if ctx.is_master else None
    conf = [asdict(plain.config) if plain is not None else None]
    dist.broadcast_object_list(conf, src=0)
    with torch.device("meta"):
        model = MLLM(MLLMConfig(**conf[0]))
    model.inv_freq = rope_inv_freq(model.config)  # a plain tensor (not a buffer): made here, not sharded
    model.set_trainable(cfg.trainable)
    if cfg.activation_checkpointing:
        sharding.checkpoint_blocks(model.layers)  # before sharding: the recomputation runs inside each unit
    sharding.fsdp_shard(model, [*model.layers, *(h for h in (model.pix_head, model.sem_head) if h is not None)], policy)
    sharding.fsdp_load_full(model, plain.state_dict() if plain is not None else None, ctx.device)
    return model


def gathered(model):
    """Under FSDP (a collective: every rank calls it): the trained weights gathered into a plain MLLM in rank
    0's CPU memory, which the export writes; None on the other ranks. The evaluation and the samples move it to
    rank 0's GPU, which must then hold the whole fp32 model once more (16 GB for the 3B model): on smaller
    cards set eval_qa = eval_gen = sample_interval = 0 and run eval.py on the export."""
    sd = sharding.fsdp_full_state_dict(model)
    return MLLM.from_state_dict(MLLMConfig(**asdict(model.config)), sd) if sd else None


def optimizer_groups(model, cfg):
    """AdamW groups (train_utils.param_groups): the LLM at lr, the visual modules at vis_lr."""
    heads = [m for m in (model.pix_head, model.sem_head) if m is not None]  # the depth heads are visual too
    vis = {id(p) for m in model.visual_input_modules() + heads for p in m.parameters()}
    if model.image_pos is not None:
        vis.add(id(model.image_pos))
    groups = tu.param_groups(model, cfg.weight_decay, {"llm": (cfg.lr, lambda p: id(p) not in vis),
                                                       "vis": (cfg.vis_lr or cfg.lr, lambda p: id(p) in vis)})
    if not groups:
        raise UserError(f"trainable={cfg.trainable!r} leaves nothing to train")
    return groups


# -----------------------------------------------------------------------------
# evaluation


def _pix(image_tok, cache, n):
    """The first n cached images' pixel codes, (n, h, w, Dp) as the decoder takes them."""
    g = image_tok.config.grid
    return torch.from_numpy(np.array(cache.pix[:n])).long().view(-1, g, g, cache.pix.shape[-1])


def sampling(cfg):
    """The image sampler settings of a run (what config.json records as "sampling")."""
    return {k: getattr(cfg, k) for k in SAMPLING_KEYS}


def evaluate(raw, text_tok, image_tok, cache, cfg, n_qa, n_gen, autocast=None):
    """eval.py's protocol (evaluation.py) on the cached codes: every question of the first n_qa held-out
    images (greedy, exact match), and, where records carry objects (shapes), the first n_gen captions drawn
    with this run's sampler and judged by the checker (gen_accuracy: every attribute of every object)."""
    was = raw.training
    raw.eval()
    res = {}
    r = evaluation.qa(raw, text_tok, cache.records, cache.pix, cache.sem, n_qa, cfg.eval_batch, autocast)
    if r["n"]:
        res.update(qa_accuracy=r["accuracy"], n_qa=r["n"], qa_images=min(n_qa, len(cache)),
                   qa_by_type=r["by_type"], qa_examples=[dict(q=q, truth=a, pred=p) for (_, q, a), p in
                                                         list(zip(r["rows"], r["pred"]))[:8]])
    n = min(n_gen, len(cache))
    if n and "objects" in cache.records[0]:
        caps, truth = [rec["caption"] for rec in cache.records[:n]], [rec["objects"] for rec in cache.records[:n]]
        sc = evaluation.generation(raw, text_tok, image_tok, caps, truth, sampling(cfg), cfg.seed, cfg.eval_batch,
                                   autocast)
        res["gen_accuracy"], res["gen_objects_correct"] = sc["all_correct"], sc["objects_correct"]
        res.update({f"gen_{k}": sc[k] for k in ("count",) + checker.ATTRS + ("false_objects", "missed_cells")})
        res["n_gen"], res["sampling"] = n, sampling(cfg)
        # the ceiling the tokenizer sets: the checker on the decoding of the same images' true codes
        dev = next(image_tok.parameters()).device
        res["tokenizer_recon_accuracy"] = evaluation.ceiling(image_tok, _pix(image_tok, cache, n), truth,
                                                             cfg.eval_batch, dev, autocast)["all_correct"]
    raw.train(was)
    return res


def save_samples(raw, text_tok, image_tok, cache, cfg, path, n=8):
    """One row per held-out image, its caption under it: the tokenizer's decoding of the image's cached codes |
    an image drawn from the caption. Returns the answers to the first question of the first 4 images."""
    import data
    was = raw.training
    raw.eval()
    n = min(n, len(cache))
    truth = image_tok.decode(_pix(image_tok, cache, n).to(next(image_tok.parameters()).device)).cpu()
    g = torch.Generator(device=raw.embed.weight.device).manual_seed(cfg.seed + 1)
    caps = [r["caption"] for r in cache.records[:n]]
    ims, _ = generate_images(raw, image_tok, text_tok, caps, g, n, **sampling(cfg))
    data.grid_png([list(pair) for pair in zip(data.to_image(truth), data.to_image(ims))], path, labels=caps)
    rows = [(i, *rec["qa"][0]) for i, rec in enumerate(cache.records[:4]) if rec.get("qa")]
    pred = evaluation.answers(raw, text_tok, rows, cache.pix, cache.sem, 4)
    raw.train(was)
    return [dict(q=q, truth=a, pred=p) for p, (_, q, a) in zip(pred, rows)]

# -----------------------------------------------------------------------------
# training


# how this config's fields must relate (tu.check_values; each field's own range is in tu.VALUE_RULES); the LLM's
# shape is read from --init_from when one is given
RULES = (
    ("n_embd", lambda c: c.init_from or c.model.n_embd % c.model.n_head == 0,
     lambda c: f"need a multiple of --n_head={c.model.n_head} (each head takes n_embd / n_head channels)"),
    ("n_kv_head", lambda c: c.init_from or (c.model.n_kv_head <= c.model.n_head
                                            and c.model.n_head % c.model.n_kv_head == 0),
     lambda c: f"need a divisor of --n_head={c.model.n_head} (grouped-query attention shares each K/V head among "
               f"n_head / n_kv_head query heads)"),
    ("head_n_head", lambda c: (c.model.head_n_embd is None and c.init_from)
     or (c.model.head_n_embd or c.model.n_embd) % (c.model.head_n_head or c.model.n_head) == 0,
     lambda c: f"the depth heads' width (--head_n_embd, else --n_embd: {c.model.head_n_embd or c.model.n_embd}) must "
               f"be a multiple of their head count ({c.model.head_n_head or c.model.n_head})"),
)


def validate(cfg):
    """Every check that needs no model or data, before any work: a mistake costs a second, not a run."""
    tu.check_train_config(cfg, RULES)
    tu.require_path(cfg.tokenizer, "tokenizer", "dir", "a DualToken folder (config.json + weights); for shapes run "
                    "`python train_tokenizer.py config/shapes.py` first")
    for key, v in (("data", cfg.data), ("eval_data", cfg.eval_data)):
        if v == "shapes" or (key == "eval_data" and not v):
            continue
        if not v.endswith(".jsonl"):
            raise UserError(f"--{key}={v!r}: expected 'shapes' or a .jsonl of {{image, caption, qa}}")
        tu.require_path(v, key, "file")
        import data
        recs = data.read_jsonl(v, with_qa=True)  # every record checked now (file:line), not when the cache is built
        check_words(cfg.text_tokenizer or (previous_stage(cfg.init_from) or {}).get("text_tokenizer"),
                            [(r["where"], t) for r in recs for t in [r["caption"], *(x for p in r["qa"] for x in p)]])
    if cfg.eval_data and cfg.data == "shapes":
        raise UserError(f"--eval_data={cfg.eval_data!r} is for --data=FILE.jsonl; shapes evaluates on its val split")
    if cfg.init_from:
        tu.require_path(cfg.init_from, "init_from", "dir", "a train_mllm.py out_dir or a Hugging Face LLM folder")
    if cfg.text_tokenizer not in ("", "bytes", "words"):
        tu.require_path(cfg.text_tokenizer, "text_tokenizer", "file", "'bytes', 'words' or a tokenizer.json")
    if cfg.trainable not in ("all", "input", "output"):
        raise UserError(f"--trainable={cfg.trainable!r}: expected 'all', 'input' or 'output'")
    if cfg.model.input_codes not in INPUT_CODES:
        raise UserError(f"--input_codes={cfg.model.input_codes!r}: expected one of {INPUT_CODES}")
    if cfg.model.input_codes == "sem" and not cfg.model.gen_sem:
        raise UserError("--input_codes=sem needs --gen_sem=True: a drawn image is read back through its semantic codes")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise UserError(f"--parallel={cfg.parallel!r}: expected 'ddp' or 'fsdp'")
    if cfg.parallel == "fsdp" and int(os.environ.get("RANK", -1)) == -1 and not cfg.prepare:
        raise UserError("--parallel=fsdp shards over the processes torchrun starts: run under torchrun "
                        "(--nproc_per_node=1 on one GPU)")
    kind_counts(cfg.mix, cfg.micro_batch)
    tu.check_cycles(cfg.lr_cycles, cfg.max_steps)
    if cfg.model.gen_ground_loss > 0 and cfg.data != "shapes":
        raise UserError(f"--gen_ground_loss={cfg.model.gen_ground_loss}: needs each image's objects, which only "
                        f"--data=shapes gives (got --data={cfg.data!r})")
    if not cfg.prepare:  # --prepare=True only (re)builds the code cache
        tu.guard_out_dir(cfg)


def check_image_tokenizer(cfg, image_tok):
    """What this model asks of the image tokenizer: its vocabularies, and 3x3 cells for the grounding loss."""
    m, g = cfg.model, image_tok.config.grid
    if not two_vocabularies(image_tok) and (m.input_codes != "pix" or m.gen_sem):
        raise UserError(f"--tokenizer={cfg.tokenizer!r} has one vocabulary (tied branches or no semantic branch): "
                        f"the MLLM can read and draw only its codes, --input_codes=pix --gen_sem=False (got "
                        f"input_codes={m.input_codes!r}, gen_sem={m.gen_sem})")
    if m.gen_ground_loss > 0 and g % 3:
        raise UserError(f"--gen_ground_loss: the tokenizer's {g}x{g} patch grid does not split into the world's "
                        f"3x3 cells (the shapes preset's is 6x6)")


def code_caches(cfg, image_tok, thash, ctx):
    """-> (train cache, held-out cache or None); a missing cache (or --prepare=True) is built first, every rank
    encoding its shard (codecache.prepare_cache)."""
    folder = cfg.cache_dir or os.path.join(cfg.out_dir, "cache")
    expect = cache_meta(cfg, image_tok, thash)
    if cfg.prepare or not os.path.isfile(os.path.join(folder, "meta.json")):
        with hold_folder(folder):  # a cache_dir shared by runs: two builders would remove each other's files
            prepare_cache(cfg, image_tok, thash, folder, ctx.device, ctx, verbose=ctx.is_master)
    train_c = CodeCache(folder, "train", expect)
    val_c = CodeCache(folder, "val", expect) if (cfg.data == "shapes" or cfg.eval_data) else None
    return train_c, val_c


def model_to_train(cfg, text_tok, image_tok, thash, ctx):
    """-> (the model this rank trains, FSDP's mixed-precision policy or None): the plain model on the device, or
    under --parallel=fsdp this rank's shards of it (build_sharded)."""
    policy = sharding.fsdp_policy(ctx.device, cfg.dtype) if cfg.parallel == "fsdp" and cfg.fsdp_bf16 else None
    if cfg.parallel == "fsdp":
        return build_sharded(cfg, text_tok, image_tok, thash, ctx, policy), policy
    raw = build_model(cfg, text_tok, image_tok, thash)
    raw.set_trainable(cfg.trainable)
    if cfg.activation_checkpointing:
        sharding.checkpoint_blocks(raw.layers)
    return raw.to(ctx.device), policy


def load_state(raw, opt, st, state_path, thash, fsdp):
    """Load train_state.pt (`st`, None: a new run) into the model and its optimizer -> (step, consumed
    micro-batches). Under FSDP every trainable shard gets its AdamW state first, so the sharded checkpoint is
    complete and loads strictly."""
    if fsdp:
        sharding.init_optimizer_state(opt)
    if st is None:
        return 0, 0
    if st["tokenizer_hash"] != thash:
        raise UserError(f"{state_path} was trained with tokenizer {st['tokenizer_hash']}, this run has {thash}")
    if fsdp:
        sharding.load_sharded(raw, opt, state_path, st)
    else:
        raw.load_state_dict(st["model"], strict=True)
        opt.load_state_dict(st["optimizer"])
    return st["step"], st["consumed"]


class Batches:
    """This rank's micro-batches: the one after `consumed` is a pure function of (seed, rank, consumed), so a resume
    continues the data stream exactly."""

    def __init__(self, cfg, ctx, cache, text_tok, image_tok, model, counts, consumed):
        self.cfg, self.rank, self.cache, self.text_tok, self.model = cfg, ctx.rank, cache, text_tok, model
        self.grid, self.device, self.consumed = image_tok.config.grid, ctx.device, consumed
        self.kinds = [k for k in KINDS for _ in range(counts[k])]
        self.sampler = tu.sampler_after(len(cache), cfg, ctx, consumed)

    def __next__(self):
        cfg, c = self.cfg, self.cache
        idx = next(self.sampler)
        rng = np.random.default_rng([cfg.seed, self.rank, self.consumed])
        items = []
        for kind, i in zip(self.kinds, idx):
            parts, flags = sample_parts(kind, c.records[i], self.text_tok, rng, cfg.caption_dropout, self.grid ** 2,
                                        cfg.qa_per_image)
            items.append((parts, flags, c.pix[i], None if c.sem is None else c.sem[i]))
            if cfg.model.gen_ground_loss > 0:
                items[-1] += (ground_words(c.records[i], self.text_tok, self.grid),)
        b = make_batch(self.model.config, items)
        self.model.check_inputs(**b)  # here, on the CPU batch: the compiled forward skips these host reads
        if bool(b["attention_mask"].all()):  # nothing padded: no mask keeps SDPA on its fused causal kernels
            del b["attention_mask"]
        self.consumed += 1
        return {k: v.to(self.device) for k, v in b.items()}


def compile_ddp(raw, cfg, ctx, counts):
    """compile (on cuda by default) -> DDP (not under FSDP, whose shards are already the parallel model). A run
    without generation samples leaves the depth heads without a gradient, which plain DDP must be told."""
    use_compile = ctx.device.startswith("cuda") if cfg.compile is None else cfg.compile
    model = torch.compile(raw, dynamic=True) if use_compile else raw
    if cfg.parallel == "fsdp":
        return model
    heads_idle = counts["gen"] == 0 and any(p.requires_grad for p in raw.pix_head.parameters())
    return tu.wrap_ddp(model, ctx, broadcast_buffers=False, find_unused_parameters=heads_idle)


def export_info(cfg, image_tok, thash, text_tok_name):
    """What config.json records beside the model: how eval.py and sample.py talk to it."""
    return dict(tokenizer=os.path.relpath(cfg.tokenizer, cfg.out_dir), tokenizer_hash=thash,  # moves with both
                text_tokenizer=text_tok_name, caption_prompt=CAPTION_PROMPT,
                prompt_format="und: [bos] <im_start> image <im_end> user_prompt(question); "
                              "gen: [bos] encode(caption) <image_gen_start>",
                grid=image_tok.config.grid, image_size=image_tok.config.siglip.vision.image_size,
                holdout_pairs=[list(p) for p in cfg.holdout_pairs],  # eval.py scores these separately
                detail_qa=cfg.detail_qa,  # eval.py asks the same questions
                sampling=sampling(cfg))  # eval.py / sample.py draw with these by default


class Plain:
    """The model the export, the evaluation and the samples read: the trained model itself, or under FSDP its
    weights gathered into a plain MLLM on rank 0 (`gathered`; the other ranks get None), made at most once a step
    and let go when a step needs none (rank 0 never holds two full copies)."""

    def __init__(self, raw, fsdp):
        self.raw, self.fsdp = raw, fsdp
        self.model, self.step = (None, None) if fsdp else (raw, None)

    def at(self, step, needed=True):
        """The plain model after `step` (under FSDP a collective: every rank calls it), or None if not `needed`."""
        if self.fsdp and (self.step != step or not needed):
            self.model, self.step = None, None
            if needed:
                self.model, self.step = gathered(self.raw), step
        return self.model if needed else None


def save_state(cfg, raw, opt, plain, meta, extra, master):
    """train_state.pt (exact resume: under FSDP every rank writes its shards) and the export (rank 0)."""
    with tu.checkpoint_commit(meta["step"]):
        if cfg.parallel == "fsdp":
            sharding.save_sharded(raw, opt, os.path.join(cfg.out_dir, "train_state.pt"), meta)
        elif master:
            tu.save_train_state({"model": raw.state_dict(), "optimizer": opt.state_dict(), **meta},
                                os.path.join(cfg.out_dir, "train_state.pt"))
    if master:
        plain.save_pretrained(cfg.out_dir, extra)


def held_out_report(model, step, ev_now, samples_now, toks, val_c, cfg, autocast, logger, bar, t_start):
    """During training (rank 0): the held-out evaluation (log.jsonl) and the sample picture with a few answers."""
    text_tok, image_tok = toks
    if ev_now:
        t_ev = time.time()
        ev = evaluate(model, text_tok, image_tok, val_c, cfg, cfg.eval_qa, cfg.eval_gen, autocast)
        ev = {k: v for k, v in ev.items() if k != "qa_examples"}
        logger.log(event="eval", step=step, elapsed_s=time.time() - t_start, eval_s=time.time() - t_ev, **ev)
        bar.write(f"step {step}: held-out QA {ev.get('qa_accuracy', float('nan')):.3f}, generation "
                  f"{ev.get('gen_accuracy', float('nan')):.3f} ({time.time() - t_start:.0f} s)")
    if samples_now:
        qa = save_samples(model, text_tok, image_tok, val_c, cfg,
                          os.path.join(cfg.out_dir, "samples", f"step_{step:06d}.png"))
        logger.log(event="samples", step=step, qa=qa)
        bar.write(f"step {step}: " + "; ".join(f"{r['q']} -> {r['pred']!r} ({r['truth']})" for r in qa))


def final_evaluation(model, step, toks, val_c, cfg, autocast, logger, thash, t_start):
    """The held-out evaluation after the last step (rank 0) -> its dict, written to eval.json."""
    text_tok, image_tok = toks
    t_ev = time.time()
    result = dict(step=step, **evaluate(model, text_tok, image_tok, val_c, cfg, cfg.eval_qa, cfg.eval_gen, autocast))
    result.update(eval_s=time.time() - t_ev, wall_s=time.time() - t_start, tokenizer_hash=thash,
                  config=config_dict(cfg))
    tu.write_json(result, os.path.join(cfg.out_dir, "eval.json"))
    logger.log(event="eval", **{k: v for k, v in result.items() if k != "config"})
    print(f"held-out QA accuracy {result.get('qa_accuracy', float('nan')):.3f} ({result.get('n_qa', 0)} "
          f"questions), generation accuracy {result.get('gen_accuracy', float('nan')):.3f} "
          f"({result.get('n_gen', 0)} captions, CFG {cfg.cfg_scale}); done in {result['wall_s']:.0f} s; "
          f"wrote {cfg.out_dir}/eval.json")
    return result


@tu.holds("out_dir", also=("cache_dir",))
def train(cfg):
    """-> (the trained model, the final evaluation or None). Under --parallel=fsdp the model is the sharded one,
    whose process group is gone on return: read the export (MLLM.from_pretrained) instead."""
    t_start = time.time()
    validate(cfg)
    state_path = os.path.join(cfg.out_dir, "train_state.pt")
    st = tu.load_train_state(state_path, cfg) if cfg.resume and not cfg.prepare else None  # may refuse: first
    ctx = tu.setup_ddp(cfg.device or None)
    device, master = ctx.device, ctx.is_master
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts it)
    accum = tu.grad_accum_steps(cfg.batch_size, cfg.micro_batch, ctx.world)
    counts = kind_counts(cfg.mix, cfg.micro_batch)

    # the frozen image tokenizer's codes of every image, computed once (the code cache)
    image_tok = load_image_tokenizer(cfg.tokenizer, device=device)
    check_image_tokenizer(cfg, image_tok)
    thash = tokenizer_hash(image_tok, cfg.tokenizer)
    train_c, val_c = code_caches(cfg, image_tok, thash, ctx)
    if cfg.prepare:
        tu.cleanup_ddp()
        return None, None
    if counts["und"] and not any(r.get("qa") for r in train_c.records):
        print("note: no record has questions; und samples train captioning")
    text_tok, text_tok_name = mllm_text_tokenizer(cfg)
    toks = (text_tok, image_tok)

    # build (sharded under FSDP) -> optimizer -> resume -> compile -> DDP; the export reads the plain model
    raw, policy = model_to_train(cfg, text_tok, image_tok, thash, ctx)
    opt = tu.adamw(optimizer_groups(raw, cfg), device, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    step, consumed = load_state(raw, opt, st, state_path, thash, cfg.parallel == "fsdp")
    batches = Batches(cfg, ctx, train_c, text_tok, image_tok, raw, counts, consumed)
    model = compile_ddp(raw, cfg, ctx, counts)
    plain = Plain(raw, cfg.parallel == "fsdp")
    autocast = tu.autocast_ctx(device, cfg.dtype)
    train_autocast = contextlib.nullcontext() if policy is not None else autocast  # the policy sets bf16 compute
    logger = tu.start_log(cfg, ctx, st, step)
    extra = export_info(cfg, image_tok, thash, text_tok_name)
    n_params, n_train = tu.param_counts(raw)
    if master:
        print(f"MLLM {n_params / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable, {cfg.trainable}), device "
              f"{device} x{ctx.world} ({cfg.parallel if ctx.ddp else 'one process'}), accum {accum}, micro-batch "
              f"{counts}, {len(train_c)} cached images, tokenizer {thash}, from step {step}")
        logger.log(event="start", step=step, params=n_params, trainable=n_train, world=ctx.world, counts=counts,
                   config=config_dict(cfg))

    last_step, last_good = cfg.stop_step or cfg.max_steps, step if st is not None else None
    bar = tu.progress_bar(last_step, step, master, "mllm")
    t0, seen = time.time(), 0
    cycles = cfg.lr_cycles or ((cfg.max_steps, 1.0),)
    while step < last_step:
        f = tu.cycle_lr(step, cfg.warmup, cycles, cfg.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        sums = dict(loss=0.0, text=0.0, pix=0.0, sem=0.0)
        for micro in range(accum):
            b = next(batches)
            tu.sync_on_last(model, micro, accum)
            with train_autocast:
                _, loss = model(**b)
            terms = dict(loss=loss.detach(), **raw.loss_parts)
            tu.stop_if_nonfinite(terms, step, last_good, cfg.out_dir, logger)
            (loss / accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        tu.optimizer_step(opt, raw, cfg.grad_clip)
        step += 1
        seen += cfg.batch_size
        bar.update(1)
        if master and (tu.every(step, cfg.log_interval) or step == last_step):
            logger.log(event="train", step=step, lr=cfg.lr * f, samples_per_s=seen / (time.time() - t0),
                       elapsed_s=time.time() - t_start, **sums)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", text=f"{sums['text']:.3f}", pix=f"{sums['pix']:.2f}",
                            sem=f"{sums['sem']:.2f}")
        PROGRESS["step"] = step  # after its log line: the step Ctrl-C names is logged
        # the export, the evaluation and the samples (rank 0) read the plain model
        save = tu.every(step, cfg.ckpt_interval) or step == last_step
        ev_now = val_c is not None and tu.every(step, cfg.eval_interval) and step < cfg.max_steps
        samples_now = val_c is not None and tu.every(step, cfg.sample_interval)
        m = plain.at(step, needed=save or ev_now or samples_now)
        if save:
            meta = {"step": step, "consumed": batches.consumed, "tokenizer_hash": thash, "config": config_dict(cfg)}
            save_state(cfg, raw, opt, m, meta, extra, master)
            last_good = step
        if master and (ev_now or samples_now):
            m = m.to(device)  # the gathered copy to the GPU (a no-op for the trained model)
            held_out_report(m, step, ev_now, samples_now, toks, val_c, cfg, autocast, logger, bar, t_start)
    bar.close()
    result = None
    if val_c is not None and step >= cfg.max_steps:
        m = plain.at(step)  # under FSDP: gathered now if the last step did not (a resume with nothing left to train)
        if master:
            result = final_evaluation(m.to(device), step, toks, val_c, cfg, autocast, logger, thash, t_start)
    tu.cleanup_ddp()
    return raw, result


def main(argv):
    return train(parse_config(TrainMLLMConfig(), argv))


if __name__ == "__main__":
    run_main(main)
