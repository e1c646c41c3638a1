"""The ablation switches (tokenizer.DualTokenConfig semantic_branch / tie_branches), their training
(train_tokenizer) and ablation.py end to end, on tiny random models."""
import dataclasses
import json
import os

import pytest
import torch

import configurator
import torch.nn.functional as F
from safetensors.torch import load_file

import ablation
import convert
import tokenizer as T
import train_tokenizer as tt
from conftest import FIXTURES
from siglip import SigLIP

REF = os.path.join(FIXTURES, "dualtoken_reference")


def mode_config(mode):
    """tiny_config (6 blocks, recon @ 2 with shortcut @ 1, sem @ 5) switched to one of the four runs."""
    c = T.tiny_config()
    return {"a": lambda: dataclasses.replace(c, layer_recon=c.layer_sem, tie_branches=True),
            "b": lambda: dataclasses.replace(c, layer_recon=c.layer_sem, semantic_branch=False),
            "c": lambda: dataclasses.replace(c, semantic_branch=False),
            "d": lambda: c}[mode]()


@pytest.mark.parametrize("mode", "abcd")
def test_mode_builds_trains_and_round_trips(mode, tmp_path):
    torch.manual_seed(0)
    m = T.DualToken(mode_config(mode))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    o = m(x)
    assert o.recon.shape == x.shape and o.pix_codes.shape == (2, 4, 4, 3)
    loss = F.mse_loss(o.recon, x) + o.commit_pix + o.commit_sem
    if o.pooled is not None:
        loss = loss + o.pooled.pow(2).mean() + o.zq_sem.pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    for prefix in ("decoder.", "post_quant_conv.", "postquant_pix.", "prequant_pix."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    if mode in "ad":
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("postquant_sem."))

    m.save_pretrained(str(tmp_path))
    saved = json.load(open(tmp_path / "config.json"))["dualtoken"]
    assert saved["semantic_branch"] == m.config.semantic_branch and saved["tie_branches"] == m.config.tie_branches
    n = T.DualToken.from_pretrained(str(tmp_path))
    assert n.config == m.config
    sd_m, sd_n = m.state_dict(), n.state_dict()
    assert sd_m.keys() == sd_n.keys() and all(torch.equal(sd_m[k], sd_n[k]) for k in sd_m)
    m.eval()
    with torch.no_grad():
        a, b = m(x), n(x)
    # same weights bit for bit; outputs to float rounding (loaded tensors may take other kernels / layouts)
    assert torch.equal(a.pix_codes, b.pix_codes)
    torch.testing.assert_close(a.recon, b.recon, atol=1e-5, rtol=0)
    if mode in "ad":
        torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=0)


def test_tied_uses_one_quantizer_for_both():
    torch.manual_seed(0)
    m = T.DualToken(mode_config("a"))
    assert m.quantizer_sem is None and m.prequant_sem is None and m.postquant_sem is not None
    assert not any(k.startswith(("quantizer_sem.", "prequant_sem.")) for k in m.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    o = m(x)
    assert o.sem_codes is o.pix_codes and float(o.commit_sem) == 0.0 and list(o.stats) == ["pix"]
    # the semantic loss trains the ONE pre-quant projection the pixel codes come from (straight-through)
    o.pooled.pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.prequant_pix.parameters())
    # ... while in DualToken it never reaches the pixel branch
    d = T.DualToken(mode_config("d"))
    d(x).pooled.pow(2).mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in d.prequant_pix.parameters())
    m.eval()
    with torch.no_grad():
        o = m(x)
        pix, sem = m.encode(x)
        assert torch.equal(pix, sem) and torch.equal(pix, o.pix_codes)
        torch.testing.assert_close(m.encode_image(x), o.pooled)


@pytest.mark.parametrize("mode", "bc")
def test_recon_only_has_no_semantic_path(mode):
    m = T.DualToken(mode_config(mode)).eval()
    assert m.prequant_sem is None and m.quantizer_sem is None and m.postquant_sem is None
    assert not any(k.startswith(("quantizer_sem.", "prequant_sem.", "postquant_sem.")) for k in m.state_dict())
    calls = []
    first_unused = m.config.layer_recon  # 0-based index of block layer_recon + 1
    m.siglip.vision.blocks[first_unused].register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        o = m(x)
        assert o.pooled is None and o.zq_sem is None and o.sem_codes is None and float(o.commit_sem) == 0.0
        assert list(o.stats) == ["pix"]
        pix, sem = m.encode(x)
        assert sem is None and torch.equal(pix, o.pix_codes)
    assert calls == []  # only the blocks the pixel branch reads run
    with pytest.raises(ValueError, match="no semantic branch"):
        m.encode_image(x)


def test_invalid_switches():
    c = T.tiny_config()
    with pytest.raises(ValueError, match="tie_branches"):
        dataclasses.replace(c, tie_branches=True)  # layer_recon 2 != layer_sem 5
    with pytest.raises(ValueError, match="tie_branches"):
        dataclasses.replace(c, layer_recon=5, tie_branches=True, semantic_branch=False)


def test_default_is_the_released_model(tmp_path):
    """Defaults keep the authors' checkpoint exact (fixture parity), and a config.json written before the
    switches existed still loads as the released model."""
    assert T.tiny_config().semantic_branch and not T.tiny_config().tie_branches
    m = convert.from_authors(os.path.join(REF, "model.pt"))
    assert m.config.semantic_branch and not m.config.tie_branches
    outputs = load_file(os.path.join(REF, "outputs.safetensors"))
    with torch.no_grad():
        o = m(outputs["input.images"])
    assert torch.equal(o.pix_codes, outputs["output.code_pix"]) and torch.equal(o.sem_codes, outputs["output.code_sem"])
    torch.testing.assert_close(o.recon, outputs["output.images_recon"], atol=1e-4, rtol=0)
    torch.testing.assert_close(o.pooled, outputs["output.pooler_output"], atol=1e-4, rtol=0)
    torch.testing.assert_close(o.commit_sem, outputs["output.quant_loss_sem"], atol=1e-4, rtol=0)

    m.save_pretrained(str(tmp_path))
    raw = json.load(open(tmp_path / "config.json"))
    del raw["dualtoken"]["semantic_branch"], raw["dualtoken"]["tie_branches"]
    json.dump(raw, open(tmp_path / "config.json", "w"))
    n = T.DualToken.from_pretrained(str(tmp_path))
    assert n.config == m.config

# -----------------------------------------------------------------------------
# training (train_tokenizer) and ablation.py on a tiny random teacher


def tiny_ablation(teacher_dir, out_dir, **kw):
    c = configurator.make(
        ablation.AblationConfig,         ablation_dir=str(out_dir), init_from=teacher_dir, max_objects=1, train_size=64, eval_size=18,
        layer_recon=1, layer_shortcut=None, layer_sem=3, vq_pix=dict(codebook_size=32, code_dim=16, depth=2),
        vq_sem=dict(codebook_size=32, code_dim=16, depth=2),
        decoder=dict(ch=32, ch_mult=(1, 1, 1), num_res_blocks=0, attn_resolutions=(), latent_channels=32),
        trainable="after_sem", batch_size=4, micro_batch=4, max_steps=400, steps=3, lr=2e-3, warmup=1,
        log_interval=1, eval_batch=32, device="cpu", threads=0)
    configurator.assign(c, kw, "test config")
    return c


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["event"] == "train"]


@pytest.mark.parametrize("run", "abc")
def test_training_drops_absent_loss_terms(run, teacher_dir, tmp_path):
    cfg = ablation.run_config(tiny_ablation(teacher_dir, tmp_path), run, layer_sem=3)
    raw, res = tt.train(cfg)
    rows = read_log(cfg.out_dir)
    assert len(rows) == 3
    for r in rows:
        assert "commit_sem" not in r and "sem_usage" not in r  # no semantic quantizer of its own in a, b, c
        if run == "a":
            assert "sem_tok" in r and "sem_pool" in r
            total = 5 * r["sem_tok"] + r["sem_pool"] + 5 * r["commit_pix"] + 5 * r["rec_mse"]
        else:
            assert "sem_tok" not in r and "sem_pool" not in r
            total = 5 * r["commit_pix"] + 5 * r["rec_mse"]  # exactly the reconstruction objective
        assert r["total"] == pytest.approx(total, rel=1e-5, abs=1e-6)
    assert res["codes_sem"] is None
    assert (res["zero_shot_top1"] is None) == (run != "a") and res["teacher_zero_shot_top1"] is not None
    if run != "a":  # what a recon-only run never reads stays the teacher's
        teacher = SigLIP.from_pretrained(teacher_dir)
        for k, v in teacher.vision.state_dict().items():
            if k.startswith(("blocks.1.", "blocks.2.", "blocks.3.", "post_ln.", "head.")):
                assert torch.equal(raw.siglip.vision.state_dict()[k], v), k


def test_ablation_end_to_end(teacher_dir, tmp_path, capsys, monkeypatch):
    cfg = tiny_ablation(teacher_dir, tmp_path)
    summary = ablation.main(cfg)
    rows = summary["rows"]
    assert [r["run"] for r in rows] == list("abcd")
    by = {r["run"]: r for r in rows}
    assert [(by[k]["layer_recon"], by[k]["semantic_branch"], by[k]["tie_branches"]) for k in "abcd"] == \
        [(3, True, True), (3, False, False), (1, False, False), (1, True, False)]
    assert by["b"]["zero_shot_top1"] is None and by["c"]["zero_shot_top1"] is None
    assert isinstance(by["a"]["zero_shot_top1"], float) and isinstance(by["d"]["zero_shot_top1"], float)
    assert by["d"]["codes_sem"] is not None and all(by[k]["codes_sem"] is None for k in "abc")
    for r in rows:
        assert r["steps"] == 3 and 0 < r["ssim"] <= 1 and r["n_images"] == 18
        ev = json.load(open(tmp_path / r["run"] / "eval.json"))  # the trainer's own evaluation, reported as is
        assert (r["psnr"], r["ssim"], r["zero_shot_top1"]) == (ev["psnr"], ev["ssim"], ev["zero_shot_top1"])
        m = T.DualToken.from_pretrained(os.path.join(str(tmp_path), r["run"]))
        assert (m.config.layer_recon, m.config.semantic_branch, m.config.tie_branches) == \
            (r["layer_recon"], r["semantic_branch"], r["tie_branches"])
    saved = json.load(open(tmp_path / "ablation.json"))
    assert saved["table"] == summary["table"] and len(saved["rows"]) == 4
    out = capsys.readouterr().out
    assert summary["table"] in out and out.count("n/a") >= 4  # zero-shot and semantic usage of (b), (c)
    # reuse: results written with the same config are read back, nothing trains
    monkeypatch.setattr(tt, "train", lambda cfg: pytest.fail("reuse=True trained again"))
    again = ablation.main(tiny_ablation(teacher_dir, tmp_path, reuse=True, runs="bd"))
    assert [r["psnr"] for r in again["rows"]] == [by["b"]["psnr"], by["d"]["psnr"]]


def test_reuse_retrains_for_another_teacher(teacher_dir, tmp_path, monkeypatch):
    """Same init_from path and config, retrained weights: the stored result must not be reused; the finished run
    is trained again only with --overwrite=True (the trainers' rule), and refused before any training without."""
    import shutil
    t2 = str(tmp_path / "teacher")
    shutil.copytree(teacher_dir, t2)
    ablation.main(tiny_ablation(t2, tmp_path / "abl", runs="c", steps=1))
    torch.manual_seed(1)
    SigLIP(SigLIP.from_pretrained(t2).config).save_pretrained(t2)  # a retrained teacher, same path and config
    calls = []
    real = tt.train
    monkeypatch.setattr(tt, "train", lambda cfg: calls.append(1) or real(cfg))
    with pytest.raises(ablation.UserError, match=r"abl/c already holds a finished run .*--overwrite=True"):
        ablation.main(tiny_ablation(t2, tmp_path / "abl", runs="c", steps=1, reuse=True))
    assert calls == []
    ablation.main(tiny_ablation(t2, tmp_path / "abl", runs="c", steps=1, reuse=True, overwrite=True))
    assert calls == [1]


def test_ablation_config_errors(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown run"):
        ablation.run_config(tiny_ablation(teacher_dir, tmp_path), "e", layer_sem=3)
    with pytest.raises(ValueError, match="shallow layer_recon"):
        ablation.main(tiny_ablation(teacher_dir, tmp_path, layer_recon=3))
    with pytest.raises(ValueError, match="init_from"):
        ablation.main(tiny_ablation(str(tmp_path / "nope"), tmp_path))


# --- python ablation.py mllm: why two vocabularies ----------------------------------------------------

def test_ablation_mllm_tiny_end_to_end(tmp_path, capsys):
    """Every variant trains and evaluates from the one command (tiny preset, a few steps, one seed), the results
    JSON has one entry per run with the issue's keys, the single_vocab MLLM holds one stack and one head, a second
    call retrains nothing, and a folder made by other arguments is refused."""
    from safetensors import safe_open
    from test_errors import PRESET
    preset = tmp_path / "tiny.py"
    preset.write_text(PRESET)
    D = tmp_path / "abl"
    argv = ["mllm", str(preset), f"--ablation_dir={D}", "--seeds=(0,)", "--steps=2", "--train_size=12",
            "--tokenizer_steps=1", "--qa_images=2", "--gen_captions=2", "--threads=1"]
    out = ablation.main_cli(argv)
    runs = {r["variant"]: r for r in out["runs"]}
    assert sorted(runs) == sorted(ablation.VARIANTS) and all(r["seed"] == 0 and r["steps"] == 2 for r in runs.values())
    for r in runs.values():
        assert 0 <= r["qa_accuracy"] <= 1 and r["n_qa"] > 0 and "background" in r["qa_by_type"]
        assert r["gen_all_correct"] is not None and set(r["gen_by_attribute"]) == {"count", "color", "shape", "size", "cell"}
    assert "qa_pix_swapped" in runs["dual"] and "qa_pix_swapped" not in runs["pix_input"]
    assert runs["dual"]["tokenizer_hash"] == runs["pix_gen"]["tokenizer_hash"] != runs["single_vocab"]["tokenizer_hash"]
    saved = json.load(open(D / "ablation_mllm.json"))
    assert len(saved["runs"]) == 5 and saved["commit"] and saved["machine"] and "| `dual` |" in saved["table"]
    assert (D / "ablation_mllm.md").read_text().startswith("| variant |")
    from PIL import Image
    assert Image.open(D / "ablation_mllm.png").size[0] > 4 * 32  # the true image + three variants per caption

    def keys(run):
        with safe_open(str(D / run / "model.safetensors"), "pt") as f:
            return set(f.keys())
    single, dual = keys("single_vocab_s0"), keys("dual_s0")
    assert not any(k.startswith(("sem_book", "sem_head")) for k in single)
    assert any(k.startswith("sem_head") for k in dual) and "sem_book" in dual
    assert json.load(open(D / "single_vocab_s0" / "config.json"))["mllm"]["input_codes"] == "pix"

    stamp = os.path.getmtime(D / "dual_s0" / "model.safetensors")
    capsys.readouterr()
    ablation.main_cli(argv)
    assert "running:" not in capsys.readouterr().out  # every stage found finished
    assert os.path.getmtime(D / "dual_s0" / "model.safetensors") == stamp
    col = ablation.main_cli(argv + ["--collect=True", f"--results={tmp_path / 'col.json'}"])
    assert [r["variant"] for r in col["runs"]] == [r["variant"] for r in out["runs"]] and "--collect" not in col["command"]
    # a run whose folder is gone keeps its recorded entry; results made with other settings are not mixed in
    os.rename(D / "pix_gen_s0", tmp_path / "pix_gen_s0")
    again = ablation.main_cli(argv + ["--collect=True", f"--results={tmp_path / 'col.json'}"])
    assert again["runs"] == col["runs"] and "kept pix_gen seed 0" in capsys.readouterr().out
    with pytest.raises(ablation.UserError, match="temperature"):
        ablation.main_cli(argv + ["--collect=True", f"--results={tmp_path / 'col.json'}", "--temperature=0.7"])
    os.rename(tmp_path / "pix_gen_s0", D / "pix_gen_s0")
    with pytest.raises(ablation.UserError, match="another command"):
        ablation.main_cli([a if not a.startswith("--steps") else "--steps=3" for a in argv]
                          + [f"--results={tmp_path / 'other.json'}"])
    with pytest.raises(ablation.UserError, match="other settings"):  # its results file, before any stage
        ablation.main_cli([a if not a.startswith("--steps") else "--steps=3" for a in argv])
    with pytest.raises(ablation.UserError, match="unknown"):
        ablation.main_cli(argv + ["--variants=dual,duel"])
