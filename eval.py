"""
Measure the tokenizer and the MLLM the way the paper does (design §7), on the shapes world or on
real data. Every number is printed next to the settings that produced it and written to one JSON file.

    python eval.py tokenizer --tokenizer=out-shapes/tokenizer --teacher=out-shapes/siglip --data=shapes
    python eval.py tokenizer --tokenizer=DIR --teacher=SIGLIP_DIR --data=/path/to/imagenet/val \\
        --lpips_vgg_path=vgg16-397923af.pth --lpips_lin_path=vgg.pth --inception_path=inception-2015-12-05.pt
    python eval.py mllm --mllm=out-shapes/mllm --tokenizer=out-shapes/tokenizer
    python eval.py mllm --mllm=DIR --data=qa.jsonl          # your questions: {image, question, answer, choices?}
    python eval.py t2i --mllm=DIR --captions=caps.jsonl --siglip=SIGLIP_DIR   # your captions, judged by a SigLIP

Tokenizer: PSNR (on [0, 1] after clamping), SSIM (Gaussian 11x11, sigma 1.5, data range 1, own code),
LPIPS (only when both weight files are given), rFID (only with the optional `clean-fid` package AND a
local Inception file; otherwise "unavailable" with the reason, never a made-up number), zero-shot
top-1 / top-5 through the quantized semantic path and through the teacher (the original SigLIP), and
per-depth codebook usage / perplexity / entropy of both quantizers; on the shapes world also the code
structure (the checker on decodings of the first d pixel depths, code stacks of pure-background patches).
MLLM (shapes world): QA accuracy by question type and by number of objects, beside three controls: the
same model with every question reading another image's codes, a blind baseline (the train split's most
common answer to the question) and chance; generation judged by the checker `checker.describe` (per
attribute, all-correct, false objects, missed cells) with and without CFG; the held-out colour-shape
pairs separately. QA and generation are evaluation.py's, the protocol train_mllm.py's eval.json runs on
fewer images: the same model gets the same numbers from both.
MLLM on your questions (--data=QA.jsonl): exact match after evaluation.normalize and, on lines with
choices, the choice of highest likelihood (evaluation.qa_file). T2I: one image per caption with the recorded
sampler, scored against its caption by a SigLIP you give (evaluation.t2i, siglip.caption_scores), beside
the same score for the real images when the file has them and for shuffled captions.

Order is deterministic (no shuffling; a subset of a folder and the shuffled-image control are fixed-seed
permutations), batches run under bf16 autocast on cuda only (fp32 elsewhere); image codes are always fp32
(DualToken.encode turns autocast off), the precision the MLLM's code cache was built in.
"""
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import checker
import data
from metrics import fid_or_reason, psnr, ssim
from rvq import code_stats
from text import siglip_tokenizer
import evaluation
from evaluation import blind_baseline, derangement, question_type, scores as _scores
from codec import compile_tokenizer, image_codes, sampling_settings
from loaders import check_texts, load_image_tokenizer, load_pair
from sequences import gen_prompt, make_batch
import train_utils as tu
from configurator import UserError, command, config_dict, parse_config, read_lines, run_main
from folders import check_result_file

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES_TEMPLATES = ("a {}", "a photo of a {}", "a small {}", "a large {}")  # train_siglip / train_tokenizer's

# -----------------------------------------------------------------------------
# rFID (PSNR / SSIM: metrics.py; code statistics: rvq.code_stats)


# -----------------------------------------------------------------------------
# loading


def zero_shot(image_emb, labels, text_model, text_tok, classes, templates, batch_size=256):
    """Prompt-ensembled zero-shot (CLIP / design §7): per class the mean normalised text embedding of
    every template, top-k of the cosine with the image embedding. -> {"top1": .., "top5": ..}."""
    from siglip import zero_shot_accuracy, zero_shot_classifier
    clf = zero_shot_classifier(text_model, text_tok, list(classes), list(templates), batch_size=batch_size)
    topk = (1, 5) if len(classes) >= 5 else (1,)
    return {f"top{k}": v for k, v in zero_shot_accuracy(image_emb.float(), clf.float().cpu(), labels, topk).items()}


# -----------------------------------------------------------------------------
# python eval.py tokenizer


@dataclass
class EvalTokenizerConfig:
    tokenizer: str = ""          # our folder (config.json + model.safetensors) or the authors' release
    siglip_config: str = ""      # authors' release: SigLIP folder / config.json when pretrained_model is not here
    teacher: str = ""            # HF SigLIP folder of the ORIGINAL tower (teacher zero-shot); "" -> skipped
    data: str = "shapes"         # "shapes" or an ImageFolder root (one folder per class, e.g. ImageNet val)
    num_images: int = 500        # 0 = the whole folder; shapes: this many val images per set
    max_objects: int = 2         # shapes: reconstruction set has 1..max_objects objects; zero-shot set has 1
    shapes_seed: int = 0
    classnames: str = ""         # file, one name per line ('' -> data/imagenet_classes.txt for 1000 classes,
                                 # else the folder names)
    templates: str = ""          # file, one '{}' template per line ('' -> 80 OpenAI for folders, 4 for shapes)
    text_tokenizer: str = ""     # 'byte', a folder with spiece.model / tokenizer.json; '' -> automatic
    zero_shot: bool = True       # False: reconstruction and code statistics only
    lpips_vgg_path: str = ""     # torchvision vgg16-397923af.pth
    lpips_lin_path: str = ""     # lpips weights/v0.1/vgg.pth
    inception_path: str = ""     # clean-fid's inception-2015-12-05.pt (rFID needs clean-fid installed)
    save_images: bool = False    # keep the PNGs rFID reads (always written when rFID runs)
    batch_size: int = 32
    num_workers: int = 0
    device: str = ""
    dtype: str = "bfloat16"      # autocast dtype on cuda
    threads: int = 0             # CPU intra-op threads; 0 = torch's default
    compile: bool = False        # torch.compile the image tokenizer's blocks and decoder (codec.compile_tokenizer)
    out: str = ""                # JSON path; '' -> <tokenizer>/eval_tokenizer.json
    seed: int = 1234             # the fixed permutation that picks a folder subset


def tokenizer_sets(cfg, R):
    """-> (recon dataset, zero-shot dataset, class names, description). Zero-shot items carry "label"
    (folders) or one object (shapes: the class is its "colour shape")."""
    if cfg.num_images < 0:
        raise UserError(f"--num_images={cfg.num_images}: need a count, or 0 for the whole folder")
    if cfg.data == "shapes":
        if cfg.num_images == 0:  # 0 = "the whole folder"; the shapes world is procedural and has no end
            raise UserError("--num_images=0 means every image of a folder, and the shapes world has no end: "
                            "give a count (default 500) with --data=shapes")
        world = data.ShapesWorld(data.ShapesConfig(image_size=R, max_objects=cfg.max_objects, seed=cfg.shapes_seed))
        recon = data.ShapesDataset(world, "val", cfg.num_images)
        zs = data.ShapesDataset(world, "val", cfg.num_images, num_objects=1)
        return recon, zs, world.class_names(), f"shapes val (seed {cfg.shapes_seed}, {R} px)"
    if not os.path.isdir(cfg.data):
        raise UserError(f"--data={cfg.data!r}: expected 'shapes' or an ImageFolder root (one folder per class)")
    ds = data.ImageFolderDataset(cfg.data, data.eval_transform(R))
    n = len(ds) if cfg.num_images <= 0 else min(cfg.num_images, len(ds))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))[:n].sort().values.tolist()
    sub = torch.utils.data.Subset(ds, idx)
    classes = ds.class_names(cfg.classnames)
    desc = f"ImageFolder {cfg.data} ({n} of {len(ds)} images, {len(classes)} classes, resize short side + crop {R})"
    return sub, sub, classes, desc


def _loader(ds, cfg):
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                                       collate_fn=data.collate)


def _labels(batch, classes):
    if "label" in batch:
        return batch["label"]
    return torch.tensor([classes.index(f"{objs[0]['color']} {objs[0]['shape']}") for objs in batch["objects"]])


@torch.no_grad()
def eval_tokenizer(cfg):
    """A tokenizer's reconstruction (PSNR, SSIM, LPIPS, rFID), zero-shot through its semantic codes, code statistics."""
    from tqdm import tqdm
    from losses import lpips_or_none
    from siglip import SigLIP
    t0 = time.time()
    device = cfg.device or tu.default_device()
    model = load_image_tokenizer(cfg.tokenizer, cfg.siglip_config, device)
    if cfg.compile:
        compile_tokenizer(model)
    R = model.config.siglip.vision.image_size
    teacher = SigLIP.from_pretrained(cfg.teacher).to(device).eval() if cfg.teacher else None
    lpips, lpips_msg = lpips_or_none(cfg.lpips_vgg_path, cfg.lpips_lin_path)
    lpips = lpips.to(device).eval() if lpips is not None else None
    recon_ds, zs_ds, classes, desc = tokenizer_sets(cfg, R)
    if cfg.templates:
        templates = read_lines(cfg.templates, "templates")
    elif cfg.data == "shapes":
        templates = list(SHAPES_TEMPLATES)
    else:
        templates = read_lines(os.path.join(HERE, "data", "imagenet_templates.txt"), "templates")
    if any("{}" not in t for t in templates):
        raise UserError(f"templates: every line needs a '{{}}' for the class name, got {templates}")
    autocast = tu.autocast_ctx(device, cfg.dtype)
    fid_on = bool(cfg.inception_path)
    home = cfg.tokenizer if os.path.isdir(cfg.tokenizer) else os.path.dirname(os.path.abspath(cfg.tokenizer))
    out_path = cfg.out or os.path.join(home, "eval_tokenizer.json")
    img_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "eval_images")
    if fid_on or cfg.save_images:
        os.makedirs(os.path.join(img_dir, "real"), exist_ok=True)
        os.makedirs(os.path.join(img_dir, "recon"), exist_ok=True)

    # reconstruction and codes
    ps, ss, lp, pix, sem, n = [], [], [], [], [], 0
    for batch in tqdm(_loader(recon_ds, cfg), desc="reconstruct", dynamic_ncols=True):
        x = batch["image"].to(device)
        with autocast:
            out = model(x)
        rec = out.recon.float()
        ps.append(psnr(x, rec).cpu())
        ss.append(ssim(x, rec).cpu())
        if lpips is not None:
            lp.append(lpips(x.float(), rec.clamp(-1, 1), reduction="none").float().cpu())
        pix.append(out.pix_codes.reshape(-1, out.pix_codes.shape[-1]).cpu())
        if out.sem_codes is not None:  # None: a reconstruction-only tokenizer (ablation.py's runs b and c)
            sem.append(out.sem_codes.reshape(-1, out.sem_codes.shape[-1]).cpu())
        if fid_on or cfg.save_images:
            for a, b in zip(data.to_image(x), data.to_image(rec)):
                data.save_png(a, os.path.join(img_dir, "real", f"{n:06d}.png"))
                data.save_png(b, os.path.join(img_dir, "recon", f"{n:06d}.png"))
                n += 1
    res = {"psnr": torch.cat(ps).mean().item(), "ssim": torch.cat(ss).mean().item(),
           "lpips": torch.cat(lp).mean().item() if lp else None, "lpips_note": lpips_msg}
    res["rfid"], res["rfid_note"] = fid_or_reason(os.path.join(img_dir, "real"), os.path.join(img_dir, "recon"),
                                                  cfg.inception_path, device)
    if res["rfid"] is not None and n < 2048:
        res["rfid_note"] += f" (only {n} images: FID is biased upward below ~10k and rank-deficient below 2048)"
    codes_pix, codes_sem = torch.cat(pix), torch.cat(sem) if sem else None
    if cfg.data == "shapes":  # the first (at most 200) reconstruction samples, with their objects and background
        cs = [recon_ds.world.sample("val", i) for i in range(min(len(recon_ds), 200))]
        res["code_structure"] = evaluation.code_structure(model, cs, cfg.batch_size, device, autocast)

    # zero-shot: one classifier from the tokenizer's (frozen) text tower, else the teacher's
    zs = {"classes": len(classes), "templates": len(templates)}
    text_model = model.siglip if model.siglip.text is not None else (teacher if teacher is not None and
                                                                     teacher.text is not None else None)
    if not cfg.zero_shot:
        zs["note"] = "skipped: --zero_shot=False"
    elif text_model is None:
        zs["note"] = "unavailable: the tokenizer has no text tower and no --teacher was given"
    else:
        text_tok, zs["text_tokenizer"] = siglip_tokenizer(cfg.text_tokenizer, [cfg.teacher, cfg.siglip_config,
                                                                                cfg.tokenizer], cfg.data == "shapes",
                                                           (text_model, teacher))
        q_emb, t_emb, labels = [], [], []
        for batch in tqdm(_loader(zs_ds, cfg), desc="zero-shot", dynamic_ncols=True):
            x = batch["image"].to(device)
            labels.append(_labels(batch, classes))
            with autocast:
                if model.config.semantic_branch:
                    q_emb.append(model.encode_image(x).float().cpu())
                if teacher is not None:
                    t_emb.append(teacher.encode_image(x).float().cpu())
        labels = torch.cat(labels)
        bs = max(cfg.batch_size, 64)
        if q_emb:
            zs.update({f"quantized_{k}": v for k, v in
                       zero_shot(torch.cat(q_emb), labels, text_model, text_tok, classes, templates, bs).items()})
        else:
            zs["note"] = "n/a for the tokenizer: reconstruction-only (semantic_branch=False), no semantic codes"
        if teacher is not None:
            t_text = teacher if teacher.text is not None else text_model
            zs.update({f"teacher_{k}": v for k, v in
                       zero_shot(torch.cat(t_emb), labels, t_text, text_tok, classes, templates, bs).items()})
        else:
            zs["teacher_note"] = "skipped: no --teacher (the original SigLIP folder) given"
        zs["n_images"] = len(labels)
    res["zero_shot"] = zs
    for key, codes, K in (("codes_pix", codes_pix, model.config.vq_pix.codebook_size),
                          ("codes_sem", codes_sem, model.config.vq_sem.codebook_size)):  # codes (M, depth)
        res[key] = None if codes is None else dict({k: v.tolist() for k, v in code_stats(codes, K).items()}, max_entropy_bits=math.log2(K),
                        n_vectors=codes.shape[0])
    res.update(data=desc, n_images=len(recon_ds), resolution=R, device=device,
               dtype=cfg.dtype if device.startswith("cuda") else "float32", wall_s=time.time() - t0,
               template_list=templates, config=config_dict(cfg))
    s = f"[{desc}, n={len(recon_ds)}]"
    print(f"PSNR   {res['psnr']:.3f} dB   {s} on [0,1] after clamping")
    print(f"SSIM   {res['ssim']:.4f}      {s} Gaussian 11x11 sigma 1.5, data range 1, valid")
    print(f"LPIPS  {'%.4f' % res['lpips'] if res['lpips'] is not None else 'unavailable'}      {s} {lpips_msg}")
    print(f"rFID   {'%.3f' % res['rfid'] if res['rfid'] is not None else 'unavailable'}      {s} {res['rfid_note']}")
    zdesc = f"[{len(classes)} classes x {len(templates)} templates, text tokenizer {zs.get('text_tokenizer')}, " \
        f"n={zs.get('n_images')}]"
    for k in ("quantized_top1", "quantized_top5", "teacher_top1", "teacher_top5"):
        if k in zs:
            print(f"zero-shot {k:15s} {zs[k]:.4f}   {zdesc}")
    for k in ("note", "teacher_note"):
        if k in zs:
            print(f"zero-shot: {zs[k]}")
    for q in ("pix", "sem"):
        c = res[f"codes_{q}"]
        if c is None:
            print(f"codes {q}: none (reconstruction-only tokenizer)")
            continue
        print(f"codes {q}: usage/depth {[round(v, 4) for v in c['usage']]}, perplexity/depth "
              f"{[round(v, 1) for v in c['perplexity']]}, entropy bits/depth {[round(v, 2) for v in c['entropy_bits']]}"
              f" (max {c['max_entropy_bits']:.2f}), any depth {c['usage_any_depth']:.4f}   [{c['n_vectors']} vectors, {s}]")
    if "code_structure" in res:
        cs = res["code_structure"]
        where = f"[{desc}, n={cs['n']}]"
        for d, v in enumerate(cs["depth_curve"], 1):
            attrs = ", ".join(f"{k} {v[k]:.3f}" for k in ("count",) + checker.ATTRS)
            print(f"codes pix first {d} depth(s) decoded: all-correct {v['all_correct']:.4f}, {attrs}   {where}")
        b = cs["background"]
        print(f"codes pix on pure-background patches: {b['distinct_stacks']} distinct stacks for {b['patches']} "
              f"patches of {b['colours']} solid colour(s) (ideal: one per colour)   {where}")
    return _write(res, out_path)


def _write(res, path):
    """Atomically: an eval JSON a user keeps is never left half-written by a crash."""
    tu.write_json(res, path)
    print(f"wrote {path}")
    return res


# -----------------------------------------------------------------------------
# python eval.py mllm (shapes world)




def _run_info(cfg, info, device, t0):
    """What every MLLM eval JSON records beside its numbers."""
    return dict(mllm=cfg.mllm, tokenizer=cfg.tokenizer, tokenizer_hash=info.get("tokenizer_hash"),
                tokenizer_hash_mismatch=info.get("tokenizer_hash_mismatch"), device=device,
                dtype=cfg.dtype if device.startswith("cuda") else "float32", wall_s=time.time() - t0,
                config=config_dict(cfg))


@dataclass
class EvalMLLMCommon:
    """The settings eval.py mllm and eval.py t2i share."""
    mllm: str = ""               # out_dir of train_mllm.py
    tokenizer: str = ""          # '' -> the tokenizer recorded in the MLLM's config.json (hash-checked)
    check_hash: bool = True      # False: accept a tokenizer hash mismatch (same weights, changed hash recipe)
    siglip_config: str = ""
    # sampler; None: as the MLLM's trainer evaluated it (config.json "sampling"; codec.sampling_settings)
    cfg_scale: Optional[float] = None         # <= 0: off (eval.py mllm always adds an unguided run)
    temperature: Optional[float] = None
    fine_temperature: Optional[float] = None  # depths 2..; < 0: = temperature
    top_k: Optional[int] = None               # <= 0: off
    top_p: Optional[float] = None             # <= 0 or >= 1: off
    batch_size: int = 32
    seed: int = 0                # sampling, and the derangement of the shuffled controls
    device: str = ""
    dtype: str = "bfloat16"
    threads: int = 0             # CPU intra-op threads; 0 = torch's default (1 is faster for tiny models)
    compile: bool = False        # torch.compile the image tokenizer's blocks and decoder (codec.compile_tokenizer)
    #                              and the MLLM's decode step for drawing (decode.py: the same codes)
    out: str = ""                # '' -> <mllm>/eval_mllm.json (eval_qa.json with a .jsonl --data; eval_t2i.json)


@dataclass
class EvalMLLMConfig(EvalMLLMCommon):
    data: str = "shapes"         # or a .jsonl of {"image", "question", "answer", "choices"?} lines (qa_file)
    max_objects: int = 2         # the shapes world the MLLM was trained on (train_mllm's max_objects / seed)
    shapes_seed: int = 0
    holdout_pairs: tuple = ()    # e.g. (("red", "triangle"),): pairs kept out of training; () -> no holdout eval
    detail_qa: Optional[bool] = None  # ask the background's colour too; None: as the MLLM was trained (config.json)
    qa_images: int = 100         # val images; every question of each is asked
    gen_captions: int = 100      # val captions drawn, with and without CFG
    holdout_images: int = 100    # holdout split: questions and captions (needs holdout_pairs)
    train_images: int = 100      # train-split images 0.., every question (in the trainer's cache if its train_size
    #                              covers them): QA on images it trained on beside val tells memorising from learning
    max_new_tokens: int = evaluation.MAX_ANSWER_TOKENS  # answers are one or two words (the trainer asks the same)
    blind_samples: int = 2000    # train samples whose QA pairs give the blind baseline and the chance levels


def cat_codes(batches):
    """[(pix, sem), ...] per batch (codec.image_codes) -> (pix, sem) on the CPU; sem None for a
    one-vocabulary tokenizer."""
    pix = torch.cat([p.cpu() for p, _ in batches])
    return pix, None if batches[0][1] is None else torch.cat([s.cpu() for _, s in batches])


@torch.no_grad()
def qa_eval(model, text_tok, image_tok, samples, cfg, device, autocast, train_qa=()):
    """Every question of every sample, greedy, exact match after strip, with the controls that say whether
    the model reads the image. train_qa: the train split's (question, answer) pairs (blind_baseline). ->
    "qa": accuracy, n, chance (mean over the questions of their type's chance; None if a type lacks one),
      by_type {type: {accuracy, n, chance}}, by_objects {"1", "2", ..: {accuracy, n}} (objects in the
      image), examples (the first 6 questions: q, truth, pred);
    "qa_shuffled": accuracy, n, by_type {type: {accuracy, n}}: the same questions, each reading another
      image's codes (derangement seeded by cfg.seed). A model that reads the image falls to about the
      blind baseline; one that answers from the question alone stays at "qa" (+ note with one image);
    "qa_blind": accuracy, n, by_type {type: {accuracy, n}}: no model, blind_baseline's answers;
    "qa_pix_swapped" / "qa_sem_swapped" (a model that reads both stacks): the same questions with only the
      pixel (semantic) codes taken from the deranged image, the other stack the image's own: which stack the
      model reads for what (a type that falls to about the blind baseline reads the swapped stack)."""
    codes = []
    for k in range(0, len(samples), cfg.batch_size):
        x = torch.stack([data.to_tensor(s["image"]) for s in samples[k:k + cfg.batch_size]]).to(device)
        codes.append(image_codes(image_tok, x))  # fp32, like the training cache
    pix, sem = cat_codes(codes)  # (n, N, D)
    run = dict(batch_size=cfg.batch_size, autocast=autocast, max_new_tokens=cfg.max_new_tokens)
    r = evaluation.qa(model, text_tok, samples, pix, sem, len(samples), desc="qa", **run)  # the trainer's QA too
    rows, pred = r["rows"], r["pred"]
    perm = torch.from_numpy(derangement(len(samples), cfg.seed))
    shuffled = evaluation.answers(model, text_tok, rows, pix[perm], None if sem is None else sem[perm],
                                  desc="qa shuffled images", **run)
    # per-stack controls: one stack from the deranged image, the other kept (only a model that reads both)
    swaps = {}
    if model.reads_pix and model.reads_sem:
        swaps["qa_pix_swapped"] = evaluation.answers(model, text_tok, rows, pix[perm], sem,
                                                     desc="qa pixel codes swapped", **run)
        swaps["qa_sem_swapped"] = evaluation.answers(model, text_tok, rows, pix, sem[perm],
                                                     desc="qa semantic codes swapped", **run)
    blind, chance = blind_baseline(train_qa, [q for _, q, _ in rows])
    truth = [a for _, _, a in rows]
    types = [question_type(q) for _, q, _ in rows]
    acc, by_type = r["accuracy"], r["by_type"]
    for t, v in by_type.items():
        v["chance"] = chance.get(t)
    per_q = [chance.get(t) for t in types]
    qa = dict(accuracy=acc, n=len(rows), chance=None if None in per_q else sum(per_q) / max(len(per_q), 1),
              by_type=by_type, by_objects=_scores(pred, truth, [str(len(samples[i]["objects"])) for i, _, _ in rows])[1],
              examples=[dict(q=q, truth=a, pred=p) for (_, q, a), p in list(zip(rows, pred))[:6]])
    res = {"qa": qa}
    for name, p in (("qa_shuffled", shuffled), ("qa_blind", blind), *swaps.items()):
        acc, by_type = _scores(p, truth, types)
        res[name] = dict(accuracy=acc, n=len(rows), by_type=by_type)
    if not swaps:
        res["qa_stack_note"] = f"the model reads one stack (input_codes={model.config.input_codes!r}): no per-stack swap"
    if len(samples) < 2:
        res["qa_shuffled"]["note"] = "one image: nothing to shuffle, the same as qa"
    return res


@torch.no_grad()
def gen_eval(model, text_tok, image_tok, samples, cfg, device, autocast, sampling):
    """Generate from the captions and judge: checker.score_images' keys plus false_objects, missed_cells."""
    caps, objs = [s["caption"] for s in samples], [s["objects"] for s in samples]
    return evaluation.generation(model, text_tok, image_tok, caps, objs, dict(sampling, compile_decode=cfg.compile),
                                 cfg.seed, cfg.batch_size, autocast)


SWAP_VALUES = {"color": tuple(data.COLORS), "shape": data.SHAPES, "size": data.SIZES}


@torch.no_grad()
def caption_swap(model, text_tok, image_tok, samples, cfg, device, autocast):
    """Does drawing read each caption word? On one-object images, the teacher-forced pixel-code loss at the
    first patch (raster order) of the object's cell, where nothing drawn before shows the object, with the
    true caption and with one word (colour, shape or size) swapped for the next value. 'added' near 0: the
    model draws that attribute without reading it (found so for colour, docs/experiments.md 2026-11-30)."""
    one = [s for s in samples if len(s["objects"]) == 1]
    mc = model.config
    if not one:
        return dict(n=0, note="no one-object image among the generation samples")
    x = torch.stack([data.to_tensor(s["image"]) for s in one]).to(device)
    pix, sem = image_codes(image_tok, x)  # (n, P, D), fp32 like the training cache
    P = pix.shape[1]
    g = math.isqrt(P)
    if g * g != P or g % 3:
        return dict(n=0, note=f"a {g}x{g} code grid does not split into the world's 3x3 cells")

    def first_patch_nll(objs):
        caps = [data.caption([o]) for o in objs]
        items = [([gen_prompt(text_tok, c), ("gen", P), [mc.eos_id]], [False, True, True], pix[i].cpu(),
                  None if sem is None else sem[i].cpu()) for i, c in enumerate(caps)]
        b = {k: v.to(device) for k, v in make_batch(mc, items).items()}
        with autocast:
            nll = model.image_code_nll(b["idx"], b["image_mask"], b["pix_codes"], b.get("sem_codes"),
                                       b["attention_mask"], b["gen_mask"])
        out = []
        for i, o in enumerate(objs):
            r, c = divmod(data.CELLS.index(o["cell"]), 3)
            t = b["image_mask"][i].nonzero()[(r * g // 3) * g + c * g // 3, 0]  # the cell's first patch
            out.append(float(nll[i, t]))
        return float(np.mean(out))

    objs = [s["objects"][0] for s in one]
    true = first_patch_nll(objs)
    added = {}
    for k, vals in SWAP_VALUES.items():
        swapped = [dict(o, **{k: vals[(vals.index(o[k]) + 1) % len(vals)]}) for o in objs]
        added[k] = first_patch_nll(swapped) - true
    return dict(n=len(one), true_nll=true, added=added)


@torch.no_grad()
def tokenizer_ceiling(image_tok, samples, cfg, device, autocast):
    """The checker on the tokenizer's own decoding of the true images (encode -> decode pixel codes): no
    generated image can score above what the decoder can draw (evaluation.ceiling, which the trainer runs on
    its cached codes). Same keys as gen_eval."""
    pix = []
    for k in range(0, len(samples), cfg.batch_size):
        x = torch.stack([data.to_tensor(s["image"]) for s in samples[k:k + cfg.batch_size]]).to(device)
        pix.append(image_tok.encode(x)[0])  # fp32 (DualToken.encode), like the training cache
    return evaluation.ceiling(image_tok, torch.cat(pix), [s["objects"] for s in samples], cfg.batch_size, device,
                              autocast)


def eval_qa_file(cfg):
    """eval.py mllm --data=QA.jsonl: evaluation.qa_file on the user's questions; each distinct image is read
    (data.read_image: shortest side to R, centre crop, as train_mllm reads a JSONL) and encoded once."""
    recs = evaluation.read_qa_jsonl(cfg.data)  # every line checked before the model loads
    check_texts(cfg.mllm, [(r["where"], t) for r in recs for t in (r["question"], *(r["choices"] or ()))])
    t0, device = time.time(), cfg.device or tu.default_device()
    model, text_tok, image_tok, info = load_pair(cfg, device)
    R, autocast = image_tok.config.siglip.vision.image_size, tu.autocast_ctx(device, cfg.dtype)
    first = {}  # image path -> the first line that asks about it (named if it does not decode)
    for r in recs:
        first.setdefault(r["image"], r["where"])
    paths, codes = list(first), []
    for k in range(0, len(paths), cfg.batch_size):
        x = torch.stack([data.read_image(p, R, first[p]) for p in paths[k:k + cfg.batch_size]]).to(device)
        codes.append(image_codes(image_tok, x))  # fp32, like the training cache
    pix, sem = cat_codes(codes)  # (n_images, N, D)
    index = {p: j for j, p in enumerate(paths)}
    r = evaluation.qa_file(model, text_tok, recs, [index[q["image"]] for q in recs], pix, sem, cfg.batch_size,
                           autocast, cfg.max_new_tokens, desc="qa")
    res = dict(data=cfg.data, qa=r, n_images=len(paths), **_run_info(cfg, info, device, t0))
    where = f"[{cfg.data}: {r['n']} questions on {len(paths)} images, {R} px, mllm {cfg.mllm}, {res['dtype']}]"
    print(f"QA exact match {r['exact_match']:.4f} (n={r['n']}; greedy, max_new_tokens={cfg.max_new_tokens}, answers "
          f"stripped, lowercased, trailing punctuation dropped)   {where}")
    if r["n_choice"]:
        print(f"QA choice accuracy {r['choice_accuracy']:.4f}, chance {r['chance']:.4f} (n={r['n_choice']} lines "
              f"with choices; the choice of highest log p(choice + eos | image, question))   {where}")
    return _write(res, cfg.out or os.path.join(cfg.mllm, "eval_qa.json"))


def eval_mllm(cfg):
    """An MLLM's QA and drawings on the shapes world beside their controls, or its QA on your questions."""
    if cfg.data != "shapes":
        if not cfg.data.endswith(".jsonl"):
            raise UserError(f"--data={cfg.data!r}: expected 'shapes' or a .jsonl of question lines")
        return eval_qa_file(cfg)
    for k in ("qa_images", "gen_captions", "train_images", "holdout_images"):
        if getattr(cfg, k) < 0:
            raise UserError(f"--{k}={getattr(cfg, k)}: need >= 0 (0 skips that part)")
    if not (cfg.qa_images or cfg.gen_captions or cfg.train_images or (cfg.holdout_pairs and cfg.holdout_images)):
        raise UserError("--qa_images=0, --gen_captions=0 and --train_images=0: nothing to evaluate (0 skips one "
                        "part, not all)")
    t0 = time.time()
    device = cfg.device or tu.default_device()
    model, text_tok, image_tok, info = load_pair(cfg, device)
    R = image_tok.config.siglip.vision.image_size
    if not cfg.holdout_pairs and info.get("holdout_pairs"):  # the pairs the MLLM was trained without
        cfg.holdout_pairs = tuple(tuple(p) for p in info["holdout_pairs"])
    if cfg.detail_qa is None:
        cfg.detail_qa = bool(info.get("detail_qa", False))
    world = data.ShapesWorld(data.ShapesConfig(image_size=R, max_objects=cfg.max_objects, seed=cfg.shapes_seed,
                                               detail_qa=cfg.detail_qa,
                                               holdout_pairs=tuple(tuple(p) for p in cfg.holdout_pairs)))
    autocast = tu.autocast_ctx(device, cfg.dtype)
    sampler = sampling_settings(cfg, info)
    scales = [("cfg", sampler["cfg_scale"]), ("no_cfg", None)]
    sampling = dict(sampler, seed=cfg.seed)
    res = {"world": f"shapes (seed {cfg.shapes_seed}, {R} px, 1..{cfg.max_objects} objects)", "sampling": sampling}
    splits = [("val", cfg.qa_images, cfg.gen_captions)] + ([("train", cfg.train_images, 0)] if cfg.train_images else [])
    if cfg.holdout_pairs:
        splits.append(("holdout", cfg.holdout_images, cfg.holdout_images))
    else:
        res["holdout_note"] = "skipped: no --holdout_pairs (train the MLLM with held-out colour-shape pairs first)"
    train_qa = [p for i in range(cfg.blind_samples) for p in world.sample("train", i)["qa"]]
    for split, n_qa, n_gen in splits:  # a count of 0 skips that part
        r = qa_eval(model, text_tok, image_tok, [world.sample(split, i) for i in range(n_qa)], cfg, device, autocast,
                    train_qa) if n_qa else {}
        gen_samples = [world.sample(split, i) for i in range(n_gen)]
        if gen_samples:
            r["tokenizer_ceiling"] = tokenizer_ceiling(image_tok, gen_samples, cfg, device, autocast)
            r["caption_swap"] = caption_swap(model, text_tok, image_tok, gen_samples, cfg, device, autocast)
            for name, sc in scales:
                r[f"gen_{name}"] = dict(gen_eval(model, text_tok, image_tok, gen_samples, cfg, device, autocast,
                                                 dict(sampler, cfg_scale=sc)), cfg_scale=sc)
        res[split] = r
    res.update(_run_info(cfg, info, device, t0))
    for split, _, _ in splits:
        r, where = res[split], f"[{res['world']}, split {split}]"
        f = lambda v: "  n/a " if v is None else f"{v:.4f}"
        if "qa" in r:
            q, sh, bl = r["qa"], r["qa_shuffled"], r["qa_blind"]
            print(f"QA {split}: accuracy {q['accuracy']:.4f}, shuffled images {sh['accuracy']:.4f}, blind {bl['accuracy']:.4f}"
                  f", chance {f(q['chance'])} on {q['n']} questions (greedy, exact match; blind and chance from "
                  f"{cfg.blind_samples} train samples)   {where}")
            sw = [r[k] for k in ("qa_pix_swapped", "qa_sem_swapped") if k in r]
            print(f"   {'type':12s} {'model':6s}  {'shuffl':6s}  {'blind':6s}  {'chance':6s}"
                  + ("  pix swapped  sem swapped" if sw else ""))
            for t, v in q["by_type"].items():
                print(f"   {t:12s} {v['accuracy']:.4f}  {sh['by_type'][t]['accuracy']:.4f}  "
                      f"{bl['by_type'][t]['accuracy']:.4f}  {f(v['chance'])}"
                      + "".join(f"  {x['by_type'][t]['accuracy']:11.4f}" for x in sw) + f"  (n={v['n']})")
            print("   by objects in the image: " + ", ".join(f"{k}: {v['accuracy']:.4f} (n={v['n']})"
                                                            for k, v in q["by_objects"].items()))
        if "tokenizer_ceiling" in r:
            c = r["tokenizer_ceiling"]
            print(f"generation {split} ceiling (tokenizer decodes the true images): all-correct {c['all_correct']:.4f}, "
                  f"objects {c['objects_correct']:.3f}, false objects/image {c['false_objects']:.3f}, missed cells "
                  f"{c['missed_cells']:.3f} (n={c['n']})   {where}")
            sw = r["caption_swap"]
            if sw["n"]:
                print(f"generation {split} caption-word swap (teacher-forced pixel-code loss at the object's first "
                      f"patch, {sw['n']} one-object images): true caption {sw['true_nll']:.2f} nats; swapping "
                      + ", ".join(f"{k} {v:+.2f}" for k, v in sw["added"].items()) + f"   {where}")
            for name, _ in scales:
                gr = r[f"gen_{name}"]
                attrs = ", ".join(f"{k} {gr[k]:.3f}" for k in ("count",) + checker.ATTRS)
                print(f"generation {split} cfg_scale={gr['cfg_scale']}: all-correct {gr['all_correct']:.4f}, {attrs}, "
                      f"objects {gr['objects_correct']:.3f}, false objects/image {gr['false_objects']:.3f}, missed cells "
                      f"{gr['missed_cells']:.3f} (n={gr['n']}, {dict(sampling, cfg_scale=gr['cfg_scale'])})   {where}")
    if "holdout_note" in res:
        print(f"holdout: {res['holdout_note']}")
    return _write(res, cfg.out or os.path.join(cfg.mllm, "eval_mllm.json"))


# -----------------------------------------------------------------------------
# python eval.py t2i (the user's captions)


@dataclass
class EvalT2IConfig(EvalMLLMCommon):
    captions: str = ""           # .jsonl of {"caption", "image"?} lines, or a text file of one caption per line
    siglip: str = ""             # the judge: an HF-layout SigLIP folder WITH its text tower
    text_tokenizer: str = ""     # the judge's: 'byte' or a folder with spiece.model / tokenizer.json; '' -> --siglip
    num_captions: int = 0        # the first this many; 0 = all (the first 8 in a PNG beside the JSON)


def eval_t2i(cfg):
    """Text to image on your captions, scored by a SigLIP judge (evaluation.t2i); real images are read at the
    tokenizer's resolution R like the MLLM's training data (data.read_image): both lose the same detail."""
    from siglip import SigLIP
    if not cfg.captions or not cfg.siglip:
        raise UserError("eval.py t2i needs --captions=FILE and --siglip=FOLDER (a SigLIP with its text tower)")
    if cfg.num_captions < 0:
        raise UserError(f"--num_captions={cfg.num_captions}: need >= 0 (0 = every caption)")
    recs = evaluation.read_captions(cfg.captions)[:cfg.num_captions or None]  # checked before any model loads
    check_texts(cfg.mllm, [(r["where"], r["caption"]) for r in recs])
    t0, device = time.time(), cfg.device or tu.default_device()
    judge = SigLIP.from_pretrained(cfg.siglip).to(device).eval()
    if judge.text is None:
        raise UserError(f"--siglip={cfg.siglip!r} has no text tower: the judge must embed the captions")
    judge_tok, tname = siglip_tokenizer(cfg.text_tokenizer, [cfg.siglip], towers=(judge,))
    model, text_tok, image_tok, info = load_pair(cfg, device)
    R, sampling = image_tok.config.siglip.vision.image_size, sampling_settings(cfg, info)
    real = None if recs[0]["image"] is None else \
        data.to_image(torch.stack([data.read_image(r["image"], R, r["where"]) for r in recs]))
    caps = [r["caption"] for r in recs]
    res, gen = evaluation.t2i(model, text_tok, image_tok, judge, judge_tok, caps, dict(sampling, compile_decode=cfg.compile),
                              cfg.seed, cfg.batch_size, tu.autocast_ctx(device, cfg.dtype), real)
    res.update(captions=cfg.captions, n=len(caps), sampling=dict(sampling, seed=cfg.seed), siglip=cfg.siglip,
               siglip_text_tokenizer=tname, resolution=R, **_run_info(cfg, info, device, t0))
    where = (f"[{cfg.captions}: {len(caps)} captions, {R} px; judge {cfg.siglip} at {judge.config.vision.image_size} "
             f"px, text tokenizer {tname}; mllm {cfg.mllm}; {res['sampling']}]")
    for name, none in (("generated", ""), ("real", "no images in the file"), ("shuffled_captions", "one caption")):
        r = res[name]
        print(f"T2I {name:17s} " + (f"n/a ({none})" if r is None else
                                    f"clip_score {r['clip_score']:.2f}, sigmoid {r['sigmoid']:.4g} (n={r['n']})"),
              where)
    out = cfg.out or os.path.join(cfg.mllm, "eval_t2i.json")
    rows = [[im] if real is None else [im, real[i]] for i, im in enumerate(gen[:8])]  # generated | real
    data.grid_png(rows, os.path.splitext(out)[0] + ".png", caps[:8], scale=max(1, 96 // R))
    return _write(res, out)


# -----------------------------------------------------------------------------
# python eval.py probes (what each code stack carries, shapes world)


@dataclass
class EvalProbesConfig:
    tokenizer: str = ""          # a DualToken folder (two vocabularies, or one: tied / no semantic branch)
    siglip_config: str = ""
    images: int = 3000           # shapes train-split images encoded; the first 3/4 fit the probes, the rest score them
    max_objects: int = 2
    shapes_seed: int = 0
    l2: float = 1e-3             # the probes' weight penalty (evaluation.linear_probe)
    batch_size: int = 128
    device: str = ""
    threads: int = 0
    out: str = ""                # '' -> <tokenizer>/probes.json


def eval_probes(cfg):
    """Linear probes (evaluation.linear_probe) on the per-position code embeddings of each stack: which
    attributes of a shapes image a stack makes linearly readable. Images are split (not positions), so no
    probe scores an image it was fit on."""
    if cfg.images < 8:
        raise UserError(f"--images={cfg.images}: need at least 8 (3/4 fit the probes, 1/4 score them)")
    t0, device = time.time(), cfg.device or tu.default_device()
    image_tok = load_image_tokenizer(cfg.tokenizer, cfg.siglip_config, device)
    R, g = image_tok.config.siglip.vision.image_size, image_tok.config.grid
    if g % 3:
        raise UserError(f"--tokenizer={cfg.tokenizer!r}: its {g}x{g} grid does not split into the world's 3x3 cells")
    world = data.ShapesWorld(data.ShapesConfig(image_size=R, max_objects=cfg.max_objects, seed=cfg.shapes_seed))
    samples = [world.sample("train", i) for i in range(cfg.images)]
    n_fit = cfg.images * 3 // 4
    res = dict(tokenizer=cfg.tokenizer, layers=dict(pix=image_tok.config.layer_recon, sem=image_tok.config.layer_sem),
               tied=image_tok.config.tie_branches, images=cfg.images, n_fit_images=n_fit,
               probes={k: dict(target=t, features=f) for k, (t, f) in evaluation.PROBES.items()}, results={})
    for stack, emb in evaluation.code_embeddings(image_tok, samples, cfg.batch_size, device).items():
        res["results"][stack] = {}
        for k, (x, y, im) in evaluation.probe_sets(samples, emb, g).items():
            fit, test = im < n_fit, im >= n_fit
            if len(torch.unique(y[fit])) < 2 or not test.any():
                continue
            res["results"][stack][k] = evaluation.linear_probe(x[fit], y[fit], x[test], y[test], cfg.l2)
    stacks = list(res["results"])
    print(f"linear probes on {cfg.tokenizer} ({cfg.images} shapes train images, {n_fit} fit / {cfg.images - n_fit} "
          f"scored; accuracy on the scored images, majority-class baseline in brackets)")
    print(f"   {'probe':20s} " + "  ".join(f"{s:>16s}" for s in stacks))
    for k in evaluation.PROBES:
        cells = [res["results"][s].get(k) for s in stacks]
        print(f"   {k:20s} " + "  ".join("             n/a" if r is None else
                                         f"{r['accuracy']:.3f} ({r['majority']:.3f})" for r in cells))
    res.update(wall_s=time.time() - t0, config=config_dict(cfg))
    return _write(res, cfg.out or os.path.join(cfg.tokenizer, "probes.json"))


JOBS = {"tokenizer": (EvalTokenizerConfig, eval_tokenizer), "mllm": (EvalMLLMConfig, eval_mllm),
        "t2i": (EvalT2IConfig, eval_t2i), "probes": (EvalProbesConfig, eval_probes)}


def main(argv):
    commands = {name: fn for name, (_, fn) in JOBS.items()}
    name, argv = command(argv, commands)
    klass, fn = JOBS[name]
    cfg = parse_config(klass(), argv, name, commands)
    tu.check_values(cfg)
    check_result_file(cfg, "out", getattr(cfg, "mllm", "") or cfg.tokenizer)  # the default --out: beside the model
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return fn(cfg)


if __name__ == "__main__":
    run_main(main)
