"""sample.py and eval.py: the metrics (metrics.py) against independent formulas (and pytorch-msssim),
zero-shot on a case with a known answer, the data files, and every CLI end to end on tiny checkpoints
saved with the project's own save functions."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import checker
import codec
import configurator
import data
import eval as ev
import evaluation
import metrics
import sample
import text
from conftest import ROOT

# -----------------------------------------------------------------------------
# metrics


def _pair(B=3, H=24, W=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, H, W, generator=g) * 2.4 - 1.2  # a little outside [-1, 1]: clamping matters
    y = (x + 0.3 * torch.randn(B, 3, H, W, generator=g)).clamp(-1.3, 1.3)
    return x, y


def test_psnr_matches_formula():
    x, y = _pair()
    a = np.clip((x.numpy().astype(np.float64) + 1) / 2, 0, 1)
    b = np.clip((y.numpy().astype(np.float64) + 1) / 2, 0, 1)
    want = [10 * math.log10(1 / ((a[i] - b[i]) ** 2).mean()) for i in range(len(a))]
    assert np.allclose(metrics.psnr(x, y).numpy(), want, atol=1e-4)
    assert torch.allclose(metrics.psnr(x, x), torch.full((3,), 100.0))  # identical: MSE floor, not inf


def _ssim_reference(a, b, size=11, sigma=1.5, L=1.0):
    """Wang et al. written out: every valid window, weighted means / variances / covariance."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for c in range(a.shape[0]):
        for i in range(a.shape[1] - size + 1):
            for j in range(a.shape[2] - size + 1):
                p, q = a[c, i:i + size, j:j + size], b[c, i:i + size, j:j + size]
                mp, mq = (w * p).sum(), (w * q).sum()
                vp, vq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum()
                cov = (w * (p - mp) * (q - mq)).sum()
                vals.append((2 * mp * mq + c1) * (2 * cov + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
    return float(np.mean(vals))


def test_ssim_matches_formula():
    x, y = _pair(B=2, H=15, W=14)
    a = np.clip((x.numpy().astype(np.float64) + 1) / 2, 0, 1)
    b = np.clip((y.numpy().astype(np.float64) + 1) / 2, 0, 1)
    want = [_ssim_reference(a[i], b[i]) for i in range(2)]
    assert np.allclose(metrics.ssim(x, y).numpy(), want, atol=1e-6)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2), atol=1e-6)
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        metrics.ssim(x[..., :10], y[..., :10])


def test_ssim_matches_pytorch_msssim():
    pm = pytest.importorskip("pytorch_msssim", reason="pytorch-msssim (requirements-dev.txt) is the reference")
    x, y = _pair(B=4, H=48, W=40, seed=1)
    a, b = ((x + 1) / 2).clamp(0, 1), ((y + 1) / 2).clamp(0, 1)
    want = pm.ssim(a.double(), b.double(), data_range=1.0, size_average=False, win_size=11, win_sigma=1.5)
    assert torch.allclose(metrics.ssim(x, y).double(), want, atol=1e-5)


# -----------------------------------------------------------------------------
# zero-shot with a known answer


class _OneHotText(nn.Module):
    """A 'text tower' that embeds a prompt as the one-hot of the class name it contains: the
    classifier must then be the identity whatever the templates, and the answer is known."""

    def __init__(self, classes):
        super().__init__()
        self.classes, self.text = classes, True
        self.config = SimpleNamespace(text=SimpleNamespace(max_position_embeddings=64))
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_text(self, ids):
        out = torch.zeros(ids.shape[0], len(self.classes))
        for i, row in enumerate(ids.tolist()):
            prompt = bytes(t for t in row if t < 256).decode()
            hits = [k for k, c in enumerate(self.classes) if f" {c}" in f" {prompt}."]  # names are distinct words
            out[i, hits[0]] = 1.0
        return out


def test_zero_shot_known_answer():
    from text import ByteTokenizer
    classes = ["red circle", "blue square", "green triangle", "orange diamond", "purple star", "yellow moon"]
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    emb = torch.eye(6)[labels] + 0.01 * torch.randn(8, 6)
    model = _OneHotText(classes)
    assert ev.zero_shot(emb, labels, model, ByteTokenizer(), classes, templates) == {"top1": 1.0, "top5": 1.0}
    # every image looks like the NEXT class, second most like its own: top-1 0, top-2 .. top-5 all right
    emb = torch.eye(6)[(labels + 1) % 6] + 0.5 * torch.eye(6)[labels]
    assert ev.zero_shot(emb, labels, model, ByteTokenizer(), classes, templates) == {"top1": 0.0, "top5": 1.0}


def test_imagenet_data_files():
    classes = configurator.read_lines(os.path.join(ROOT, "data", "imagenet_classes.txt"), "classnames")
    templates = configurator.read_lines(os.path.join(ROOT, "data", "imagenet_templates.txt"), "templates")
    assert len(classes) == 1000 and classes[0] == "tench" and classes[-1] == "toilet paper"
    assert len(templates) == 80 and len(set(templates)) == 80 and all("{}" in t for t in templates)
    assert templates[0] == "a bad photo of a {}." and "a photo of a {}." in templates

# -----------------------------------------------------------------------------
# CLIs on tiny checkpoints


def test_cli_reconstruct(tiny_tok, tmp_path):
    from PIL import Image
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")  # not square
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / "sub" / "b.jpg")  # grayscale
    out = tmp_path / "out"
    info = sample.main(["reconstruct", f"--tokenizer={tiny_tok / 'tok'}", f"--images={folder}",
                        f"--out_dir={out}", "--device=cpu", "--batch_size=1"])
    assert len(info["images"]) == 2 and all(np.isfinite(r["psnr"]) for r in info["images"])
    assert info["images"][0]["pix_codes_shape"] == [4, 4, 3]
    grid = Image.open(out / "reconstruct.png")
    # 2 columns (original | recon) x 2 rows of 32 px enlarged x5 (>= 144 px), 2 px pad, a caption line per row
    assert grid.size == (2 * (160 + 2) + 2, 2 * (160 + 2 + 12) + 2)
    assert len(os.listdir(out / "recon")) == 2
    assert json.load(open(out / "reconstruct.json"))["config"]["images"] == str(folder)
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        sample.main(["reconstruct", f"--tokenizer={tiny_tok / 'tok'}", f"--images={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match="unknown config key"):
        sample.main(["reconstruct", f"--tokenizer={tiny_tok / 'tok'}", "--cfg_scale=3"])


def test_cli_eval_tokenizer_shapes(tiny_tok, tmp_path, capsys):
    out = tmp_path / "ev.json"
    res = ev.main(["tokenizer", f"--tokenizer={tiny_tok / 'tok'}", f"--teacher={tiny_tok / 'siglip'}",
                   "--num_images=6", "--batch_size=4", "--device=cpu", f"--out={out}"])
    saved = json.load(open(out))
    assert saved["n_images"] == 6 and saved["resolution"] == 32
    assert 0 < saved["psnr"] < 100 and -1 <= saved["ssim"] <= 1
    assert saved["lpips"] is None and saved["rfid"] is None and saved["rfid_note"].startswith("unavailable")
    zs = saved["zero_shot"]
    assert zs["classes"] == 18 and zs["templates"] == 4 and zs["n_images"] == 6
    for k in ("quantized_top1", "quantized_top5", "teacher_top1", "teacher_top5"):
        assert 0 <= zs[k] <= 1 and zs[k.replace("top1", "top5")] >= zs[k.replace("top5", "top1")]
    for q in ("codes_pix", "codes_sem"):
        assert len(saved[q]["usage"]) == 3 and saved[q]["n_vectors"] == 6 * 16
        assert all(1 <= p <= 32 for p in saved[q]["perplexity"])
    cs = saved["code_structure"]  # the same 6 val samples: depth curve over the 3 pixel depths, background stacks
    world = data.ShapesWorld(data.ShapesConfig(image_size=32))
    solid = {s["background"][1] for s in (world.sample("val", i) for i in range(6)) if s["background"][0] == "solid"}
    assert cs["n"] == 6 and len(cs["depth_curve"]) == 3 and cs["background"]["colours"] == len(solid)
    assert all(0 <= v[k] <= 1 for v in cs["depth_curve"] for k in ("all_correct", "count") + checker.ATTRS)
    b = cs["background"]
    assert (b["patches"] > 0) == bool(solid) and min(1, b["patches"]) <= b["distinct_stacks"] <= b["patches"]
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "n=6" in printed and "rFID   unavailable" in printed
    assert "codes pix first 3 depth(s) decoded" in printed and "pure-background patches" in printed
    # the same images through the same weights: deterministic
    res2 = ev.main(["tokenizer", f"--tokenizer={tiny_tok / 'tok'}", "--num_images=6", "--batch_size=3",
                    "--device=cpu", f"--out={tmp_path / 'ev2.json'}"])
    assert res2["psnr"] == pytest.approx(res["psnr"], abs=1e-5) and res2["codes_pix"] == res["codes_pix"]
    assert "teacher_top1" not in res2["zero_shot"] and "teacher_note" in res2["zero_shot"]


def test_cli_eval_tokenizer_reconstruction_only(tmp_path):
    """ablation.py's runs b and c have no semantic branch: eval.py tokenizer reports reconstruction, pixel
    codes and the teacher's zero-shot, and says the tokenizer's own zero-shot is n/a (it crashed on the
    missing semantic codes)."""
    import dataclasses
    import tokenizer
    torch.manual_seed(0)
    m = tokenizer.DualToken(dataclasses.replace(tokenizer.tiny_config(), semantic_branch=False))
    m.save_pretrained(str(tmp_path / "tok"))
    m.siglip.save_pretrained(str(tmp_path / "siglip"))
    res = ev.main(["tokenizer", f"--tokenizer={tmp_path / 'tok'}", f"--teacher={tmp_path / 'siglip'}",
                   "--data=shapes", "--num_images=8", "--text_tokenizer=byte", "--device=cpu", f"--out={tmp_path / 'e.json'}"])
    assert res["codes_sem"] is None and len(res["codes_pix"]["usage"]) == m.config.vq_pix.depth
    assert "quantized_top1" not in res["zero_shot"] and "reconstruction-only" in res["zero_shot"]["note"]
    assert 0 <= res["zero_shot"]["teacher_top1"] <= 1 and res["psnr"] > 0
    assert json.load(open(tmp_path / "e.json"))["codes_sem"] is None


def test_cli_eval_tokenizer_image_folder(tiny_tok, tmp_path):
    from PIL import Image
    root = tmp_path / "val"
    world = data.ShapesWorld(data.ShapesConfig(image_size=48))
    for i in range(4):  # 2 classes x 2 images, folder names are the class names
        s = world.sample("val", i, num_objects=1)
        name = ("red_circle", "blue_square")[i % 2]
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(s["image"]).save(root / name / f"{i}.png")
    names = tmp_path / "names.txt"
    names.write_text("a blue square\na red circle\n")
    fake = tmp_path / "inc" / "inception-2015-12-05.pt"  # not real weights: rFID must say unavailable
    fake.parent.mkdir()
    fake.write_bytes(b"not a torchscript file")
    res = ev.main(["tokenizer", f"--tokenizer={tiny_tok / 'tok'}", f"--data={root}", "--num_images=0",
                   "--text_tokenizer=byte", f"--classnames={names}", "--device=cpu", f"--inception_path={fake}",
                   f"--out={tmp_path / 'e.json'}"])
    assert res["n_images"] == 4 and res["zero_shot"]["classes"] == 2 and res["zero_shot"]["templates"] == 80
    assert "quantized_top1" in res["zero_shot"]
    c = res["codes_pix"]  # rvq.code_stats as lists, with the report's own two fields
    assert set(c) == {"usage", "perplexity", "entropy_bits", "usage_any_depth", "max_entropy_bits", "n_vectors"}
    assert c["n_vectors"] == 4 * 4 * 4 and len(c["usage"]) == 3 and max(c["entropy_bits"]) <= c["max_entropy_bits"]
    assert res["rfid"] is None and res["rfid_note"].startswith("unavailable: ")  # no clean-fid, or a bad file
    assert len(os.listdir(tmp_path / "eval_images" / "real")) == len(os.listdir(tmp_path / "eval_images" / "recon")) == 4
    names.write_text("only one\n")
    with pytest.raises(ValueError, match="1 names for 2 class folders"):
        ev.main(["tokenizer", f"--tokenizer={tiny_tok / 'tok'}", f"--data={root}", "--text_tokenizer=byte",
                 f"--classnames={names}", "--device=cpu", f"--out={tmp_path / 'e.json'}"])

# -----------------------------------------------------------------------------
# the MLLM side


def test_checker_score_on_ground_truth_is_perfect():
    world = data.ShapesWorld(data.ShapesConfig(image_size=64, max_objects=3))
    samples = [world.sample("val", i) for i in range(40)]
    res = checker.score_images(np.stack([s["image"] for s in samples]), [s["objects"] for s in samples])
    assert res == {"all_correct": 1.0, "count": 1.0, "color": 1.0, "shape": 1.0, "size": 1.0, "cell": 1.0,
                   "objects_correct": 1.0, "n": 40}
    # a blank image has every object missing
    blank = np.full((1, 64, 64, 3), 245, np.uint8)
    assert checker.score_images(blank, [samples[0]["objects"]])["all_correct"] == 0.0


def test_question_types_cover_the_world():
    world = data.ShapesWorld(data.ShapesConfig(holdout_pairs=(("red", "triangle"),)))
    types = {evaluation.question_type(q) for split in ("val", "holdout") for i in range(60)
             for q, _ in world.sample(split, i)["qa"]}
    assert types == {"count_all", "count_shape", "color", "shape", "position", "size", "exists"}


def test_blind_baseline_majority_and_chance():
    train = [("how many objects are there?", "one")] * 5 + [("what color is the circle?", "red")] * 3 + \
        [("what color is the circle?", "blue")] * 2 + [("what color is the square?", "green")] * 4
    asked = ["how many objects are there?", "what color is the circle?", "what color is the triangle?",
             "where is the red circle?"]
    answers, chance = evaluation.blind_baseline(train, asked)
    # the question's majority (red 3 : blue 2, though green is the type's majority); an unseen question:
    # its type's majority (green 4 of 9); a type train never asks: None
    assert answers == ["one", "red", "green", None]
    assert chance == {"color": 1 / 3, "count_all": 1.0}
    assert evaluation.blind_baseline([("is there a red circle?", "no"), ("is there a red circle?", "yes")],
                             ["is there a red circle?"])[0] == ["no"]  # a tie: alphabetical, not train order
    # one object per image: "how many objects" is always "one", the blind baseline gets all of them
    world = data.ShapesWorld(data.ShapesConfig(image_size=32, max_objects=1))
    train_qa = [p for i in range(300) for p in world.sample("train", i)["qa"]]
    val = [p for i in range(30) for p in world.sample("val", i)["qa"] if evaluation.question_type(p[0]) == "count_all"]
    answers, chance = evaluation.blind_baseline(train_qa, [q for q, _ in val])
    assert len(val) == 30 and answers == [a for _, a in val] == ["one"] * 30
    assert chance["count_all"] == 1.0 and chance["exists"] == 0.5 and chance["color"] == 1 / 6
    assert chance["position"] == 1 / 9 and chance["size"] == 0.5 and chance["shape"] == 1 / 3


def test_derangement():
    for n in range(2, 12):
        for seed in range(5):
            p = evaluation.derangement(n, seed)
            assert sorted(p.tolist()) == list(range(n)) and (p != np.arange(n)).all()
    assert evaluation.derangement(7, 3).tolist() == evaluation.derangement(7, 3).tolist()
    assert evaluation.derangement(1, 0).tolist() == [0]


def test_qa_eval_shuffled_reads_other_images():
    """A fake model that answers with the index of the image whose PIXEL codes it reads: right on every
    question, wrong on every one once the codes are shuffled (no image keeps its own codes); the per-stack
    controls say which stack it reads (pixel codes swapped: wrong; semantic codes swapped: right)."""
    from contextlib import nullcontext

    class Tok:
        quantizer_sem = object()  # a semantic stack of its own (codec.two_vocabularies)

        def encode(self, x):  # image i is the constant colour i -> pixel code i (B, 1, 1, 1)
            i = ((x[:, 0, 0, 0] + 1) * 127.5).round().long().view(-1, 1, 1, 1)
            return i, i

    class Model:
        reads_pix = reads_sem = True

        def generate_text(self, prompts, images, **kw):
            return [str(int(p[0, 0])) for p in images[0]]

    codec = SimpleNamespace(user_prompt=lambda q: q, decode=lambda o: o)
    objs = lambda n: [dict(color="red", shape="circle", size="small", cell="center")] * n
    samples = [dict(image=np.full((8, 8, 3), i, np.uint8), objects=objs(1 + i % 2),
                    qa=[("how many objects are there?", str(i)), ("is there a red circle?", str(i))]) for i in range(5)]
    train_qa = [("how many objects are there?", "3"), ("is there a red circle?", "4"), ("is there a red circle?", "0")]
    cfg = ev.EvalMLLMConfig(batch_size=3, seed=1)
    res = ev.qa_eval(Model(), codec, Tok(), samples, cfg, "cpu", nullcontext(), train_qa)
    assert res["qa"]["accuracy"] == 1.0 and res["qa"]["n"] == 10 and res["qa_shuffled"]["accuracy"] == 0.0
    assert res["qa"]["by_objects"] == {"1": dict(accuracy=1.0, n=6), "2": dict(accuracy=1.0, n=4)}
    blind = res["qa_blind"]["by_type"]  # "3" for every count (image 3 has it), "0" (tie 0 / 4) for exists
    assert blind == {"count_all": dict(accuracy=0.2, n=5), "exists": dict(accuracy=0.2, n=5)}
    assert res["qa"]["by_type"]["count_all"]["chance"] == 1.0 and res["qa"]["by_type"]["exists"]["chance"] == 0.5
    assert res["qa"]["chance"] == 0.75 and res["qa_shuffled"]["by_type"]["exists"] == dict(accuracy=0.0, n=5)
    assert res["qa_pix_swapped"]["accuracy"] == 0.0 and res["qa_sem_swapped"]["accuracy"] == 1.0


def test_eval_reads_the_training_codes_under_autocast():
    """eval.py runs its batches under bf16 autocast on cuda; the codes the model reads must still be the
    fp32 codes the training cache holds (CPU autocast stands in for cuda's): what qa_eval feeds the model,
    with the real tiny DualToken."""
    import tokenizer as tkz
    torch.manual_seed(0)
    tok = tkz.DualToken(tkz.tiny_config()).eval()
    world = data.ShapesWorld(data.ShapesConfig(image_size=32, max_objects=2))
    samples = [world.sample("val", i) for i in range(12)]
    x = torch.stack([data.to_tensor(s["image"]) for s in samples])
    want = codec.image_codes(tok, x)  # fp32, what train_mllm.py caches
    seen = []

    class Model:
        reads_pix = reads_sem = True

        def generate_text(self, prompts, images, **kw):
            seen.append(images)
            return [[] for _ in prompts]

    text_tok = SimpleNamespace(user_prompt=lambda q: [], decode=lambda o: "")
    cfg = ev.EvalMLLMConfig(batch_size=5)
    ev.qa_eval(Model(), text_tok, tok, [dict(s, qa=s["qa"][:1]) for s in samples], cfg, "cpu",
               torch.autocast("cpu", dtype=torch.bfloat16))
    got = [torch.cat([im[j] for im in seen[:3]]) for j in (0, 1)]  # first pass: images in order, 5 + 5 + 2
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_object_errors():
    world = data.ShapesWorld(data.ShapesConfig(image_size=64))
    drawn = [dict(color="red", shape="circle", size="large", cell="top left"),
             dict(color="blue", shape="square", size="small", cell="center")]
    pred = checker.describe(world.render(drawn))
    assert pred == drawn  # the checker reads the render back (cell order)
    asked = [dict(color="red", shape="circle", size="large", cell="top left"),
             dict(color="green", shape="triangle", size="small", cell="bottom right")]
    assert evaluation.object_errors([pred], [drawn]) == dict(false_objects=0.0, missed_cells=0.0)
    # the square in the center was not asked for (false), the bottom right was asked for and is empty (missed)
    assert evaluation.object_errors([pred], [asked]) == dict(false_objects=1.0, missed_cells=0.5)
    # two predictions in one cell: one matches, the other is false; an empty image misses everything
    two = [dict(color="red", shape="circle", size="small", cell="top")] * 2
    res = evaluation.object_errors([two, checker.describe(world.render([]))], [two[:1], asked])
    assert res == dict(false_objects=0.5, missed_cells=2 / 3)


def test_cli_generate(tiny_mllm, tmp_path):
    from PIL import Image
    caps = tmp_path / "caps.txt"
    caps.write_text("a large red circle in the center\n\na small blue square on the left\n")
    args = ["generate", f"--mllm={tiny_mllm}", f"--captions={caps}", "--num_per_caption=2", "--device=cpu",
            "--cfg_scale=2.0", "--top_k=5", "--top_p=0.9", "--seed=3", "--grid_scale=1"]
    info = sample.main(args + [f"--out_dir={tmp_path / 'a'}"])  # tokenizer: the one recorded by the MLLM
    assert info["captions"] == ["a large red circle in the center", "a small blue square on the left"]
    assert len(info["images"]) == 4 and info["sampling"]["cfg_scale"] == 2.0 and info["sampling"]["top_k"] == 5
    saved = json.load(open(tmp_path / "a" / "generate.json"))
    assert saved["sampling"] == {"cfg_scale": 2.0, "temperature": 1.0, "fine_temperature": None, "top_k": 5,
                                 "top_p": 0.9, "seed": 3, "num_per_caption": 2}
    grid = Image.open(tmp_path / "a" / "generate.png")
    assert grid.size[0] == 2 * 34 + 2 and grid.size[1] > 2 * 34  # 2 samples per row, captions under the rows
    info2 = sample.main(args + [f"--out_dir={tmp_path / 'b'}"])  # same seed: same images
    for f1, f2 in zip(info["images"], info2["images"]):
        assert np.array_equal(np.asarray(Image.open(f1)), np.asarray(Image.open(f2)))
    one = sample.main(["generate", f"--mllm={tiny_mllm}", "--captions=a small red circle at the top",
                       "--num_per_caption=1", "--cfg_scale=0", "--temperature=0", "--device=cpu",
                       f"--out_dir={tmp_path / 'c'}"])
    assert one["captions"] == ["a small red circle at the top"] and one["sampling"]["cfg_scale"] is None
    assert Image.open(tmp_path / "c" / "generate.png").size[0] == 32 * 5 + 4  # 32 px enlarged to >= 144 px


def test_cli_answer(tiny_mllm, tmp_path):
    from PIL import Image
    world = data.ShapesWorld(data.ShapesConfig(image_size=64))
    Image.fromarray(world.sample("val", 0)["image"]).save(tmp_path / "img.png")
    args = ["answer", f"--mllm={tiny_mllm}", f"--image={tmp_path / 'img.png'}", "--question=what color is it?",
            "--max_new_tokens=5", "--device=cpu", f"--out_dir={tmp_path}"]
    a, b = sample.main(args), sample.main(args)
    assert isinstance(a["answer"], str) and a["answer"] == b["answer"]  # greedy: deterministic
    assert json.load(open(tmp_path / "answer.json"))["question"] == "what color is it?"
    with pytest.raises(ValueError, match="need an existing image file"):
        sample.main(args[:2] + ["--image=nope.png", "--question=q", "--device=cpu"])


def test_cli_eval_mllm(tiny_mllm, tiny_tok, tmp_path, capsys):
    out = tmp_path / "m.json"
    res = ev.main(["mllm", f"--mllm={tiny_mllm}", "--qa_images=3", "--gen_captions=2", "--max_new_tokens=3",
                   "--holdout_pairs=(('red', 'triangle'),)", "--holdout_images=2", "--blind_samples=300",
                   "--train_images=2", "--device=cpu", f"--out={out}"])
    saved = json.load(open(out))
    world = data.ShapesWorld(data.ShapesConfig(image_size=32, holdout_pairs=(("red", "triangle"),)))
    chance = {"count_all": 1 / 2, "exists": 1 / 2, "color": 1 / 6, "shape": 1 / 3, "position": 1 / 9, "size": 1 / 2,
              "count_shape": 1 / 3}  # zero, one or two of a shape
    assert not any(k.startswith(("gen_", "tokenizer_ceiling")) for k in saved["train"])  # train: QA only
    for split, n_qa in (("val", 3), ("holdout", 2), ("train", 2)):  # train: images the trainer's cache holds
        samples = [world.sample(split, i) for i in range(n_qa)]
        q = saved[split]["qa"]
        assert q["n"] == sum(len(s["qa"]) for s in samples) == sum(v["n"] for v in q["by_type"].values())
        assert 0 <= q["accuracy"] <= 1
        assert {t: v["chance"] for t, v in q["by_type"].items()} == {t: chance[t] for t in q["by_type"]}
        want = {}
        for s in samples:
            want[str(len(s["objects"]))] = want.get(str(len(s["objects"])), 0) + len(s["qa"])
        assert {k: v["n"] for k, v in q["by_objects"].items()} == want
        for name in ("qa_shuffled", "qa_blind"):
            c = saved[split][name]
            assert c["n"] == q["n"] and set(c["by_type"]) == set(q["by_type"]) and 0 <= c["accuracy"] <= 1
            assert c["accuracy"] == pytest.approx(sum(v["accuracy"] * v["n"] for v in c["by_type"].values()) / c["n"])
        # the blind answers, recomputed from the same 300 train samples
        answers, _ = evaluation.blind_baseline([p for i in range(300) for p in world.sample("train", i)["qa"]],
                                       [qq for s in samples for qq, _ in s["qa"]])
        truth = [a for s in samples for _, a in s["qa"]]
        assert saved[split]["qa_blind"]["accuracy"] == sum(map(str.__eq__, answers, truth)) / len(truth)
        if split == "train":
            continue
        assert saved[split]["gen_cfg"]["cfg_scale"] == 3.0 and saved[split]["gen_no_cfg"]["cfg_scale"] is None
        for k in ("all_correct", "count", "color", "shape", "size", "cell", "missed_cells"):
            assert 0 <= saved[split]["gen_cfg"][k] <= 1
        assert saved[split]["gen_cfg"]["false_objects"] >= 0 and saved[split]["tokenizer_ceiling"]["false_objects"] >= 0
    assert saved["val"]["gen_cfg"]["n"] == 2 and saved["holdout"]["gen_no_cfg"]["n"] == 2
    assert saved["val"]["tokenizer_ceiling"]["n"] == 2 and 0 <= saved["val"]["tokenizer_ceiling"]["all_correct"] <= 1
    printed = capsys.readouterr().out
    assert "QA val: accuracy" in printed and "QA train: accuracy" in printed
    assert "shuffled images" in printed and "by objects in the image" in printed
    res = ev.main(["mllm", f"--mllm={tiny_mllm}", "--qa_images=1", "--gen_captions=1", "--max_new_tokens=2",
                   "--train_images=0", "--device=cpu", f"--out={out}"])
    assert "holdout" not in res and "train" not in res and res["holdout_note"].startswith("skipped")
    # train images alone are something to evaluate
    res = ev.main(["mllm", f"--mllm={tiny_mllm}", "--qa_images=0", "--gen_captions=0", "--train_images=1",
                   "--max_new_tokens=2", "--device=cpu", f"--out={out}"])
    assert res["val"] == {} and res["train"]["qa"]["n"] > 0 and 0 <= res["train"]["qa"]["accuracy"] <= 1
    # a different tokenizer than the one the MLLM was trained with is refused
    import tokenizer
    torch.manual_seed(1)
    tokenizer.DualToken(tokenizer.tiny_config()).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="the MLLM was trained with"):
        ev.main(["mllm", f"--mllm={tiny_mllm}", f"--tokenizer={tmp_path / 'other'}", "--device=cpu"])
    res = ev.main(["mllm", f"--mllm={tiny_mllm}", f"--tokenizer={tmp_path / 'other'}", "--check_hash=False",
                   "--train_images=1", "--qa_images=1", "--gen_captions=1", "--max_new_tokens=2", "--device=cpu",
                   f"--out={out}"])
    assert res["tokenizer_hash_mismatch"] and res["tokenizer_hash_mismatch"] != res["tokenizer_hash"]


def test_authors_release_layout(tmp_path):
    """The authors' checkpoint layout (the reference fixture: model.pt + config.json + a SigLIP folder)
    works in both tokenizer CLIs; its SigLIP folder doubles as the teacher."""
    from conftest import FIXTURES
    from PIL import Image
    ref = os.path.join(FIXTURES, "dualtoken_reference")
    if not os.path.isdir(ref):
        pytest.skip("reference fixture not copied into tests/fixtures")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    info = sample.main(["reconstruct", f"--tokenizer={os.path.join(ref, 'model.pt')}", f"--images={tmp_path / 'x.png'}",
                        "--device=cpu", f"--out_dir={tmp_path / 'r'}"])
    assert len(info["images"]) == 1 and info["resolution"] == 32
    args = ["tokenizer", f"--tokenizer={ref}", f"--teacher={os.path.join(ref, 'siglip')}", "--num_images=4",
            "--text_tokenizer=byte", "--device=cpu", f"--out={tmp_path / 'e.json'}"]
    with pytest.raises(ValueError, match="has 258 ids but the text tower's vocabulary has 128"):
        ev.main(args)  # the fixture's text tower (vocab 128) ships without its tokenizer
    res = ev.main(args + ["--zero_shot=False"])
    assert res["zero_shot"]["note"].startswith("skipped") and len(res["codes_pix"]["usage"]) == 3
    assert 0 < res["psnr"] < 100 and res["resolution"] == 32


def test_tokenizer_ceiling_scores_the_decoded_true_images():
    """ceiling() = the checker on decode(encode(true image)): a lossless codec scores 1, a codec that
    draws a blank background scores 0."""
    from contextlib import nullcontext
    world = data.ShapesWorld(data.ShapesConfig(image_size=64, max_objects=2))
    samples = [world.sample("val", i) for i in range(6)]
    cfg = ev.EvalMLLMConfig(batch_size=4)

    class Codec:
        def __init__(self, blank):
            self.blank = blank

        def encode(self, x):
            return x, None

        def decode(self, x):
            return torch.full_like(x, 0.9) if self.blank else x

    assert ev.tokenizer_ceiling(Codec(False), samples, cfg, "cpu", nullcontext())["all_correct"] == 1.0
    assert ev.tokenizer_ceiling(Codec(True), samples, cfg, "cpu", nullcontext())["all_correct"] == 0.0


def test_sampling_defaults_come_from_the_trained_model():
    """sample.py generate and eval.py mllm draw as the MLLM's trainer evaluated (its config.json "sampling"),
    a command-line value wins, the off switches turn a setting off, and a model without a record gets the
    paper's sampler."""
    cfg = sample.GenerateConfig()
    rec = {"sampling": dict(cfg_scale=1.5, temperature=0.7, fine_temperature=0.0, top_k=None, top_p=None)}
    assert codec.sampling_settings(cfg, rec) == rec["sampling"]
    assert codec.sampling_settings(cfg, {}) == codec.PAPER_SAMPLING
    cfg.temperature, cfg.cfg_scale, cfg.top_k, cfg.top_p, cfg.fine_temperature = 0.0, 0.0, 5, 1.0, -1.0
    assert codec.sampling_settings(cfg, rec) == dict(cfg_scale=None, temperature=0.0, fine_temperature=None,
                                                      top_k=5, top_p=None)


def test_caption_swap_sees_only_words_the_model_can_tell_apart():
    """eval.caption_swap: with the six colour words embedded identically the colour swap adds exactly nothing
    at the object's first patch, while shape and size (distinct embeddings) change the loss. The image
    tokenizer is a stub giving fixed codes on a 3x3 grid (one patch per cell)."""
    from contextlib import nullcontext
    import text
    from mllm import MLLM, tiny_config
    text_tok = text.prompt_tokenizer("words")
    torch.manual_seed(0)
    m = MLLM(tiny_config()).eval()  # 263 ids: the word ids (< 70) and the special ids (256..) fit
    cfg = m.config

    class Stub:
        quantizer_sem = object()  # two vocabularies (codec.two_vocabularies)

        def encode(self, x):
            g = torch.Generator().manual_seed(int(x.abs().sum() * 1000) % 1000)
            B = x.shape[0]
            return (torch.randint(cfg.pix_vocab, (B, 3, 3, cfg.pix_depth), generator=g),
                    torch.randint(cfg.sem_vocab, (B, 3, 3, cfg.sem_depth), generator=g))

    world = data.ShapesWorld(data.ShapesConfig(image_size=24, max_objects=1))
    samples = [world.sample("val", i) for i in range(6)]
    with torch.no_grad():
        colours = [text_tok.encode(c)[-1] for c in data.COLORS]
        m.embed.weight[colours] = m.embed.weight[colours[0]].clone()
    r = ev.caption_swap(m, text_tok, Stub(), samples, None, "cpu", nullcontext())
    assert r["n"] == 6 and r["true_nll"] > 0
    assert abs(r["added"]["color"]) < 1e-5
    assert abs(r["added"]["shape"]) > 1e-4 and abs(r["added"]["size"]) > 1e-4


def test_sample_and_eval_run_under_bf16_autocast(tiny_mllm, tiny_tok, tmp_path, monkeypatch):
    """The cuda path's bf16 autocast, simulated on CPU (train_utils.autocast_ctx is plain fp32 there):
    sample.py reconstruct / generate / answer and eval.py mllm / tokenizer run and give finite numbers."""
    import train_utils as tu
    monkeypatch.setattr(tu, "autocast_ctx", lambda device, dtype="bfloat16": torch.autocast("cpu", torch.bfloat16))
    world = data.ShapesWorld(data.ShapesConfig(image_size=32))
    img = tmp_path / "img.png"
    from PIL import Image
    Image.fromarray(np.asarray(world.sample("val", 0)["image"])).save(img)
    rec = sample.main(["reconstruct", f"--tokenizer={tiny_tok / 'tok'}", f"--images={img}", "--device=cpu",
                       f"--out_dir={tmp_path / 'r'}"])
    assert len(rec["images"]) == 1 and all(np.isfinite(r["psnr"]) for r in rec["images"])
    gen = sample.main(["generate", f"--mllm={tiny_mllm}", "--captions=a large red circle in the center",
                       "--num_per_caption=1", "--device=cpu", f"--out_dir={tmp_path / 'g'}"])
    assert len(gen["images"]) == 1
    ans = sample.main(["answer", f"--mllm={tiny_mllm}", f"--image={img}", "--question=how many objects are there?",
                       "--device=cpu", "--max_new_tokens=3", f"--out_dir={tmp_path / 'a'}"])
    assert isinstance(ans["answer"], str)
    res = ev.main(["mllm", f"--mllm={tiny_mllm}", "--train_images=1", "--qa_images=2", "--gen_captions=2",
                   "--max_new_tokens=2", "--blind_samples=50",
                   "--device=cpu", f"--out={tmp_path / 'm.json'}"])
    assert 0 <= res["val"]["qa"]["accuracy"] <= 1 and 0 <= res["val"]["gen_cfg"]["all_correct"] <= 1
    tok = ev.main(["tokenizer", f"--tokenizer={tiny_tok / 'tok'}", "--data=shapes", "--num_images=4", "--device=cpu",
                   f"--out={tmp_path / 't.json'}"])
    assert math.isfinite(tok["psnr"])


@pytest.mark.slow  # inductor compiles the tiny tokenizer and the MLLM decode step on CPU
def test_sample_and_eval_compiled(tiny_mllm, tiny_tok, tmp_path):
    """--compile=True (codec.compile_tokenizer: the tokenizer's blocks, projections and decoder compiled in
    place) gives what the eager runs give: sample.py reconstruct and eval.py tokenizer the same PSNR and codes,
    sample.py generate (the MLLM's decode step and the decoder compiled) the same pictures. Batches of 2 throughout, so
    every graph compiles once."""
    from PIL import Image
    import tokenizer
    t = tokenizer.DualToken(tokenizer.tiny_config())
    keys = list(t.state_dict())
    codec.compile_tokenizer(t)  # in place: the same parameter names (no `_orig_mod.`), the heavy parts compiled
    assert list(t.state_dict()) == keys and t.decoder._compiled_call_impl is not None
    assert all(b._compiled_call_impl is not None for b in t.siglip.vision.blocks)
    world = data.ShapesWorld(data.ShapesConfig(image_size=32))
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(np.asarray(world.sample("val", i)["image"])).save(tmp_path / "imgs" / f"{i}.png")
    runs = {}
    for c in ("False", "True"):
        common = ["--device=cpu", "--batch_size=2", f"--compile={c}"]
        rec = sample.main(["reconstruct", f"--tokenizer={tiny_tok / 'tok'}", f"--images={tmp_path / 'imgs'}",
                           f"--out_dir={tmp_path / ('r' + c)}"] + common)
        tok = ev.main(["tokenizer", f"--tokenizer={tiny_tok / 'tok'}", "--num_images=2",
                       f"--out={tmp_path / ('t' + c + '.json')}"] + common)
        gen = sample.main(["generate", f"--mllm={tiny_mllm}", "--captions=a large red circle in the center",
                           "--num_per_caption=2", "--seed=1", f"--out_dir={tmp_path / ('g' + c)}"] + common)
        pics = [np.asarray(Image.open(p), dtype=np.int16) for p in gen["images"]]
        runs[c] = ([r["psnr"] for r in rec["images"]], tok["psnr"], tok["codes_pix"], pics)
    (pe, te, ce, ge), (pc, tc, cc, gc) = runs["False"], runs["True"]
    assert pc == pytest.approx(pe, abs=1e-3) and tc == pytest.approx(te, abs=1e-3) and cc == ce
    assert len(gc) == 2 and all(np.abs(a - b).max() <= 1 for a, b in zip(ge, gc))  # uint8 rounding at most
