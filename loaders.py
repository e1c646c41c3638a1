"""
Loading what sample.py, eval.py and train_mllm.py run: the frozen image tokenizer (load_image_tokenizer: our
DualToken folder or the authors' release), an MLLM export with the text tokenizer its config names
(load_export), and the two together (load_pair), checked to fit: the same code vocabularies and depths
(check_pair) and the image tokenizer's hash the MLLM was trained with (tokenizer_hash).
"""
import json
import os

import torch

from codec import compile_tokenizer, two_vocabularies
from configurator import UserError
from mllm import MLLM
from tokenizer import DualToken


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


def load_export(path, device):
    """-> (MLLM, text tokenizer, info), what sample.py and eval.py run. `path`: an out_dir of train_mllm.py
    (read strictly by MLLM.from_pretrained; its config names the text tokenizer and the image tokenizer it was
    trained with)."""
    from text import prompt_tokenizer
    if not path:
        raise UserError("--mllm is required (an out_dir of train_mllm.py)")
    if not os.path.isdir(path):
        raise UserError(f"--mllm={path!r}: expected a train_mllm.py out_dir (config.json + model.safetensors)")
    model = MLLM.from_pretrained(path, device)
    info = model.export_info
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
    if isinstance(conf, dict):
        check_words(conf.get("text_tokenizer"), items, f"the vocabulary of {mllm}")


def check_words(text_tokenizer, items, whose="the vocabulary"):
    """items [(where, text)] against a text tokenizer by name: only the closed shapes vocabulary ("words") can
    refuse a text, with one line naming the word(s), where the text came from and the words there are."""
    if text_tokenizer != "words":
        return
    from text import PromptTokenizer
    tok = PromptTokenizer("words").tok
    for where, text in items:
        bad = sorted({t for t in tok.SPLIT.findall(text.lower()) if t not in tok.ids})
        if bad:
            raise UserError(f"{where}: {', '.join(map(repr, bad))} not in {whose} (text_tokenizer 'words', the "
                            f"shapes world's {len(tok.words)} words) in {text!r}; the words are: {' '.join(tok.words)}")


def load_image_tokenizer(path, siglip_config="", device="cpu"):
    """The frozen image tokenizer (a DualToken in eval mode, no gradients) on device: our folder or the
    authors' release (DualToken.from_pretrained detects which; siglip_config: a SigLIP folder or config.json for the
    release when the path it records is not here). The one loader of train_mllm.py, sample.py and eval.py."""
    if not path:
        raise UserError("--tokenizer is required: a DualToken folder from train_tokenizer.py / convert.py, or the "
                        "authors' release (for shapes run `python train_tokenizer.py config/shapes.py` first)")
    return DualToken.from_pretrained(path, siglip_config=siglip_config or None).to(device).eval().requires_grad_(False)


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

