"""text.py: ByteTokenizer behaviour, SentencePiece parity with transformers' SiglipTokenizer on a tiny
model trained here, and the Gemma (SigLIP2) tokenizer against transformers' Siglip2Tokenizer."""
import io
import json

import numpy as np
import pytest
import torch

from text import ByteTokenizer, GemmaTokenizer, SentencePieceTokenizer, canonicalize, siglip_tokenizer

CORPUS = ["a photo of a cat", "A red circle on the left.", "two blue squares and one green triangle",
          "the dog, the bird & the fish!", "hello world", "a small yellow star above a big purple square"]
TEXTS = ["A photo of a CAT!!", "  two   blue,squares ", "", "zebra xylophone", "a \u2581 b", "hello\tworld\n",
         "it's a dog's life: (really) [sic]", "UPPER lower MiXeD", "the " * 40, "ünïcödé çat"]


def test_byte_tokenizer():
    tok = ByteTokenizer(extra=("<im_start>", "<im_end>"))
    assert (tok.pad_id, tok.eos_id, tok.token_id("<im_start>"), tok.token_id("<im_end>")) == (256, 257, 258, 259)
    assert tok.vocab_size == 260
    s = "héllo, 世界"
    ids = tok.encode(s)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == s
    assert tok.decode([104, 105, tok.eos_id, tok.token_id("<im_start>"), tok.pad_id]) == "hi"
    batch = tok(["ab", "abcdefgh"], 5)
    assert batch.dtype == torch.long and batch.shape == (2, 5)
    assert batch.tolist() == [[97, 98, 257, 256, 256], [97, 98, 99, 100, 257]]  # truncate, eos, pad
    assert tok.decode(batch[1]) == "abcd"
    with pytest.raises(ValueError, match="<bos>"):
        tok.token_id("<bos>")
    with pytest.raises(ValueError, match="list of strings"):
        tok("abc", 4)
    with pytest.raises(ValueError, match="outside"):
        tok.decode([300])
    with pytest.raises(ValueError, match="duplicate"):
        ByteTokenizer(extra=("<eos>",))
    assert ByteTokenizer().vocab_size == 258


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece", reason="SigLIP v1 tokenizer backend (requirements-dev.txt)")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("spiece") / "spiece.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def test_sentencepiece_matches_transformers(spiece, monkeypatch):
    pytest.importorskip("transformers", reason="parity reference (requirements-dev.txt)")
    import transformers.models.siglip.tokenization_siglip as ts
    # SiglipTokenizer asks for protobuf only for the non-legacy path (editing the model's normalizer),
    # which SigLIP does not use; let it construct where protobuf is not installed.
    monkeypatch.setattr(ts, "requires_backends", lambda *a, **k: None)
    hf = ts.SiglipTokenizer(spiece)
    ours = SentencePieceTokenizer(spiece)
    assert (ours.eos_id, ours.pad_id, ours.vocab_size) == (hf.eos_token_id, hf.pad_token_id, hf.vocab_size)
    for t in TEXTS:
        assert ours.encode(t) + [ours.eos_id] == hf(t).input_ids, repr(t)
    for L in (8, 64):
        ref = hf(TEXTS, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ours(TEXTS, L), ref), L


def test_sentencepiece_canonicalisation(spiece):
    tok = SentencePieceTokenizer(spiece)
    assert canonicalize("  A  Photo, of a CAT!! ") == "a photo of a cat"
    assert tok.encode("A  Photo, of a CAT!!") == tok.encode("a photo of a cat")
    assert tok.decode(tok(["a cat"], 8)[0]) == "a cat"
    folder = str(__import__("pathlib").Path(spiece).parent)
    found, where = siglip_tokenizer("", ["", folder])  # the first folder that holds a tokenizer file
    assert isinstance(found, SentencePieceTokenizer) and found.vocab_size == tok.vocab_size and where == folder


@pytest.fixture(scope="module")
def gemma_json(tmp_path_factory):
    """A tiny Gemma-style BPE (<pad> 0, <eos> 1, <bos> 2, <unk> 3), saved by transformers'
    Siglip2Tokenizer so the tokenizer.json has exactly its pipeline."""
    tokenizers = pytest.importorskip("tokenizers", reason="SigLIP2 tokenizer backend (requirements-dev.txt)")
    transformers = pytest.importorskip("transformers", reason="parity reference (requirements-dev.txt)")
    from tokenizers import models, normalizers, trainers
    t = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=80, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]))
    m = json.loads(t.to_str())["model"]
    hf = transformers.Siglip2Tokenizer(vocab=m["vocab"], merges=[tuple(x) for x in m["merges"]])
    folder = tmp_path_factory.mktemp("gemma")
    hf.save_pretrained(str(folder))
    return hf, str(folder)


def test_gemma_matches_transformers(gemma_json):
    hf, folder = gemma_json
    ours = GemmaTokenizer(folder + "/tokenizer.json")
    assert (ours.pad_id, ours.eos_id) == (0, 1)
    for t in TEXTS:
        assert ours.encode(t) == hf(t, add_special_tokens=False).input_ids, repr(t)
    assert ours.encode("A Photo OF a Cat") == ours.encode("a photo of a cat")
    batch = ours(["a cat", "the " * 40], 12)
    ids = ours.encode("a cat")
    assert batch[0].tolist() == ids + [1] + [0] * (11 - len(ids))
    assert batch[1, -1].item() == 1 and batch.shape == (2, 12)
    assert isinstance(siglip_tokenizer(folder)[0], GemmaTokenizer)
    no_eos = GemmaTokenizer(folder + "/tokenizer.json", add_eos=False)
    assert no_eos(["a cat"], 12)[0].tolist() == ids + [0] * (12 - len(ids))


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ValueError, match="spiece.model"):
        siglip_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="spiece.model"):  # no folder holds one: named, never bytes silently
        siglip_tokenizer("", ["", str(tmp_path)])


def test_siglip_tokenizer_bytes_for_shapes(tmp_path):
    for args in (("byte",), ("", [str(tmp_path)], True)):  # asked for, or the shapes world's default
        tok, where = siglip_tokenizer(*args)
        assert isinstance(tok, ByteTokenizer) and where == "byte"


def test_word_tokenizer_covers_the_shapes_world():
    """Every caption, question and answer the world writes (with the optional 4th shape) round-trips through
    the closed vocabulary; a word outside it is an error that names the word, never a silent <unk>."""
    import data
    from text import WordTokenizer
    tok = WordTokenizer(data.vocabulary(), extra=("<bos>",))
    assert tok.vocab_size == len(data.vocabulary()) + 3 and tok.token_id("<bos>") == tok.vocab_size - 1
    world = data.ShapesWorld(data.ShapesConfig(image_size=48, max_objects=3, shapes=data.ALL_SHAPES))
    for i in range(150):
        s = world.sample("train", i)
        texts = [s["caption"], data.caption(s["objects"], drop=0.5, rng=np.random.default_rng(i))]
        texts += [t for qa in s["qa"] for t in qa]
        for t in texts:
            ids = tok.encode(t)
            assert max(ids) < len(data.vocabulary()) and tok.decode(ids) == t
    assert tok.encode("What color is the circle?") == tok.encode("what color is the circle ?")
    with pytest.raises(ValueError, match="hexagon"):
        tok.encode("a red hexagon")
    assert tok.decode([tok.eos_id, tok.encode("yes")[0], tok.pad_id]) == "yes"
