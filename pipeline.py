"""
What connects the image tokenizer, the text tokenizer and the MLLM, for train_mllm.py, sample.py and eval.py:
our MLLM export (train_mllm.py's out_dir: config.json + model.safetensors, stamped with the image tokenizer's
path and hash), loading it back with the image tokenizer it was trained with, the prompts as training formats
them, image <-> codes, the code cache train_mllm.py trains on (built once, read memory-mapped), and the
image sampler's settings. The image tokenizer (a tokenizer.DualToken) is loaded here for every script
(load_image_tokenizer, through convert.py, imported lazily) and passed in everywhere else: like mllm.py,
the MLLM side of this file needs no vision code.
"""
import json
import os
from dataclasses import asdict

import numpy as np
import torch

from configurator import UserError
from folders import model_kind
from llm import rope_inv_freq
from mllm import MLLM, MLLMConfig, build_sequence, collate_sequences, make_targets

# ----------------------------------------------------------------------------------------------------
# the image sampler's settings

SAMPLING_KEYS = ("cfg_scale", "temperature", "fine_temperature", "top_k", "top_p")
PAPER_SAMPLING = dict(cfg_scale=3.0, temperature=1.0, fine_temperature=None, top_k=None, top_p=None)


def sampling_settings(cfg, info):
    """The image sampler: each of SAMPLING_KEYS set on cfg (not None), else what the MLLM's trainer
    recorded in its config.json ("sampling": what its own evaluation drew with), else PAPER_SAMPLING.
    Off switches on the command line: cfg_scale <= 0, top_k <= 0, top_p outside (0, 1), fine_temperature < 0
    (= temperature)."""
    rec = {**PAPER_SAMPLING, **(info.get("sampling") or {})}
    s = {k: rec[k] if getattr(cfg, k) is None else getattr(cfg, k) for k in SAMPLING_KEYS}
    off = dict(cfg_scale=lambda v: v <= 0, top_k=lambda v: v <= 0, top_p=lambda v: not 0 < v < 1,
               fine_temperature=lambda v: v < 0, temperature=lambda v: False)
    return {k: None if v is not None and off[k](v) else v for k, v in s.items()}



# ----------------------------------------------------------------------------------------------------
# our export

def tokenizer_hash(image_tok, path=None):
    """sha256 of the image tokenizer's (a DualToken's) config and every tensor: what the code cache and checkpoints are stamped
    with. With `path` (the folder, or a weights file with config.json beside it) the config is the file's
    JSON as written, so new code-side config fields with defaults do not change the hash of an unchanged
    tokenizer; without it, the in-memory config (changes when tokenizer.py grows a field). Tensors are
    hashed, not files: an authors' .pt and its safetensors conversion hash the same."""
    import hashlib
    folder = path if path and os.path.isdir(path) else os.path.dirname(path or "")
    conf = os.path.join(folder, "config.json") if path else ""
    if conf and os.path.isfile(conf):
        with open(conf) as f:
            c = json.load(f)
    else:
        c = image_tok.config.to_dict()  # tokenizer.config_to_dict
    h = hashlib.sha256(json.dumps(c, sort_keys=True).encode())
    for k, v in sorted(image_tok.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def export(raw, folder, extra):
    """config.json (the MLLM config + how to talk to it: `extra`, e.g. the image tokenizer's path and
    hash, the text tokenizer's name) and model.safetensors, both atomic. A tied output head is stored
    once (as embed.weight); load_mllm re-ties it."""
    import train_utils as tu
    conf = dict(mllm=asdict(raw.config), **extra)
    tu.write_json(conf, os.path.join(folder, "config.json"))
    sd = raw.state_dict()
    if raw.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    tu.atomic_save_safetensors(sd, os.path.join(folder, "model.safetensors"), {"format": "pt"})


def mllm_from_state_dict(cfg, sd):
    """An MLLM whose tensors ARE sd's, strictly (every key and shape): built on the meta device, no random
    init, the weights live once. A tied head may be absent (an export stores it as embed.weight only)."""
    with torch.device("meta"):
        model = MLLM(cfg)
    model.inv_freq = rope_inv_freq(cfg)  # a plain fp32 tensor, not in the state dict
    tied = cfg.tie_word_embeddings
    model.load_state_dict({**sd, "lm_head.weight": sd["embed.weight"]} if tied else sd, strict=True, assign=True)
    if tied:  # assign gave the head its own Parameter: one tensor, one Parameter
        model.lm_head.weight = model.embed.weight
    return model


def load_mllm(folder, device="cpu"):
    """-> (MLLM, info dict: tokenizer, tokenizer_hash, text_tokenizer, caption_prompt, ...) from an out_dir.
    Strict: every key used, every shape checked. Built on the meta device and the file's tensors assigned
    (mllm_from_state_dict): the weights live once (a 3B export costs one copy, not a random model plus the file)."""
    from siglip import read_safetensors
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"load_mllm: no config.json in {folder}")
    with open(path) as f:
        conf = json.load(f)
    if not isinstance(conf, dict) or "mllm" not in conf:
        raise UserError(f"{folder!r} is {model_kind(conf)}: an MLLM folder (train_mllm.py's out_dir) is needed here")
    mc = MLLMConfig(**conf.pop("mllm"))
    with torch.device("meta"):  # the expected names and shapes, without memory
        own = MLLM(mc).state_dict()
    sd = read_safetensors(os.path.join(folder, "model.safetensors"))
    if mc.tie_word_embeddings and "embed.weight" in sd:
        sd["lm_head.weight"] = sd["embed.weight"]
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or bad:
        raise UserError(f"{folder}/model.safetensors does not match its config: missing {missing}, "
                        f"unexpected {unexpected}, wrong shape {bad}")
    return mllm_from_state_dict(mc, sd).to(device).eval(), conf


def load_export(path, device):
    """-> (MLLM, text tokenizer, info), what sample.py and eval.py run. `path`: an out_dir of train_mllm.py
    (read strictly by load_mllm; its config names the text tokenizer and the image tokenizer it was
    trained with)."""
    from text import prompt_tokenizer
    if not path:
        raise UserError("--mllm is required (an out_dir of train_mllm.py)")
    if not os.path.isdir(path):
        raise UserError(f"--mllm={path!r}: expected a train_mllm.py out_dir (config.json + model.safetensors)")
    model, info = load_mllm(path, device)
    tt = info.get("text_tokenizer", "bytes")
    text_tok = prompt_tokenizer(tt or "bytes")
    if tt in ("", "bytes", "words") and (text_tok.eos_id, text_tok.vocab_size) != (model.config.eos_id, model.config.vocab_size):
        raise UserError(f"{path}: {tt or 'bytes'} text tokenizer (eos {text_tok.eos_id}, vocab {text_tok.vocab_size}) "
                        f"does not match the model (eos {model.config.eos_id}, vocab {model.config.vocab_size})")
    return model, text_tok, info


def check_texts(mllm, items):
    """Captions and questions for the MLLM exported in the folder `mllm`, checked against the text tokenizer its
    config.json names, before any model loads. Only the closed shapes vocabulary ("words") can refuse a text: a
    word outside it is one line naming the word(s), where the text came from (items: [(where, text)]) and the
    words there are. A folder that is no MLLM export is left to load_export to name."""
    path = os.path.join(mllm or "", "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        conf = json.load(f)
    if not isinstance(conf, dict) or conf.get("text_tokenizer") != "words":
        return
    from text import PromptTokenizer
    tok = PromptTokenizer("words").tok
    for where, text in items:
        bad = sorted({t for t in tok.SPLIT.findall(text.lower()) if t not in tok.ids})
        if bad:
            raise UserError(f"{where}: {', '.join(map(repr, bad))} not in the vocabulary of {mllm} (text_tokenizer "
                            f"'words', the shapes world's {len(tok.words)} words) in {text!r}; the words are: "
                            f"{' '.join(tok.words)}")


def load_image_tokenizer(path, siglip_config="", device="cpu"):
    """The frozen image tokenizer (a DualToken in eval mode, no gradients) on device: our folder or the
    authors' release (convert.load_dualtoken; siglip_config: a SigLIP folder or config.json for the
    release when the path it records is not here). The one loader of train_mllm.py, sample.py and eval.py."""
    if not path:
        raise UserError("--tokenizer is required: a DualToken folder from train_tokenizer.py / convert.py, or the "
                        "authors' release (for shapes run `python train_tokenizer.py config/shapes.py` first)")
    from convert import load_dualtoken
    return load_dualtoken(path, siglip_config=siglip_config or None).to(device).eval().requires_grad_(False)


def load_pair(cfg, device):
    """MLLM + the image tokenizer it was trained with -> (model, text_tok, image_tok, info). cfg: .mllm (see
    load_export), .tokenizer ('' -> the path the export records; set to the one used), .siglip_config (see
    load_image_tokenizer), .check_hash, .compile (if present and True: compile_tokenizer). A recorded
    tokenizer hash must match: other codes would be meaningless to the model."""
    model, text_tok, info = load_export(cfg.mllm, device)
    if not cfg.tokenizer and info.get("tokenizer"):  # recorded relative to the run folder (older runs: absolute)
        here = os.path.join(cfg.mllm, info["tokenizer"])
        cfg.tokenizer = here if os.path.exists(here) else info["tokenizer"]
    image_tok = load_image_tokenizer(cfg.tokenizer, cfg.siglip_config, device)
    check_pair(model, image_tok)
    if info.get("tokenizer_hash"):
        h = tokenizer_hash(image_tok, cfg.tokenizer)  # config.json as written + weights, as train_mllm stamps it
        if h != info["tokenizer_hash"]:
            msg = (f"--tokenizer={cfg.tokenizer!r} has hash {h}, the MLLM was trained with "
                   f"{info['tokenizer_hash']} ({info.get('tokenizer')})")
            if cfg.check_hash:
                raise UserError(msg + "; --check_hash=False only if the weights are the same and only the hash "
                                       "recipe changed (it covers the config dict: a new config field changes it)")
            print(f"warning: {msg}; continuing (--check_hash=False)")
            info["tokenizer_hash_mismatch"] = h
    if getattr(cfg, "compile", False):  # after the hash: it reads the uncompiled state dict
        compile_tokenizer(image_tok)
    return model, text_tok, image_tok, info


def two_vocabularies(image_tok):
    """True when the image tokenizer has a semantic code stack of its own (the released layout); False for
    one vocabulary: tied branches (one RVQ at the deep layer, decoded and distilled: VILA-U-like) or no
    semantic branch. Such a tokenizer gives the MLLM pixel codes only (image_codes' sem is None)."""
    return image_tok.quantizer_sem is not None


def check_pair(model, image_tok):
    """The MLLM's code vocabularies and depths must be the image tokenizer's."""
    c, t = model.config, image_tok.config
    want = dict(pix_vocab=t.vq_pix.codebook_size, pix_depth=t.vq_pix.depth, pix_dim=t.vq_pix.code_dim)
    if model.sem_book is not None:
        if not two_vocabularies(image_tok):
            raise UserError(f"the MLLM reads or draws semantic codes (input_codes={c.input_codes!r}, gen_sem="
                            f"{c.gen_sem}) but the tokenizer has one vocabulary (tied or no semantic branch)")
        want.update(sem_vocab=t.vq_sem.codebook_size, sem_depth=t.vq_sem.depth, sem_dim=t.vq_sem.code_dim)
    bad = {k: (getattr(c, k), v) for k, v in want.items() if getattr(c, k) != v}
    if bad:
        raise UserError(f"MLLM and tokenizer do not match (mllm, tokenizer): {bad}")


# ----------------------------------------------------------------------------------------------------
# what trains in each stage (paper 3.4): train_mllm.py's `trainable`, bench.py memory's table

def visual_modules(model):
    """The visual input projector and the depth heads: the modules `vis_lr` applies to."""
    return model.visual_input_modules() + [m for m in (model.pix_head, model.sem_head) if m is not None]


def set_trainable(model, mode):
    """requires_grad per stage: "all" (stages 2 and 4), "input" (stage 1: the visual input projector and the
    image position table only), "output" (stage 3: the depth heads, their output projectors included)."""
    if mode not in ("all", "input", "output"):
        raise ValueError(f"trainable={mode!r}: expected 'all', 'input' or 'output'")
    model.requires_grad_(mode == "all")
    if mode == "input":
        for m in model.visual_input_modules():
            m.requires_grad_(True)
        if model.image_pos is not None:
            model.image_pos.requires_grad_(True)
    elif mode == "output":
        model.pix_head.requires_grad_(True)
        if model.sem_head is not None:
            model.sem_head.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------
# training sequences: what train_mllm.py feeds the MLLM

CAPTION_PROMPT = "describe the image."


def sample_parts(kind, rec, text_tok, rng, caption_dropout, P, qa_per_image=1):
    """One training sequence: build_sequence parts and one loss flag per part (an image part's flag trains
    its end delimiter; its codes are trained by gen_mask). An und sample asks up to `qa_per_image` of the
    image's questions in turn, each answer ended by eos: the image (most of the sequence) is paid once."""
    if kind == "und" and rec.get("qa"):
        order = rng.permutation(len(rec["qa"]))[:qa_per_image]
        parts, flags = [("und", P)], [False]
        for j in order.tolist():
            q, a = rec["qa"][j]
            parts += [text_tok.user_prompt(q), text_tok.encode(a) + [text_tok.eos_id]]
            flags += [False, True]
        return parts, flags
    if kind in ("und", "cap"):  # an image without questions teaches captioning instead
        answer = text_tok.encode(rec["caption"]) + [text_tok.eos_id]
        return [("und", P), text_tok.user_prompt(CAPTION_PROMPT), answer], [False, False, True]
    cap = [] if rng.random() < caption_dropout else text_tok.encode(rec["caption"])
    return [cap, ("gen", P), [text_tok.eos_id]], [False, True, True]  # + <image_gen_end>, eos and the codes


def loss_mask(mc, parts, flags):
    """(T,) bool, True at the tokens that are text targets, aligned with build_sequence(mc, parts)."""
    m = [False] if mc.bos_id is not None else []
    for p, f in zip(parts, flags):
        if isinstance(p, tuple):
            m += [False] * (p[1] + 1) + [f]  # start delimiter, positions, end delimiter
        else:
            m += [f] * len(p)
    return torch.tensor(m)


def patch_objects(objects, grid):
    """(grid * grid,) list: for each patch in raster order, the index of the shapes-world object whose cell
    holds it, or -1 (background). A cell is exactly (grid / 3)^2 patches, so grid must be a multiple of 3
    (the shapes preset: 48 px, patch 8, grid 6); every object stays inside its cell (data.py)."""
    from data import CELLS
    if grid % 3:
        raise ValueError(f"patch_objects: the patch grid {grid} does not split into 3x3 cells")
    where = {CELLS.index(o["cell"]): i for i, o in enumerate(objects)}
    g = grid // 3
    return [where.get(3 * (r // g) + c // g, -1) for r in range(grid) for c in range(grid)]


def ground_words(rec, text_tok, grid):
    """(P, W) int64, -1 padded: each patch's object words ("small red circle"; none for background), the
    targets of gen_ground_loss. Needs the record's objects (the shapes world writes them)."""
    if "objects" not in rec:
        raise UserError("gen_ground_loss needs each record's objects (cell, size, color, shape): the shapes "
                        "world writes them, a JSONL does not")
    words = [text_tok.encode(f"{o['size']} {o['color']} {o['shape']}") for o in rec["objects"]]
    W = max([len(w) for w in words], default=1)
    out = np.full((grid * grid, W), -1, dtype=np.int64)
    for p, i in enumerate(patch_objects(rec["objects"], grid)):
        if i >= 0:
            out[p, :len(words[i])] = words[i]
    return out


def make_batch(mc, items):
    """items: (parts, flags, pix (P, Dp), sem (P, Ds) or None[, ground words (P, W)]) -> the MLLM.forward
    keyword dict (sem_codes when the items carry them, ground_words likewise)."""
    seqs = [build_sequence(mc, it[0]) for it in items]
    b = collate_sequences(mc, seqs)
    T = b["idx"].shape[1]
    lm = torch.zeros(len(items), T, dtype=torch.bool)
    for i, it in enumerate(items):  # left padded like collate_sequences
        m = loss_mask(mc, it[0], it[1])
        lm[i, T - m.numel():] = m
    b["targets"] = make_targets(b["idx"], b["image_mask"], b["attention_mask"], lm)
    b["pix_codes"] = torch.cat([torch.from_numpy(np.array(it[2])).long() for it in items])  # (N, Dp)
    if items[0][3] is not None:  # None: a one-vocabulary tokenizer's cache (pixel codes only)
        b["sem_codes"] = torch.cat([torch.from_numpy(np.array(it[3])).long() for it in items])
    if len(items[0]) > 4:
        W = max(it[4].shape[1] for it in items)
        b["ground_words"] = torch.from_numpy(np.concatenate(
            [np.pad(it[4], ((0, 0), (0, W - it[4].shape[1])), constant_values=-1) for it in items]))  # (N, W)
    return b


# ----------------------------------------------------------------------------------------------------
# prompts, codes and generation with the image tokenizer

def qa_prompt(text_tok, question):
    """The question as train_mllm.py formats it (after <im_start> image <im_end>)."""
    return text_tok.user_prompt(question)


def gen_prompt(text_tok, caption):
    """The caption as train_mllm.py formats it (before <image_gen_start>)."""
    return text_tok.encode(caption)


@torch.no_grad()
def image_codes(image_tok, x):
    """(B, 3, R, R) -> (pix (B, N, Dp), sem (B, N, Ds)) in raster order, what the MLLM reads: the code cache
    (train_mllm.py), eval.py's QA / caption swap and sample.py answer take codes from here (eval.py's
    tokenizer ceiling and sample.py reconstruct call DualToken.encode itself). DualToken.encode runs in fp32
    with autocast off, so codes do not depend on the caller's autocast (bf16 changes deep residual codes).
    sem is None for a one-vocabulary tokenizer (two_vocabularies): a tied one's semantic codes ARE its pixel codes."""
    pix, sem = image_tok.encode(x)  # (B, h, w, D) each
    return pix.flatten(1, 2), sem.flatten(1, 2) if two_vocabularies(image_tok) else None


def compile_tokenizer(image_tok):
    """sample.py / eval.py --compile=True: torch.compile, in place, the image tokenizer's heavy fixed-shape
    parts: each SigLIP block (dynamo serves all blocks of one shape from one graph), the pre- / post-quant
    projections, the post-quant ResBlock and the conv decoder. Module.compile keeps parameter names. The
    quantizers' search loop runs eagerly between them, and so does the MLLM: its decoding shapes change every
    token, so torch.compile would recompile at each (CUDA graphs would be the tool there, not this)."""
    t = image_tok
    parts = [*t.siglip.vision.blocks, t.prequant_pix, t.prequant_shortcut, t.prequant_sem, t.postquant_pix,
             t.postquant_sem, t.post_quant_conv, t.decoder]
    for m in parts:
        if m is not None:
            m.compile()
    return image_tok


@torch.no_grad()
def generate_images(model, image_tok, text_tok, captions, generator=None, batch_size=16, **sampling):
    """Captions -> decoded images (B, 3, R, R) in about [-1, 1], one per caption, and the pixel codes
    (B, h, w, Dp). Only the pixel codes are decoded (design §5). sampling: MLLM.generate_image's
    cfg_scale (None = no guidance), temperature, fine_temperature, top_k, top_p."""
    g = image_tok.config.grid
    images, codes = [], []
    for i in range(0, len(captions), batch_size):
        prompts = [gen_prompt(text_tok, c) for c in captions[i:i + batch_size]]
        pix, _ = model.generate_image(prompts, g * g, generator=generator, **sampling)
        pix = pix.view(len(prompts), g, g, -1)  # (B, h, w, Dp)
        images.append(image_tok.decode(pix.to(next(image_tok.parameters()).device)).float())
        codes.append(pix)
    return torch.cat(images), torch.cat(codes)


# ----------------------------------------------------------------------------------------------------
# the code cache: what train_mllm.py trains on (the frozen image tokenizer runs once over the data)

def source_split(cfg, split, R):
    """-> (n, item(i) -> (record dict with caption / qa (/ objects for shapes), image (3, R, R) tensor)).
    cfg: train_mllm's config (data, eval_data, max_objects, seed, holdout_pairs, detail_qa, train_size, eval_size)."""
    import data
    if cfg.data == "shapes":
        world = data.ShapesWorld(data.ShapesConfig(image_size=R, max_objects=cfg.max_objects, seed=cfg.seed,
                                                   detail_qa=cfg.detail_qa,
                                                   holdout_pairs=tuple(tuple(p) for p in cfg.holdout_pairs)))

        def item(i):
            s = world.sample(split, i)
            rec = dict(caption=s["caption"], qa=[list(p) for p in s["qa"]], objects=s["objects"])
            return rec, data.to_tensor(s["image"])
        return (cfg.train_size if split == "train" else cfg.eval_size), item
    path = cfg.data if split == "train" else cfg.eval_data
    if not path or not path.endswith(".jsonl") or not os.path.isfile(path):
        raise UserError(f"{'data' if split == 'train' else 'eval_data'}={path!r}: expected 'shapes' or a .jsonl")
    # the trainers' one JSONL reader: every record checked up front (file:line), missing / undecodable
    # images skipped and counted; one that fails later is replaced by the next good record, with its text
    ds = data.ImageCaptionDataset(path, data.eval_transform(R), with_qa=True)

    def item(i):
        it = ds[i]
        return dict(image=it["path"], caption=it["caption"], qa=it["qa"]), it["image"]
    return len(ds), item


def cache_meta(cfg, image_tok, thash):
    q, two = image_tok.config, two_vocabularies(image_tok)
    return dict(tokenizer_hash=thash, grid=q.grid, pix_depth=q.vq_pix.depth, sem_depth=q.vq_sem.depth if two else None,
                pix_vocab=q.vq_pix.codebook_size, sem_vocab=q.vq_sem.codebook_size if two else None,
                data=dict(data=cfg.data, eval_data=cfg.eval_data, max_objects=cfg.max_objects, seed=cfg.seed,
                          **({"detail_qa": True} if cfg.detail_qa else {}),  # absent when off: older caches stay valid
                          holdout_pairs=[list(p) for p in cfg.holdout_pairs],
                          train_size=cfg.train_size if cfg.data == "shapes" else None,
                          eval_size=cfg.eval_size if cfg.data == "shapes" else None))


def _codes_file(path, dt, shape):
    return np.lib.format.open_memmap(path, "w+", dt, shape)


@torch.no_grad()
def prepare_cache(cfg, image_tok, thash, folder, device, ctx=None, verbose=True):
    """Encode every image once -> the cache in `folder` (train_mllm.py's cache_dir); every rank calls it.
    Under torchrun (ctx.ddp) rank r encodes the contiguous shard [n*r/W, n*(r+1)/W) of each split into
    its own files and rank 0 merges them in rank order, so the build takes 1/W of the time and no rank
    waits in a barrier for the whole encode (a real-size build exceeds the NCCL timeout). The cache is
    built in `folder`/.building and moved in when complete: the old meta.json removed, the files renamed
    (same filesystem: atomic each), the new meta.json last. A reader (CodeCache needs meta.json) sees a
    finished cache or none, never a half-written one: a crash during a --prepare=True rebuild used to leave
    the old meta.json beside new zero-filled code arrays, which passed every check; now it leaves the old
    cache whole. Only cache files are touched, so cache_dir may be any folder. -> meta (sizes on rank 0)."""
    import shutil
    import time
    import train_utils as tu
    ddp = ctx is not None and ctx.ddp
    rank, world = (ctx.rank, ctx.world) if ddp else (0, 1)
    barrier = torch.distributed.barrier if ddp else (lambda: None)
    tmp = os.path.join(folder, ".building")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a build that crashed before
        os.makedirs(tmp)
    barrier()
    meta = cache_meta(cfg, image_tok, thash)
    R, P = image_tok.config.siglip.vision.image_size, meta["grid"] ** 2
    big = max(meta["pix_vocab"], meta["sem_vocab"] or 0) > np.iinfo(np.int16).max
    dt = np.int32 if big else np.int16
    depth = dict(pix=meta["pix_depth"], **({"sem": meta["sem_depth"]} if meta["sem_depth"] else {}))
    splits = ("train", "val") if cfg.data == "shapes" or cfg.eval_data else ("train",)
    t0 = time.time()
    sizes = {}
    for split in splits:
        n, item = source_split(cfg, split, R)
        lo, hi = n * rank // world, n * (rank + 1) // world
        part = os.path.join(tmp, f"{split}.rank{rank}")
        out = {k: _codes_file(f"{part}_{k}.npy", dt, (hi - lo, P, d)) for k, d in depth.items()}
        recs = []
        for s in range(lo, hi, cfg.prepare_batch):
            idx = range(s, min(s + cfg.prepare_batch, hi))
            got = [item(i) for i in idx]
            recs += [r for r, _ in got]
            x = torch.stack([im for _, im in got]).to(device)
            codes = dict(zip(("pix", "sem"), image_codes(image_tok, x)))  # (B, P, D) each, raster order, fp32
            for k, a in out.items():
                a[s - lo:s - lo + len(idx)] = codes[k].cpu().numpy().astype(dt)
        for a in out.values():
            a.flush()
        del out
        with open(f"{part}_index.json", "w") as f:
            json.dump(recs, f)
        sizes[split] = n
    barrier()  # every shard written
    if rank == 0:
        for split, n in sizes.items():
            recs = []
            for k, d in depth.items():
                full, off = _codes_file(os.path.join(tmp, f"{split}_{k}.npy"), dt, (n, P, d)), 0
                for r in range(world):
                    a = np.load(os.path.join(tmp, f"{split}.rank{r}_{k}.npy"), mmap_mode="r")
                    full[off:off + len(a)] = a
                    off += len(a)
                full.flush()
                del full
            for r in range(world):
                with open(os.path.join(tmp, f"{split}.rank{r}_index.json")) as f:
                    recs += json.load(f)
                for k in (*depth, "index"):
                    ext = "json" if k == "index" else "npy"
                    os.remove(os.path.join(tmp, f"{split}.rank{r}_{k}.{ext}"))
            if len(recs) != n:
                raise RuntimeError(f"code cache {split}: {len(recs)} records merged, expected {n}")
            with open(os.path.join(tmp, f"{split}_index.json"), "w") as f:
                json.dump(recs, f)
            meta[f"{split}_size"] = n
            if verbose:
                print(f"cache: {split} {n} images encoded on {world} process(es) ({time.time() - t0:.0f} s)")
        tu.write_json(meta, os.path.join(tmp, "meta.json"))
        if os.path.exists(os.path.join(folder, "meta.json")):
            os.remove(os.path.join(folder, "meta.json"))  # from here until the last replace: no cache
        for name in sorted(os.listdir(tmp), key=lambda f: f == "meta.json"):  # meta.json last
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        os.rmdir(tmp)
    barrier()  # the cache is in place for every rank
    return meta


class CodeCache:
    """Read side of the cache: pix / sem memory-mapped (N, P, D) arrays and the records of one split (sem is
    None for a one-vocabulary tokenizer)."""

    def __init__(self, folder, split, expect):
        path = os.path.join(folder, "meta.json")
        if not os.path.isfile(path):
            raise UserError(f"no code cache in {folder} (no meta.json): run with --prepare=True")
        with open(path) as f:
            meta = json.load(f)
        if meta["tokenizer_hash"] != expect["tokenizer_hash"]:
            raise UserError(f"code cache {folder} was made by tokenizer {meta['tokenizer_hash']}, the configured "
                            f"tokenizer is {expect['tokenizer_hash']}: delete the cache or run --prepare=True")
        diff = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
        if diff:
            raise UserError(f"code cache {folder} does not match this run (cache, run): {diff}; "
                            f"run --prepare=True to rebuild it")
        if f"{split}_size" not in meta:
            raise UserError(f"code cache {folder} has no {split!r} split")
        self.pix = np.load(os.path.join(folder, f"{split}_pix.npy"), mmap_mode="r")
        self.sem = np.load(os.path.join(folder, f"{split}_sem.npy"), mmap_mode="r") if meta["sem_depth"] else None
        with open(os.path.join(folder, f"{split}_index.json")) as f:
            self.records = json.load(f)
        n = meta[f"{split}_size"]
        n_sem = len(self.pix) if self.sem is None else len(self.sem)
        if not (len(self.pix) == n_sem == len(self.records) == n):
            raise UserError(f"code cache {folder}/{split}: {len(self.pix)} pix, {n_sem} sem, "
                            f"{len(self.records)} records, meta says {n}")
        if split == "train" and n == 0:
            raise UserError(f"code cache {folder}: the train split has no images")

    def __len__(self):
        return len(self.records)
