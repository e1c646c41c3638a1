"""
Text tokenizers behind one interface, for the SigLIP text tower and the MLLM:

    tok.encode(text) -> list[int]          (no specials)
    tok.decode(ids) -> str                 (specials skipped)
    tok(texts, max_len) -> (B, max_len)    the SigLIP batch: truncate to max_len - 1, append eos, pad right
    tok.vocab_size, tok.pad_id, tok.eos_id, tok.token_id(name)

- ByteTokenizer: dependency-free, UTF-8 bytes 0..255 then named specials; used by the synthetic
  shapes data (SigLIP pretraining here, and the MLLM).
- WordTokenizer: a closed word list (the shapes world's, data.vocabulary()), for the MLLM demo.
- SentencePieceTokenizer: Google's SigLIP (v1) `spiece.model`, reproducing transformers'
  SiglipTokenizer: lowercase, strip ASCII punctuation, collapse whitespace, `</s>` = 1 appended, padded
  with 1 (pad == eos, as big_vision's `tok(eos="sticky", pad_value=1)`). Needs `sentencepiece`.
- GemmaTokenizer: SigLIP2's Gemma `tokenizer.json`, lowercased (SigLIP2 was trained on lowercased
  text), no BOS, `<eos>` = 1 appended, padded with `<pad>` = 0. Needs `tokenizers`.
The SigLIP tower's tokenizer by a folder or "byte": `siglip_tokenizer(spec, folders, shapes)`.
The MLLM's text side (`prompt_tokenizer(name)`, the name its export records), with `user_prompt(text)`:
- PromptTokenizer: "bytes" / "words" above plus <bos> and the image delimiters (IMAGE_TOKENS).
- ChatTokenizer: an LLM's tokenizer.json (Qwen2.5) and its chat template. Needs `tokenizers`.
"""
import os
import re
import string

import torch

from configurator import UserError


class _Batcher:
    """The shared batch rule. SigLIP texts are always padded to the full length because the text tower
    pools the LAST position and has no attention mask: the pad tokens are part of the input it saw."""
    add_eos = True

    def __call__(self, texts, max_len):
        if isinstance(texts, str):
            raise ValueError("texts: expected a list of strings, got one str (wrap it in a list)")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        out = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)  # (B, max_len)
        n_eos = int(self.add_eos)
        for i, t in enumerate(texts):
            ids = self.encode(t)[: max_len - n_eos] + [self.eos_id] * n_eos
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def token_id(self, name):
        if name not in self.specials:
            raise ValueError(f"token_id: unknown special token {name!r}; known: {list(self.specials)}")
        return self.specials[name]


class ByteTokenizer(_Batcher):
    """ids 0..255 are UTF-8 bytes; then "<pad>" (256), "<eos>" (257), then `extra` in the given order
    (e.g. ("<im_start>", "<im_end>")). decode skips every special and replaces broken UTF-8."""

    def __init__(self, extra=()):
        names = ("<pad>", "<eos>") + tuple(extra)
        if len(set(names)) != len(names):
            raise ValueError(f"ByteTokenizer: duplicate special token names in {names}")
        self.specials = {n: 256 + i for i, n in enumerate(names)}
        self.pad_id, self.eos_id = self.specials["<pad>"], self.specials["<eos>"]
        self.vocab_size = 256 + len(names)

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} outside [0, {self.vocab_size})")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class WordTokenizer(_Batcher):
    """A closed word vocabulary (the shapes world's ~70 words): ids 0..n-1 are the words in the given order,
    then "<pad>", "<eos>" and `extra`. Text is split into lowercase words and the marks ? . , (each its own
    token); a word outside the vocabulary is an error, never a silent <unk>. Why: a 4-question sample is
    ~60 word tokens against ~150 bytes, so a small LLM runs ~2x the steps in the same time."""

    SPLIT = re.compile(r"[a-z]+|[?.,]|\S")

    def __init__(self, words, extra=()):
        words = tuple(words)
        names = ("<pad>", "<eos>") + tuple(extra)
        if len(set(words)) != len(words) or len(set(names)) != len(names):
            raise ValueError("WordTokenizer: duplicate words or special token names")
        self.words = words
        self.ids = {w: i for i, w in enumerate(words)}
        self.specials = {n: len(words) + i for i, n in enumerate(names)}
        self.pad_id, self.eos_id = self.specials["<pad>"], self.specials["<eos>"]
        self.vocab_size = len(words) + len(names)

    def encode(self, text):
        toks = self.SPLIT.findall(text.lower())
        bad = sorted({t for t in toks if t not in self.ids})
        if bad:
            raise ValueError(f"WordTokenizer: {bad} not in the vocabulary ({len(self.words)} words) in {text!r}")
        return [self.ids[t] for t in toks]

    def decode(self, ids):
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} outside [0, {self.vocab_size})")
        out = ""
        for w in (self.words[i] for i in ids if i < len(self.words)):
            out += w if (w in "?.," or not out) else " " + w
        return out


def canonicalize(text):
    """SigLIP v1 text canonicalisation (transformers' SiglipTokenizer.canonicalize_text)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


class SentencePieceTokenizer(_Batcher):
    """SigLIP v1: `spiece.model` (T5-style: <pad> 0, </s> 1, <unk> 2)."""

    UNDERLINE = "\u2581"  # SentencePiece's word-boundary marker

    def __init__(self, path, eos="</s>", pad="</s>", unk="<unk>"):
        try:
            import sentencepiece as spm
        except ImportError:
            raise ImportError("SentencePieceTokenizer needs the `sentencepiece` package "
                              "(pip install sentencepiece); ByteTokenizer needs nothing") from None
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(path)
        self.unk = unk
        self.specials = {}
        for name in (eos, pad, unk):
            i = self.sp.piece_to_id(name)
            if self.sp.id_to_piece(i) != name:
                raise ValueError(f"{path}: special token {name!r} is not in the vocabulary")
            self.specials[name] = i
        self.eos_id, self.pad_id = self.specials[eos], self.specials[pad]
        self.vocab_size = self.sp.get_piece_size()
        self._n_unk = len(self.sp.encode(unk, out_type=str))

    def encode(self, text):
        # transformers' order: prefix "▁" (replacing any "▁" in the text by a space), canonicalise,
        # then encode behind the "<unk>" string and cut its pieces off: this pins how the first word
        # is segmented (with the "▁" boundary) regardless of SentencePiece's own dummy-prefix rule.
        # Literal special tokens in the text are not honoured (canonicalisation strips their <, /, >).
        t = canonicalize(self.UNDERLINE + text.replace(self.UNDERLINE, " "))
        pieces = self.sp.encode(self.unk + t, out_type=str)
        pieces = pieces[self._n_unk:] if len(pieces) >= self._n_unk else pieces
        if len(pieces) > 1 and pieces[0] == self.UNDERLINE and pieces[1] in self.specials:
            pieces = pieces[1:]
        return [self.sp.piece_to_id(p) for p in pieces]

    def decode(self, ids):
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        skip = set(self.specials.values())
        return self.sp.decode([i for i in ids if i not in skip])


class GemmaTokenizer(_Batcher):
    """SigLIP2: Gemma's `tokenizer.json` (<pad> 0, <eos> 1, <bos> 2), lowercased, no BOS.
    add_eos=True follows big_vision's "sticky" EOS convention that SigLIP's last-position pooling assumes.
    Note: transformers 5.24's Siglip2Tokenizer class instead pads on the LEFT and adds no EOS; which one
    the released SigLIP2 weights were trained with could not be checked offline, so both stay possible
    (add_eos=False gives HF's ids for the text part, but we always pad on the right)."""

    def __init__(self, path, eos="<eos>", pad="<pad>", lowercase=True, add_eos=True):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("GemmaTokenizer needs the `tokenizers` package (pip install tokenizers); "
                              "ByteTokenizer needs nothing") from None
        self.tok = Tokenizer.from_file(path)
        self.lowercase, self.add_eos = lowercase, add_eos
        self.specials = {}
        for name in (eos, pad):
            i = self.tok.token_to_id(name)
            if i is None:
                raise ValueError(f"{path}: special token {name!r} is not in the vocabulary")
            self.specials[name] = i
        self.eos_id, self.pad_id = self.specials[eos], self.specials[pad]
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tok.encode(text.lower() if self.lowercase else text, add_special_tokens=False).ids

    def decode(self, ids):
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        skip = set(self.specials.values())
        return self.tok.decode([i for i in ids if i not in skip], skip_special_tokens=True)


def siglip_tokenizer(spec="", folders=(), shapes=False, towers=()):
    """The SigLIP text tower's tokenizer -> (tokenizer, what was used), for the zero-shot scores of
    train_tokenizer.py and eval.py. spec: "byte" (the shapes world's ByteTokenizer) or a folder holding
    spiece.model (SigLIP v1) or tokenizer.json (SigLIP2); "" -> "byte" when `shapes`, else the first of
    `folders` (the SigLIP checkpoints at hand) that holds one of those files. A tokenizer with more ids than
    a SigLIP in `towers` has text embeddings is a UserError: it is not the one that SigLIP was trained with."""
    if spec == "byte" or (not spec and shapes):
        tok, name = ByteTokenizer(), "byte"
    else:
        looked = [spec] if spec else [f for f in folders if f]
        for f in looked:
            if os.path.isfile(os.path.join(f, "spiece.model")):
                tok, name = SentencePieceTokenizer(os.path.join(f, "spiece.model")), f
                break
            if os.path.isfile(os.path.join(f, "tokenizer.json")):
                tok, name = GemmaTokenizer(os.path.join(f, "tokenizer.json")), f
                break
        else:
            raise UserError(f"no SigLIP text tokenizer: --text_tokenizer={spec!r}; looked for spiece.model / "
                            f"tokenizer.json in {looked}")
    for m in towers:
        if m is not None and m.text is not None and tok.vocab_size > m.config.text.vocab_size:
            raise UserError(f"text tokenizer {name!r} has {tok.vocab_size} ids but the text tower's vocabulary has "
                            f"{m.config.text.vocab_size}: pass --text_tokenizer= the tokenizer the SigLIP was "
                            f"trained with")
    return tok, name


# -----------------------------------------------------------------------------
# the MLLM's text side: a text tokenizer plus <bos> and the image delimiters, and its prompt format
# (train_mllm.py records the name in the export's config.json; loaders.load_export reads it back)

IMAGE_TOKENS = ("<im_start>", "<im_end>", "<image_gen_start>", "<image_gen_end>")


class ChatTokenizer:
    """An HF tokenizer.json LLM tokenizer (Qwen2.5) with its chat template, the MLLM's interface:
    encode / decode / eos_id / pad_id / vocab_size. The image tokens are not in the file: the model
    appends them (mllm_hf.from_pretrained new_tokens) and sequences get them as ids, never as text."""

    def __init__(self, path, eos="<|im_end|>"):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("an HF text tokenizer needs the `tokenizers` package; shapes uses bytes") from None
        self.tok = Tokenizer.from_file(path)
        self.eos_id = self.tok.token_to_id(eos)
        if self.eos_id is None:
            raise UserError(f"{path}: special token {eos!r} is not in the vocabulary")
        self.pad_id = self.eos_id
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def user_prompt(self, text):
        """Qwen2.5's template around one user turn, up to where the assistant's answer starts."""
        return self.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


class PromptTokenizer:
    """A Byte/WordTokenizer with the MLLM's specials after its own pad and eos: bos, then the image tokens.
    "bytes": ByteTokenizer (any text); "words": WordTokenizer over the shapes world's closed vocabulary
    (data.vocabulary(); ~2.5x shorter sequences, so ~2x the steps in the same time)."""

    def __init__(self, kind="bytes"):
        extra = ("<bos>",) + IMAGE_TOKENS
        if kind == "bytes":
            self.tok = ByteTokenizer(extra=extra)
        elif kind == "words":
            import data
            self.tok = WordTokenizer(data.vocabulary(), extra=extra)
        else:
            raise ValueError(f"PromptTokenizer: kind {kind!r} is not 'bytes' or 'words'")
        self.kind = kind
        self.eos_id, self.pad_id, self.vocab_size = self.tok.eos_id, self.tok.pad_id, self.tok.vocab_size
        self.encode, self.decode, self.token_id = self.tok.encode, self.tok.decode, self.tok.token_id

    def user_prompt(self, text):
        return self.encode(text + "\n") if self.kind == "bytes" else self.encode(text)


def prompt_tokenizer(name):
    """The MLLM's text side by the name recorded in its config.json: "bytes", "words" or a tokenizer.json."""
    return PromptTokenizer(name) if name in ("bytes", "words") else ChatTokenizer(name)
