"""eval.py on the user's own data: the QA JSONL (mllm --data=) and the text-to-image SigLIP check (t2i).
The readers on handmade files (every malformed line named), the scorers against hand-counted answers and
against direct computations (a full forward per sequence; SigLIP embeddings by hand), and both CLIs end to
end on the tiny export (conftest's tiny_mllm) and the tiny SigLIP with a byte text tower (teacher_dir)."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import codec
import data
import eval as ev
import evaluation
import loaders
import siglip
import text
from mllm import MLLM, tiny_config
from sequences import build_sequence, qa_prompt


def _png(path, index, size=40):
    from PIL import Image
    world = data.ShapesWorld(data.ShapesConfig(image_size=size))
    Image.fromarray(world.sample("val", index)["image"]).save(path)
    return path


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path

# -----------------------------------------------------------------------------
# readers


def test_normalize():
    assert evaluation.normalize("  Red. ") == "red" and evaluation.normalize("Yes!?") == "yes"
    assert evaluation.normalize("3.5") == "3.5" and evaluation.normalize("o'clock") == "o'clock"
    assert evaluation.normalize("two ,") == "two" and evaluation.normalize("A circle") == "a circle"


def test_read_qa_jsonl(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "a.png", 0)
    b = _png(tmp_path / "b.png", 1)
    f = _jsonl(tmp_path / "qa.jsonl", [
        dict(image="imgs/a.png", question="what color?", answer=" Red "),
        "",  # blank lines are skipped, line numbers still count them
        dict(image=str(b), question="how many?", answer="two", choices=["one", "Two.", "three"])])
    recs = evaluation.read_qa_jsonl(str(f))
    assert [r["image"] for r in recs] == [str(tmp_path / "imgs" / "a.png"), str(b)]  # relative to the file
    assert recs[0]["answer"] == "Red" and recs[0]["choices"] is None and recs[0]["where"] == f"{f}:1"
    assert recs[1]["choices"] == ["one", "Two.", "three"] and recs[1]["where"] == f"{f}:3"


@pytest.mark.parametrize("line, msg", [
    ('{"image": "a.png", "question": "q?", "answer": "x"', "is not JSON"),
    ('["a.png", "q?", "x"]', "expected a JSON object"),
    ('{"image": "a.png", "question": "q?"}', "'answer' must be a non-empty string"),
    ('{"image": "a.png", "question": 3, "answer": "x"}', "'question' must be a non-empty string"),
    ('{"image": "a.png", "question": "q?", "answer": "  "}', "'answer' must be a non-empty string"),
    ('{"image": 7, "question": "q?", "answer": "x"}', "'image' must be a non-empty string"),
    ('{"image": "nope.png", "question": "q?", "answer": "x"}', "image file .*nope.png does not exist"),
    ('{"image": "a.png", "question": "q?", "answer": "x", "choices": "x"}', "'choices' must be a list"),
    ('{"image": "a.png", "question": "q?", "answer": "x", "choices": ["x"]}', "at least two"),
    ('{"image": "a.png", "question": "q?", "answer": "x", "choices": ["x", 2]}', "'choices' must be a list"),
    ('{"image": "a.png", "question": "q?", "answer": "x", "choices": ["x", "X."]}', "same answer after normalising"),
    ('{"image": "a.png", "question": "q?", "answer": "x", "choices": ["y", "z"]}', "is none of the choices"),
])
def test_read_qa_jsonl_names_the_bad_line(tmp_path, line, msg):
    _png(tmp_path / "a.png", 0)
    f = _jsonl(tmp_path / "qa.jsonl", [dict(image="a.png", question="q?", answer="x"), line])
    with pytest.raises(ValueError, match=re.escape(f"{f}:2") + ".*" + msg):
        evaluation.read_qa_jsonl(str(f))


def test_read_captions(tmp_path):
    _png(tmp_path / "a.png", 0)
    txt = tmp_path / "caps.txt"
    txt.write_text("a red circle\n\n  a blue square  \n")
    assert [(r["caption"], r["image"], r["where"]) for r in evaluation.read_captions(str(txt))] == \
        [("a red circle", None, f"{txt}:1"), ("a blue square", None, f"{txt}:3")]
    f = _jsonl(tmp_path / "c.jsonl", [dict(caption="a red circle", image="a.png"), dict(caption="x", image="a.png")])
    assert [r["image"] for r in evaluation.read_captions(str(f))] == [str(tmp_path / "a.png")] * 2
    f = _jsonl(tmp_path / "c.jsonl", [dict(caption="a"), dict(caption="b")])
    assert [r["image"] for r in evaluation.read_captions(str(f))] == [None, None]
    for rows, msg in (([dict(caption="a", image="a.png"), dict(caption="b")], ":2: no 'image' where .*:1 has one"),
                      ([dict(caption="a"), dict(caption="b", image="a.png")], ":2: an 'image' where"),
                      ([dict(caption="a"), dict(caption="")], ":2: 'caption' must be a non-empty string"),
                      ([dict(caption="a", image="b.png")], ":1: image file .*b.png does not exist"),
                      ([dict(caption="a"), "{oops"], ":2 is not JSON")):
        with pytest.raises(ValueError, match=msg):
            evaluation.read_captions(str(_jsonl(tmp_path / "bad.jsonl", rows)))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no captions"):
        evaluation.read_captions(str(tmp_path / "empty.txt"))

# -----------------------------------------------------------------------------
# scorers


def test_qa_file_scores_hand_counted(monkeypatch):
    """The scorer alone: answers and choice log-probs are given, the counts are by hand."""
    recs = [dict(question="q0", answer="Red", choices=None, where="f:1"),
            dict(question="q1", answer="two", choices=["one", "two", "three"], where="f:2"),
            dict(question="q2", answer="yes", choices=["yes", "no"], where="f:3"),
            dict(question="q3", answer="a cat", choices=["a dog", "a cat"], where="f:4")]
    preds = ["red.", "2", "Yes!", "a cat"]  # right (normalised), wrong, right (normalised), right
    lps = [-3.0, -1.0, -2.0,  # q1: "two" most likely -> right
           -1.0, -1.0,  # q2: a tie -> the first, "yes" -> right
           -0.5, -4.0]  # q3: "a dog" -> wrong, though the free answer was right
    seen = {}

    def answers(model, tok, rows, *a, **k):
        seen["rows"] = rows
        return preds

    def choice_logprobs(model, tok, rows, *a, **k):
        seen["crows"] = rows
        return lps
    monkeypatch.setattr(evaluation, "answers", answers)
    monkeypatch.setattr(evaluation, "choice_logprobs", choice_logprobs)
    r = evaluation.qa_file(None, None, recs, [0, 1, 0, 1], None, None, 4)
    assert seen["rows"] == [(0, "q0", "Red"), (1, "q1", "two"), (0, "q2", "yes"), (1, "q3", "a cat")]
    assert seen["crows"] == [(1, "q1", "one"), (1, "q1", "two"), (1, "q1", "three"), (0, "q2", "yes"), (0, "q2", "no"),
                             (1, "q3", "a dog"), (1, "q3", "a cat")]
    assert r["n"] == 4 and r["exact_match"] == 0.75 and r["n_choice"] == 3
    assert r["choice_accuracy"] == pytest.approx(2 / 3) and r["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert [p["correct"] for p in r["predictions"]] == [True, False, True, True]
    assert [p.get("choice") for p in r["predictions"]] == [None, "two", "yes", "a dog"]
    assert r["predictions"][0] == dict(where="f:1", question="q0", answer="Red", pred="red.", correct=True)


def _direct_logprob(model, tok, pix, sem, question, choice):
    """log p(choice + eos | image, question) from one unpadded sequence's full forward, summed by hand:
    no batching, no padding, no make_batch / make_targets."""
    ans = tok.encode(choice) + [tok.eos_id]
    ids, img, _ = build_sequence(model.config, [("und", pix.shape[0]), qa_prompt(tok, question), ans])
    with torch.no_grad():
        logits, _ = model(ids[None], image_mask=img[None], pix_codes=pix, sem_codes=sem)
    lp, T, L = torch.log_softmax(logits[0].double(), -1), ids.numel(), len(ans)
    return sum(lp[T - L - 1 + j, ans[j]].item() for j in range(L))  # the token at p is predicted at p - 1


def test_choice_logprobs_match_a_direct_forward():
    """Batched, left-padded (questions and choices of different lengths): each row equals its own forward."""
    torch.manual_seed(0)
    model = MLLM(tiny_config()).eval()
    cfg, tok = model.config, text.prompt_tokenizer("bytes")
    N = 4
    pix = torch.randint(cfg.pix_vocab, (3, N, cfg.pix_depth))
    sem = torch.randint(cfg.sem_vocab, (3, N, cfg.sem_depth))
    rows = [(0, "what color?", "red"), (2, "how many objects are there?", "two"), (1, "q", "a large blue square"),
            (0, "what color?", "blue"), (2, "?", "")]
    got = evaluation.choice_logprobs(model, tok, rows, pix, sem, batch_size=3)
    want = [_direct_logprob(model, tok, pix[i], sem[i], q, c) for i, q, c in rows]
    assert np.allclose(got, want, atol=1e-4) and all(w < 0 for w in want)
    assert got[0] != pytest.approx(got[3])  # the choice matters

# -----------------------------------------------------------------------------
# eval.py mllm --data=QA.jsonl end to end


def _qa_files(tmp_path):
    _png(tmp_path / "a.png", 0)
    _png(tmp_path / "b.png", 1, size=56)  # another size: read_image brings it to the tokenizer's 32 px
    return [dict(image="a.png", question="what color is the circle?", answer="?"),
            dict(image=str(tmp_path / "b.png"), question="how many objects are there?", answer="one",
                 choices=["one", "two", "three"]),
            dict(image="a.png", question="is there a square?", answer="no", choices=["yes", "no"]),
            dict(image="a.png", question="what shape?", answer="?")]


def test_cli_eval_qa_jsonl(tiny_mllm, tmp_path, capsys):
    rows = _qa_files(tmp_path)
    args = ["mllm", f"--mllm={tiny_mllm}", "--max_new_tokens=3", "--batch_size=2", "--device=cpu"]
    first = ev.main(args + [f"--data={_jsonl(tmp_path / 'qa.jsonl', rows)}", f"--out={tmp_path / 'e1.json'}"])
    preds = [p["pred"] for p in first["qa"]["predictions"]]
    # the free answers are the model's greedy answers to the same images, read as data.read_image reads them
    cfg = ev.EvalMLLMConfig(mllm=str(tiny_mllm))
    model, tok, image_tok, _ = loaders.load_pair(cfg, "cpu")
    x = torch.stack([data.read_image(str(tmp_path / n), 32) for n in ("a.png", "b.png")])
    pix, sem = codec.image_codes(image_tok, x)  # (2, 16, D)
    img = [0, 1, 0, 0]
    for r, i, p in zip(rows, img, preds):
        out = model.generate_text([qa_prompt(tok, r["question"])], images=(pix[i:i + 1], sem[i:i + 1]),
                                  max_new_tokens=3, temperature=0.0)
        assert tok.decode(out[0]).strip() == p
    # the model's choice, by the direct forward; then answers the model must get right / wrong:
    # line 1 its own answer with the case and trailing punctuation changed; line 2 a wrong free answer
    best = {}
    for k in (1, 2):
        lp = [_direct_logprob(model, tok, pix[img[k]], sem[img[k]], rows[k]["question"], c) for c in rows[k]["choices"]]
        best[k] = rows[k]["choices"][int(np.argmax(lp))]
        assert first["qa"]["predictions"][k]["choice"] == best[k]
    wrong = next(c for c in rows[2]["choices"] if c != best[2])
    rows[0]["answer"] = "".join(c.upper() if c.isascii() else c for c in preds[0]) + " !"
    rows[1]["answer"], rows[2]["answer"] = best[1], wrong  # choice: right on line 2, wrong on line 3
    rows[3]["answer"] = preds[3] + "x"  # an answer the model did not give
    f = _jsonl(tmp_path / "qa2.jsonl", rows)
    res = ev.main(args + [f"--data={f}", f"--out={tmp_path / 'e2.json'}"])
    q = json.load(open(tmp_path / "e2.json"))["qa"]
    assert q["n"] == 4 and q["n_choice"] == 2 and res["n_images"] == 2
    assert q["choice_accuracy"] == 0.5 and q["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert [p["pred"] for p in q["predictions"]] == preds  # same model, same images: same answers
    hits = [evaluation.normalize(p) == evaluation.normalize(r["answer"]) for p, r in zip(preds, rows)]
    assert hits[0] and not hits[3] and q["exact_match"] == sum(hits) / 4
    assert [p["correct"] for p in q["predictions"]] == hits
    assert q["predictions"][1]["where"] == f"{f}:2" and res["config"]["data"] == str(f)
    printed = capsys.readouterr().out
    assert "QA exact match" in printed and "max_new_tokens=3" in printed and "2 images" in printed
    assert "QA choice accuracy 0.5000, chance 0.4167 (n=2 lines" in printed
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # the atomic write left no temporary file


def test_cli_eval_qa_jsonl_errors(tiny_mllm, tmp_path):
    rows = _qa_files(tmp_path)
    args = ["mllm", f"--mllm={tiny_mllm}", "--device=cpu", f"--out={tmp_path / 'e.json'}"]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows[2]["image"] = "bad.png"
    f = _jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(ValueError, match=re.escape(f"{f}:3: cannot decode the image") + ".*bad.png"):
        ev.main(args + [f"--data={f}"])
    rows[2]["image"] = "gone.png"
    f = _jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(ValueError, match=re.escape(f"{f}:3: image file") + ".*gone.png does not exist"):
        ev.main(args + [f"--data={f}"])
    with pytest.raises(ValueError, match="expected 'shapes' or a .jsonl"):
        ev.main(args + [f"--data={tmp_path / 'qa.txt'}"])
    assert not os.path.exists(tmp_path / "e.json")

# -----------------------------------------------------------------------------
# text to image: the SigLIP score


def test_caption_scores_match_a_direct_computation(teacher_dir):
    judge = siglip.SigLIP.from_pretrained(teacher_dir).eval()
    tok = text.ByteTokenizer()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)  # 40 px: resized to the judge's 32
    texts = ["a red circle", "a blue square", "two green triangles", "x", "a small purple star at the top"]
    s = siglip.caption_scores(judge, tok, images, texts, batch_size=2)
    from PIL import Image
    with torch.no_grad():  # square images: eval_transform's shortest side + crop is HF's squash resize
        x = torch.stack([data.eval_transform(32)(Image.fromarray(im)) for im in images])
        a = judge.encode_image(x).double().numpy()
        b = judge.encode_text(tok(texts, 24)).double().numpy()
        t, bias = judge.logit_scale.exp().item(), judge.logit_bias.item()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert (cos < 0).any() and (cos > 0).any()  # both sides of max(cos, 0) are exercised
    assert np.allclose(s["cos"], cos, atol=1e-5) and s["n"] == 5
    assert s["clip_score"] == pytest.approx(np.mean(100 * np.maximum(cos, 0)), abs=1e-3)
    assert s["sigmoid"] == pytest.approx(np.mean(1 / (1 + np.exp(-(t * cos + bias)))), abs=1e-6)
    perm = [1, 2, 3, 4, 0]
    p = siglip.caption_scores(judge, tok, images, texts, perm)
    assert np.allclose(p["cos"], siglip.caption_scores(judge, tok, images, [texts[j] for j in perm])["cos"])
    assert not np.allclose(p["cos"], s["cos"])
    vision_only = siglip.SigLIP(siglip.SigLIPConfig(vision=judge.config.vision, text=None))
    with pytest.raises(ValueError, match="no text tower"):
        siglip.caption_scores(vision_only, tok, images, texts)


def test_cli_t2i(tiny_mllm, teacher_dir, tmp_path, capsys):
    from PIL import Image
    caps = ["a large red circle in the center", "a small blue square on the left", "two green triangles"]
    for i in range(3):
        _png(tmp_path / f"{i}.png", i, size=48)
    f = _jsonl(tmp_path / "caps.jsonl", [dict(caption=c, image=f"{i}.png") for i, c in enumerate(caps)])
    args = ["t2i", f"--mllm={tiny_mllm}", f"--siglip={teacher_dir}", "--text_tokenizer=byte", "--device=cpu",
            "--batch_size=2", "--seed=5", "--cfg_scale=2.0"]
    res = ev.main(args + [f"--captions={f}", f"--out={tmp_path / 't.json'}"])
    saved = json.load(open(tmp_path / "t.json"))
    assert saved["n"] == 3 and saved["sampling"]["cfg_scale"] == 2.0 and saved["sampling"]["seed"] == 5
    for k in ("generated", "real", "shuffled_captions"):
        assert saved[k]["n"] == 3 and 0 <= saved[k]["clip_score"] <= 100 and 0 < saved[k]["sigmoid"] < 1
    # recomputed directly: the real images as read at 32 px, the generated ones drawn again with the same seed
    judge, tok = siglip.SigLIP.from_pretrained(teacher_dir).eval(), text.ByteTokenizer()
    real = data.to_image(torch.stack([data.read_image(str(tmp_path / f"{i}.png"), 32) for i in range(3)]))
    want = siglip.caption_scores(judge, tok, real, caps)
    assert saved["real"]["clip_score"] == pytest.approx(want["clip_score"], abs=1e-4)
    assert saved["real"]["sigmoid"] == pytest.approx(want["sigmoid"], abs=1e-6)
    model, text_tok, image_tok, info = loaders.load_pair(ev.EvalT2IConfig(mllm=str(tiny_mllm)), "cpu")
    g = torch.Generator().manual_seed(5)
    sampling = dict(codec.sampling_settings(ev.EvalT2IConfig(cfg_scale=2.0), info))
    gen = data.to_image(codec.generate_images(model, image_tok, text_tok, caps, g, 2, **sampling)[0])  # batches of 2
    want = siglip.caption_scores(judge, tok, gen, caps)
    assert saved["generated"]["clip_score"] == pytest.approx(want["clip_score"], abs=1e-4)
    shuffled = siglip.caption_scores(judge, tok, gen, caps, evaluation.derangement(3, 5))
    assert saved["shuffled_captions"]["sigmoid"] == pytest.approx(shuffled["sigmoid"], abs=1e-6)
    assert Image.open(tmp_path / "t.png").size[0] == 2 * (32 * 3 + 2) + 2  # generated | real, 32 px enlarged 3x
    printed = capsys.readouterr().out
    assert "T2I generated" in printed and "T2I real" in printed and "T2I shuffled_captions" in printed
    assert f"judge {teacher_dir} at 32 px, text tokenizer byte" in printed and "'cfg_scale': 2.0" in printed
    assert res["config"]["captions"] == str(f)
    # a plain caption file: no real images; one caption: no shuffled control
    txt = tmp_path / "caps.txt"
    txt.write_text("a red circle\n")
    res = ev.main(args + [f"--captions={txt}", f"--out={tmp_path / 'u.json'}"])
    assert res["real"] is None and res["shuffled_captions"] is None and res["generated"]["n"] == 1
    assert "T2I real              n/a (no images in the file)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs --captions=FILE and --siglip=FOLDER"):
        ev.main(["t2i", f"--mllm={tiny_mllm}", f"--captions={txt}", "--device=cpu"])
    with pytest.raises(ValueError, match=r"caps.jsonl:2: 'caption' must be a non-empty string"):
        ev.main(args + [f"--captions={_jsonl(tmp_path / 'caps.jsonl', [dict(caption='a'), dict(caption=3)])}"])


def test_user_data_evals_run_under_bf16_autocast(tiny_mllm, teacher_dir, tmp_path, monkeypatch):
    """The cuda path's bf16 autocast, simulated on CPU (train_utils.autocast_ctx is plain fp32 there): the
    QA file (greedy answers and choice log-probs) and the T2I check run and give finite numbers."""
    import train_utils as tu
    monkeypatch.setattr(tu, "autocast_ctx", lambda device, dtype="bfloat16": torch.autocast("cpu", torch.bfloat16))
    f = _jsonl(tmp_path / "qa.jsonl", _qa_files(tmp_path))
    q = ev.main(["mllm", f"--mllm={tiny_mllm}", f"--data={f}", "--max_new_tokens=2", "--device=cpu",
                 f"--out={tmp_path / 'q.json'}"])["qa"]
    assert q["n"] == 4 and 0 <= q["exact_match"] <= 1 and q["choice_accuracy"] in (0.0, 0.5, 1.0)
    caps = _jsonl(tmp_path / "caps.jsonl", [dict(caption="a red circle", image="a.png"),
                                            dict(caption="a blue square", image="b.png")])
    r = ev.main(["t2i", f"--mllm={tiny_mllm}", f"--captions={caps}", f"--siglip={teacher_dir}", "--text_tokenizer=byte",
                 "--device=cpu", f"--out={tmp_path / 't.json'}"])
    assert all(math.isfinite(r[k]["clip_score"]) and 0 <= r[k]["sigmoid"] <= 1 for k in ("generated", "real"))
