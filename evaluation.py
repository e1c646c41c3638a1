"""
The one QA / generation evaluation of an MLLM, used by train_mllm.py (its periodic evaluation and
eval.json, on its code cache) and by eval.py mllm (which encodes the world's images first and adds its
controls), so that a model has one QA number and one generation number whoever measures it:
- questions: every question of the first N held-out images (qa_rows), in record order; the trainer asks
  those of fewer images (its eval_qa) than eval.py (its qa_images);
- answers: greedy, at most MAX_ANSWER_TOKENS new tokens, decoded and stripped, exact match (answers);
- generation: the first N held-out captions drawn with the run's recorded sampler (codec.sampling_settings
  falls back on it in eval.py; the trainer is what records it) from one generator seeded by `seed`,
  judged by checker.score_images plus object_errors (judge);
- the tokenizer's ceiling: the same judge on the decodings of the images' true pixel codes, and the code
  structure (the judge on decodings of the first d depths; the code stacks of pure-background patches);
- linear probes on the per-position code embeddings of each stack (eval.py probes, design §10);
- the user's own files (eval.py mllm --data=QA.jsonl, eval.py t2i --captions=): their readers, checked line
  by line; QA on them with the same prompt and greedy answers plus a likelihood choice score (qa_file);
  captions drawn as generation() draws them, judged by a SigLIP (t2i).
Everything takes codes (pix / sem, image-major) and records, never images (but t2i's real images: its judge
sees pixels): the trainer reads its cache and does not re-encode. The image tokenizer (a tokenizer.DualToken) is passed in, as in codec.py.
"""
import json
import os
import string
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import checker
import data
from configurator import UserError, read_jsonl_records, text_lines
from codec import generate_images, two_vocabularies
from sequences import make_batch, qa_prompt

MAX_ANSWER_TOKENS = 16  # the shapes world's answers are one or two words


def qa_rows(records, n_images):
    """Every question of the first n_images records -> [(image index, question, answer)]."""
    return [(i, q, a) for i, r in enumerate(records[:n_images]) for q, a in (r.get("qa") or [])]


def question_type(q):
    """The shapes world's question templates (data.ShapesWorld.questions) -> a type name."""
    for prefix, name in (("how many objects", "count_all"), ("how many", "count_shape"),
                         ("what color is the background", "background"), ("what color", "color"),
                         ("what shape", "shape"), ("where is", "position"), ("what size", "size"),
                         ("is there", "exists")):
        if q.startswith(prefix):
            return name
    return "other"


def scores(pred, truth, groups):
    """Exact match -> (accuracy, {group: {accuracy, n}}) with the groups sorted."""
    hits = {}
    for p, a, g in zip(pred, truth, groups):
        hits.setdefault(g, []).append(p == a)
    acc = sum(p == a for p, a in zip(pred, truth)) / max(len(truth), 1)
    return acc, {g: dict(accuracy=sum(h) / len(h), n=len(h)) for g, h in sorted(hits.items())}


def _take(a, idx):
    """Rows idx of codes held as a tensor or a (memory-mapped) numpy array -> a long tensor (None stays None:
    a stack the model does not have)."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.asarray(a[idx])).long()
    return a[torch.tensor(idx)].long()


@torch.no_grad()
def answers(model, text_tok, rows, pix, sem, batch_size, autocast=None, max_new_tokens=MAX_ANSWER_TOKENS,
            desc=None):
    """Greedy answers to rows (image index i, question, answer), the question reading row i of pix / sem
    ((n, N, D) codes, tensors or numpy arrays). desc: a progress bar's title (None: no bar)."""
    from tqdm import tqdm
    pred = []
    for k in tqdm(range(0, len(rows), batch_size), desc=desc, disable=desc is None, dynamic_ncols=True):
        chunk = rows[k:k + batch_size]
        idx = [i for i, _, _ in chunk]
        with autocast or nullcontext():
            out = model.generate_text([qa_prompt(text_tok, q) for _, q, _ in chunk],
                                      images=(_take(pix, idx), _take(sem, idx)), max_new_tokens=max_new_tokens,
                                      temperature=0.0)
        pred += [text_tok.decode(o).strip() for o in out]
    return pred


def qa(model, text_tok, records, pix, sem, n_images, batch_size, autocast=None, max_new_tokens=MAX_ANSWER_TOKENS,
       desc=None):
    """Every question of the first n_images records, answered reading their codes. -> dict(accuracy, n,
    by_type, rows, pred)."""
    rows = qa_rows(records, n_images)
    pred = answers(model, text_tok, rows, pix, sem, batch_size, autocast, max_new_tokens, desc)
    acc, by_type = scores(pred, [a for _, _, a in rows], [question_type(q) for _, q, _ in rows])
    return dict(accuracy=acc, n=len(rows), by_type=by_type, rows=rows, pred=pred)


def blind_baseline(train_qa, questions):
    """What a model that never looks at the image can score. train_qa: (question, answer) pairs of the
    train split; questions: the questions asked. -> (answers, chance):
    answers[k]: the most common train answer to questions[k] (ties: the alphabetically first), else the
      most common answer of its question type, else None (a type train never asks: always wrong);
    chance[type]: 1 / the number of distinct answers the type has in train_qa (uniform guessing)."""
    by_q, by_t = {}, {}
    for q, a in train_qa:
        by_q.setdefault(q, Counter())[a] += 1
        by_t.setdefault(question_type(q), Counter())[a] += 1
    top = lambda c: max(sorted(c), key=c.get)  # sorted first: the tie-break does not depend on train order
    answers = [top(by_q[q]) if q in by_q else top(by_t[question_type(q)]) if question_type(q) in by_t else None
               for q in questions]
    return answers, {t: 1 / len(c) for t, c in sorted(by_t.items())}


def derangement(n, seed):
    """A fixed random permutation of range(n) without fixed points (n >= 2; a single image keeps its own):
    perm[i] is the image whose codes image i's questions read in the shuffled control. Rejection
    sampling, about e draws."""
    rng = np.random.default_rng(seed)
    while n >= 2:
        perm = rng.permutation(n)
        if (perm != np.arange(n)).all():
            return perm
    return np.arange(n)


def object_errors(preds, truths):
    """What the per-attribute scores hide: objects drawn where none was asked and objects not drawn at all.
    preds: checker.describe outputs, truths: the true objects, one list per image. A prediction is matched
    to the true object of its cell (one per cell; a second prediction in the cell is not matched).
    -> false_objects: unmatched predictions per image; missed_cells: share of true objects whose cell
    has no prediction."""
    false, missed = 0, 0
    for pred, truth in zip(preds, truths):
        cells = Counter(o["cell"] for o in pred)
        want = {o["cell"] for o in truth}
        false += sum(n - (c in want) for c, n in cells.items())
        missed += sum(c not in cells for c in want)
    return dict(false_objects=false / max(len(preds), 1), missed_cells=missed / max(sum(len(t) for t in truths), 1))


def judge(images, objects):
    """checker.score_images plus object_errors on uint8 (B, H, W, 3) images."""
    return dict(checker.score_images(images, objects), **object_errors([checker.describe(im) for im in images], objects))


@torch.no_grad()
def generation(model, text_tok, image_tok, captions, objects, sampling, seed, batch_size, autocast=None):
    """Draw one image per caption (sampling: MLLM.generate_image's settings; one generator on the model's
    device seeded by `seed`) and judge it against the true objects: judge's keys."""
    g = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    with autocast or nullcontext():
        imgs, _ = generate_images(model, image_tok, text_tok, list(captions), g, batch_size, **sampling)
    return judge(data.to_image(imgs), list(objects))


@torch.no_grad()
def ceiling(image_tok, pix, objects, batch_size, device, autocast=None):
    """The judge on the tokenizer's decoding of the images' true pixel codes pix (n, h, w, Dp): no generated
    image can score above what the decoder can draw. Same keys as generation."""
    ims = []
    for k in range(0, len(pix), batch_size):
        with autocast or nullcontext():
            ims.append(data.to_image(image_tok.decode(pix[k:k + batch_size].to(device)).float()))
    return judge(np.concatenate(ims), list(objects))


@torch.no_grad()
def code_structure(image_tok, samples, batch_size, device, autocast):
    """How easy the pixel codes are to generate, on the shapes world (eval.py tokenizer).
    - depth_curve[d-1]: the checker on the decodings of only the first d pixel depths of the true codes
      (coarse to fine: what a generator gets right if only its first d depths are right);
    - background: on solid-background images, the patches with no object pixel: how many distinct full
      code stacks they get, against the number of background colours among them (1 stack per colour is
      ideal; a stack per patch means the codes carry noise the generator must reproduce)."""
    P = image_tok.config.siglip.vision.patch_size
    D = image_tok.config.vq_pix.depth
    codes = []
    for k in range(0, len(samples), batch_size):
        x = torch.stack([data.to_tensor(s["image"]) for s in samples[k:k + batch_size]]).to(device)
        codes.append(image_tok.encode(x)[0].cpu())  # fp32 (DualToken.encode), like the training cache
    codes = torch.cat(codes)  # (n, h, w, D)
    truth = [s["objects"] for s in samples]
    curve = []
    for d in range(1, D + 1):
        ims = []
        for k in range(0, len(samples), batch_size):
            c = codes[k:k + batch_size, ..., :d].to(device)
            with autocast:
                z = image_tok.quantizer_pix.embed_per_depth(c).sum(-2)  # (B, h, w, c): the first d depths only
                ims.append(data.to_image(image_tok.decode_latent(z).float()))
        sc = checker.score_images(np.concatenate(ims), truth)
        curve.append({k: sc[k] for k in ("all_correct", "count") + checker.ATTRS})
    stacks, colours, n_patches = set(), set(), 0
    for s, c in zip(samples, codes):
        bg = s.get("background")
        if bg is None or bg[0] != "solid":
            continue
        im = np.asarray(s["image"])
        col = np.array(data.BACKGROUNDS[bg[1]], np.uint8)
        h, w = c.shape[:2]
        flat = (im.reshape(h, P, w, P, 3) == col).all(-1).all(3).all(1)  # (h, w): patch is pure background
        for i, j in zip(*np.nonzero(flat)):
            stacks.add(tuple(c[i, j].tolist()))
            n_patches += 1
        colours.add(bg[1])
    return dict(depth_curve=curve, background=dict(patches=n_patches, distinct_stacks=len(stacks),
                                                   colours=len(colours)), n=len(samples))


# ----------------------------------------------------------------------------------------------------
# the user's own files


def _text(rec, key, where, optional=False):
    v = rec.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"{where}: {key!r} must be a non-empty string, got {json.dumps(v)[:80]}")
    return v.strip()


def _image(rec, where, base):
    """The record's image path (relative to the file's folder, or absolute), which must exist."""
    p = os.path.join(base, _text(rec, "image", where))
    if not os.path.isfile(p):
        raise UserError(f"{where}: image file {p} does not exist")
    return p


def normalize(answer):
    """Strip, lowercase, drop trailing punctuation: "Red." and "red" are one answer; punctuation inside
    ("3.5", "o'clock") is kept, since it can change the answer."""
    return answer.strip().lower().rstrip(string.punctuation + string.whitespace)


def read_qa_jsonl(path):
    """One {"image": path, "question": str, "answer": str, "choices": [str, ...] (optional)} per line,
    image paths relative to the file's folder or absolute. Every line is checked before any model work:
    bad JSON, a missing key, a wrong type, a missing image file, fewer than two choices, two choices that
    normalise alike or an answer that is none of them is a UserError naming file:line (whether the image
    decodes is checked when it is read: data.read_image with the same file:line). -> records: image
    (path), question, answer, choices (list or None), where."""
    base, out = os.path.dirname(os.path.abspath(path)), []
    for where, rec in read_jsonl_records(path):
        r = dict(image=_image(rec, where, base), question=_text(rec, "question", where),
                 answer=_text(rec, "answer", where), choices=rec.get("choices"), where=where)
        c = r["choices"]
        if c is not None:
            if not isinstance(c, list) or len(c) < 2 or not all(isinstance(t, str) and t.strip() for t in c):
                raise UserError(f"{where}: 'choices' must be a list of at least two non-empty strings, got "
                                f"{json.dumps(c)[:80]}")
            r["choices"] = [t.strip() for t in c]
            norm = [normalize(t) for t in r["choices"]]
            if len(set(norm)) < len(norm):
                raise UserError(f"{where}: two choices are the same answer after normalising: {norm}")
            if normalize(r["answer"]) not in norm:
                raise UserError(f"{where}: the answer {r['answer']!r} is none of the choices {r['choices']}")
        out.append(r)
    return out


def read_captions(path):
    """A .jsonl of {"caption": str, "image": path (optional)} per line (images relative to the file's
    folder; every line has one or none does, so real and generated images are scored on the same
    captions), or any other file: one caption per line. -> records: caption, image (path or None), where."""
    if not path.endswith(".jsonl"):
        if not os.path.isfile(path):
            raise UserError(f"{path!r} does not exist")
        recs = [dict(caption=ln.strip(), image=None, where=f"{path}:{n}") for n, ln in text_lines(path) if ln.strip()]
        if not recs:
            raise UserError(f"{path} holds no captions")
        return recs
    base, lines = os.path.dirname(os.path.abspath(path)), read_jsonl_records(path)
    with_image = "image" in lines[0][1]
    recs = []
    for where, rec in lines:
        if ("image" in rec) != with_image:
            raise UserError(f"{where}: {'no' if with_image else 'an'} 'image' where {lines[0][0]} has "
                            f"{'one' if with_image else 'none'}: every line has an image or none does")
        recs.append(dict(caption=_text(rec, "caption", where), where=where,
                         image=_image(rec, where, base) if with_image else None))
    return recs


@torch.no_grad()
def choice_logprobs(model, text_tok, rows, pix, sem, batch_size, autocast=None):
    """log p(choice, eos | image, question) for rows (image index, question, choice): the sum of the
    log-probabilities of the choice's tokens and eos in the trainer's answer format (sequences.sample_parts:
    image, qa_prompt(question), answer, eos), i.e. the probability that the model answers exactly that
    text and stops. Not length-normalised: with eos included it is a probability over whole answers, so a
    short choice is not favoured for being short but for being likely to end there. Only the target
    positions go through the head (a Qwen vocabulary is 152k wide). -> list of floats."""
    mc, dev = model.config, model.embed.weight.device
    out = []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        items = [([("und", pix.shape[1]), qa_prompt(text_tok, q), text_tok.encode(c) + [text_tok.eos_id]],
                  [False, False, True], _take(pix, [i])[0], None if sem is None else _take(sem, [i])[0]) for i, q, c in chunk]
        b = {n: v.to(dev) for n, v in make_batch(mc, items).items()}
        sel = b["targets"] != -1  # (B, T): the positions that predict the choice's tokens and eos
        with autocast or nullcontext():
            x = model.embed_inputs(b["idx"], b["image_mask"], b["pix_codes"], b.get("sem_codes"), b["gen_mask"])
            h = model.trunk(x, b["attention_mask"])[sel]  # (M, C)
            lp = F.log_softmax(model.lm_head(h).float(), -1).gather(1, b["targets"][sel][:, None])[:, 0]  # (M,)
        out += torch.zeros(len(chunk), device=dev).index_add_(0, sel.nonzero()[:, 0], lp).tolist()
    return out


def qa_file(model, text_tok, recs, image_index, pix, sem, batch_size, autocast=None,
            max_new_tokens=MAX_ANSWER_TOKENS, desc=None):
    """read_qa_jsonl's records, record i reading row image_index[i] of pix / sem. -> dict:
    exact_match: share of records whose greedy answer (answers: the shapes world's prompt and decoding)
    equals the answer after normalize; n;
    choice_accuracy: on the n_choice records with choices, the share where the choice of highest
    choice_logprobs (the first on a tie) is the answer; chance: mean of 1 / number of choices;
    predictions: per record where, question, answer, pred, correct (and choice, choice_correct).
    Likelihood, not "the generated answer matches a choice": it scores every question (a free answer
    often matches no choice), does not depend on max_new_tokens, and its chance level is exactly 1/k."""
    rows = [(image_index[i], r["question"], r["answer"]) for i, r in enumerate(recs)]
    pred = answers(model, text_tok, rows, pix, sem, batch_size, autocast, max_new_tokens, desc)
    per = [dict(where=r["where"], question=r["question"], answer=r["answer"], pred=p,
                correct=normalize(p) == normalize(r["answer"])) for r, p in zip(recs, pred)]
    mc = [i for i, r in enumerate(recs) if r["choices"]]
    crows = [(image_index[i], recs[i]["question"], c) for i in mc for c in recs[i]["choices"]]
    lp, k = choice_logprobs(model, text_tok, crows, pix, sem, batch_size, autocast), 0
    for i in mc:
        c = recs[i]["choices"]
        s = lp[k:k + len(c)]
        k += len(c)
        best = c[s.index(max(s))]
        per[i].update(choice=best, choice_correct=normalize(best) == normalize(recs[i]["answer"]))
    mean = lambda v: sum(v) / len(v) if v else None
    return dict(exact_match=mean([p["correct"] for p in per]), n=len(per), n_choice=len(mc),
                choice_accuracy=mean([per[i]["choice_correct"] for i in mc]),
                chance=mean([1 / len(recs[i]["choices"]) for i in mc]), predictions=per)


@torch.no_grad()
def t2i(model, text_tok, image_tok, judge, judge_tok, captions, sampling, seed, batch_size, autocast=None,
        real=None):
    """Draw one image per caption as generation() does and score it against its caption with the SigLIP
    `judge` (siglip.caption_scores; judge_tok its text tokenizer). -> (dict, the uint8 images drawn); the
    dict's generated / shuffled_captions / real each hold caption_scores' n, clip_score and sigmoid:
    shuffled_captions: the generated images against a derangement of the captions (seeded by seed), what
      an image that ignores its caption scores (None for one caption);
    real: the real images (uint8 (n, H, W, 3); None: not given) against their captions, the data's own score."""
    from siglip import caption_scores
    g, gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed), []
    for k in range(0, len(captions), batch_size):  # to uint8 batch by batch: one generator, the same draws
        with autocast or nullcontext():
            ims, _ = generate_images(model, image_tok, text_tok, list(captions[k:k + batch_size]), g, batch_size,
                                     **sampling)
        gen.append(data.to_image(ims))
    gen = np.concatenate(gen)

    def score(images, perm=None):
        s = caption_scores(judge, judge_tok, images, captions, perm, batch_size)
        return {k: s[k] for k in ("n", "clip_score", "sigmoid")}
    return dict(generated=score(gen), real=None if real is None else score(real),
                shuffled_captions=score(gen, derangement(len(captions), seed)) if len(captions) > 1 else None), gen


# ----------------------------------------------------------------------------------------------------
# linear probes: what a code stack carries (eval.py probes)


def linear_probe(x_fit, y_fit, x_test, y_test, l2=1e-3, iters=200):
    """A multinomial logistic regression fit on (x_fit (n, f), y_fit (n,)) by L-BFGS, full batch, features
    standardised with the fit set's statistics; -> dict(accuracy on the test rows, majority: the share of
    the fit set's most common label among the test rows, classes, n_fit, n_test). Deterministic: a zero
    start and no sampling."""
    x_fit, x_test = x_fit.double(), x_test.double()
    mu, sd = x_fit.mean(0), x_fit.std(0).clamp(min=1e-6)
    x_fit, x_test = (x_fit - mu) / sd, (x_test - mu) / sd
    classes = torch.unique(y_fit)
    yf = torch.searchsorted(classes, y_fit)
    W = torch.zeros(x_fit.shape[1], len(classes), dtype=torch.double, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_fit @ W + b, yf) + l2 * W.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        pred = classes[(x_test @ W + b).argmax(1)]
    top = torch.mode(y_fit).values
    return dict(accuracy=float((pred == y_test).double().mean()), majority=float((y_test == top).double().mean()),
                classes=len(classes), n_fit=len(y_fit), n_test=len(y_test))


PROBES = {  # name: (what is probed, the features it reads)
    "color": ("the object's colour (6)", "its cell's positions, concatenated"),
    "shape": ("the object's shape (3)", "its cell's positions, concatenated"),
    "size": ("the object's size (2)", "its cell's positions, concatenated"),
    "offset_x": ("a small object's horizontal offset in its cell (pixels)", "its cell's positions, concatenated"),
    "offset_y": ("a small object's vertical offset in its cell (pixels)", "its cell's positions, concatenated"),
    "cell": ("which of the 9 cells a position of an object's cell lies in", "one position"),
    "background_color": ("the background colour (5) of a solid background", "one object-free position"),
    "background_shading": ("plain or shaded (gradient) background", "every position of the image, concatenated"),
}


def probe_sets(samples, emb, g):
    """emb (n, g, g, d) per-position code embeddings -> {probe: (features (m, f), labels (m,), image of each row)}."""
    c = g // 3  # positions per cell side
    rows = {k: ([], [], []) for k in PROBES}

    def add(k, f, y, i):
        rows[k][0].append(f)
        rows[k][1].append(y)
        rows[k][2].append(i)
    for i, s in enumerate(samples):
        e = emb[i]  # (g, g, d)
        taken = set()
        for o, (dx, dy) in zip(s["objects"], s["jitter"]):
            r, col = divmod(data.CELLS.index(o["cell"]), 3)
            taken.add((r, col))
            f = e[r * c:(r + 1) * c, col * c:(col + 1) * c].reshape(-1)  # (c*c*d,)
            add("color", f, list(data.COLORS).index(o["color"]), i)
            add("shape", f, data.ALL_SHAPES.index(o["shape"]), i)
            add("size", f, data.SIZES.index(o["size"]), i)
            if o["size"] == "small":
                add("offset_x", f, dx, i)
                add("offset_y", f, dy, i)
            for pr in range(r * c, (r + 1) * c):
                for pc in range(col * c, (col + 1) * c):
                    add("cell", e[pr, pc], 3 * r + col, i)
        if s["background"][0] == "solid":
            for pr in range(g):
                for pc in range(g):
                    if (pr // c, pc // c) not in taken:
                        add("background_color", e[pr, pc], s["background"][1], i)
        add("background_shading", e.reshape(-1), int(s["background"][0] == "gradient"), i)
    return {k: (torch.stack(f), torch.tensor(y), torch.tensor(im)) for k, (f, y, im) in rows.items() if f}


@torch.no_grad()
def code_embeddings(image_tok, samples, batch_size, device):
    """-> {stack: (n, g, g, d)}: each position's code embedding (the sum of its codebook vectors over the
    depths, what the MLLM's projector reads) for every stack the tokenizer has."""
    out = {"pix": [], "sem": []} if two_vocabularies(image_tok) else {"pix": []}
    for k in range(0, len(samples), batch_size):
        x = torch.stack([data.to_tensor(s["image"]) for s in samples[k:k + batch_size]]).to(device)
        pix, sem = image_tok.encode(x)  # (B, g, g, D) each
        out["pix"].append(image_tok.quantizer_pix.embed_per_depth(pix).sum(-2).float().cpu())
        if "sem" in out:
            out["sem"].append(image_tok.quantizer_sem.embed_per_depth(sem).sum(-2).float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}
