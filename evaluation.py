"""
The one QA / generation evaluation of an MLLM, used by train_mllm.py (its periodic evaluation and
eval.json, on its code cache) and by eval.py mllm (which encodes the world's images first and adds its
controls), so that a model has one QA number and one generation number whoever measures it:
- questions: every question of the first N held-out images (qa_rows), in record order; the trainer asks
  those of fewer images (its eval_qa) than eval.py (its qa_images);
- answers: greedy, at most MAX_ANSWER_TOKENS new tokens, decoded and stripped, exact match (answers);
- generation: the first N held-out captions drawn with the run's recorded sampler (pipeline.sampling_settings
  falls back on it in eval.py; the trainer is what records it) from one generator seeded by `seed`,
  judged by checker.score_images plus object_errors (judge);
- the tokenizer's ceiling: the same judge on the decodings of the images' true pixel codes.
Everything takes codes (pix / sem, image-major) and records, never images: the trainer reads its cache and
does not re-encode. The image tokenizer (a tokenizer.DualToken) is passed in, as in pipeline.py.
"""
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch

import checker
import data
from pipeline import generate_images, qa_prompt

MAX_ANSWER_TOKENS = 16  # the shapes world's answers are one or two words


def qa_rows(records, n_images):
    """Every question of the first n_images records -> [(image index, question, answer)]."""
    return [(i, q, a) for i, r in enumerate(records[:n_images]) for q, a in (r.get("qa") or [])]


def question_type(q):
    """The shapes world's question templates (data.ShapesWorld.questions) -> a type name."""
    for prefix, name in (("how many objects", "count_all"), ("how many", "count_shape"), ("what color", "color"),
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
    """Rows idx of codes held as a tensor or a (memory-mapped) numpy array -> a long tensor."""
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
