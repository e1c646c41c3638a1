"""
The MLLM's token sequences (design §4): one interleaved sequence of text ids and images, and the training
batches made of them. build_sequence / collate_sequences lay a sequence out (the MLLM's generation reads its
prompts through them too); sample_parts, loss_mask and make_batch are what train_mllm.py feeds the model;
qa_prompt, gen_prompt and CAPTION_PROMPT are the prompts as training formats them, for sample.py and eval.py.
Only the MLLM config's special ids are read here: no model, no image tokenizer.
"""
import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------
# one sequence and a batch of them (the input format at the top of mllm.py)


def build_sequence(cfg, parts):
    """parts: token-id lists and images ("und" | "gen", n_positions), in order -> (ids (T,), image_mask
    (T,), gen_mask (T,)). Starts with bos when the vocabulary has one; images get their delimiters."""
    ids = [cfg.bos_id] if cfg.bos_id is not None else []
    img, gen = [False] * len(ids), [False] * len(ids)
    for p in parts:
        if isinstance(p, tuple):
            kind, n = p
            if kind not in ("und", "gen"):
                raise ValueError(f"build_sequence: image kind must be 'und' or 'gen', got {kind!r}")
            start, end = (cfg.im_start_id, cfg.im_end_id) if kind == "und" else \
                (cfg.image_gen_start_id, cfg.image_gen_end_id)
            if start is None or end is None:
                raise ValueError(f"build_sequence: config has no {kind} image delimiter tokens")
            pad = cfg.pad_id if cfg.pad_id is not None else 0
            ids += [start] + [pad] * n + [end]
            img += [False] + [True] * n + [False]
            gen += [False] + [kind == "gen"] * n + [False]
        else:
            ids += list(p)
            img += [False] * len(p)
            gen += [False] * len(p)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(img), torch.tensor(gen)


def collate_sequences(cfg, seqs):
    """List of build_sequence outputs -> dict(idx, image_mask, gen_mask, attention_mask), each (B, T),
    LEFT-padded (what generation needs; training does not care, positions come from attention_mask)."""
    B, T = len(seqs), max(s[0].numel() for s in seqs)
    idx = torch.full((B, T), cfg.pad_id if cfg.pad_id is not None else 0, dtype=torch.long)
    img, gen, am = (torch.zeros(B, T, dtype=torch.bool) for _ in range(3))
    for b, (i, m, g) in enumerate(seqs):
        n = i.numel()
        idx[b, T - n:], img[b, T - n:], gen[b, T - n:], am[b, T - n:] = i, m, g, True
    return dict(idx=idx, image_mask=img, gen_mask=gen, attention_mask=am.long())



def image_positions(image_mask):
    """(B, T) bool -> (B, T) long: at an image position, its index inside its image (0 = the first);
    elsewhere meaningless. Images are contiguous runs of True (build_sequence writes them so)."""
    c = image_mask.long().cumsum(1)
    start = torch.where(image_mask, 0, c).cummax(1).values  # the count at the last non-image token
    return c - start - 1


def make_targets(idx, image_mask=None, attention_mask=None, loss_mask=None):
    """Next-token text targets (B, T): targets[:, t] = idx[:, t+1], or -1 where position t+1 is an image
    position, padding, or outside loss_mask (e.g. the question in SFT), or where t itself is padding."""
    keep = torch.ones_like(idx, dtype=torch.bool)
    if image_mask is not None:
        keep &= ~image_mask.bool()
    if loss_mask is not None:
        keep &= loss_mask.bool()
    src = torch.ones_like(keep) if attention_mask is None else attention_mask.bool()
    keep &= src
    t = torch.full_like(idx, -1)
    t[:, :-1] = torch.where(keep[:, 1:] & src[:, :-1], idx[:, 1:], -1)
    return t


# ----------------------------------------------------------------------------------------------------
# prompts as train_mllm.py formats them

CAPTION_PROMPT = "describe the image."  # the caption task's question


def qa_prompt(text_tok, question):
    """The question as train_mllm.py formats it (after <im_start> image <im_end>)."""
    return text_tok.user_prompt(question)


def gen_prompt(text_tok, caption):
    """The caption as train_mllm.py formats it (before <image_gen_start>)."""
    return text_tok.encode(caption)


# ----------------------------------------------------------------------------------------------------
# training sequences: what train_mllm.py feeds the MLLM

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

