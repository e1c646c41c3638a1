"""train_tokenizer.py on a tiny random teacher: loss goes down, GAN updates both sides, exact resume,
crash-safe checkpoints, NaN stop, 2-process gloo DDP keeps ranks identical."""
import json
import os

import pytest
import torch

import configurator

import losses
import train_tokenizer as tt
from siglip import SigLIP
from tokenizer import DualToken


def make_cfg(teacher_dir, out_dir, **kw):
    c = configurator.make(
        tt.TrainTokenizerConfig,         out_dir=str(out_dir), init_from=teacher_dir, max_objects=1, train_size=64, eval_size=18,
        layer_recon=1, layer_shortcut=None, layer_sem=3, vq_pix=dict(codebook_size=32, code_dim=16, depth=2),
        vq_sem=dict(codebook_size=32, code_dim=16, depth=2),
        decoder=dict(ch=32, ch_mult=(1, 1, 1), num_res_blocks=0, attn_resolutions=(), latent_channels=32),
        batch_size=4, micro_batch=4, max_steps=4, lr=2e-3, warmup=1, log_interval=1, image_interval=0,
        eval_interval=1000, eval_batch=32, ckpt_interval=1000, device="cpu", disc_width=8, disc_lr=1e-3)
    configurator.assign(c, kw, "test config")
    return c


def read_log(out_dir, event="train"):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["event"] == event]


def load_state(out_dir):
    return torch.load(os.path.join(out_dir, "train_state.pt"), weights_only=True)


def assert_same(a, b, where=""):
    """Recursive bit-exact equality of nested dicts / lists / tensors."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_loss_goes_down_and_outputs_load(teacher_dir, tmp_path):
    out = tmp_path / "run"
    raw, res = tt.train(make_cfg(teacher_dir, out, max_steps=12, image_interval=12))
    rows = read_log(out)
    assert len(rows) == 12
    first, last = rows[0], rows[-1]
    assert last["total"] < first["total"]
    for k in ("sem_tok", "sem_pool", "commit_pix", "commit_sem", "rec_mse", "lr", "pix_usage", "sem_perplexity"):
        assert k in last
    assert len(last["pix_usage"]) == 2 and "lpips" not in last and "g" not in last  # LPIPS, GAN off
    from PIL import Image
    R = raw.config.siglip.vision.image_size
    s = -(-144 // R)  # enlarged (nearest neighbour) to >= 144 px, as sample.py's grids
    grid = Image.open(out / "samples" / "step_000012.png")  # the 4 images of the batch over their reconstructions
    assert grid.size[0] == 4 * (R * s + 2) + 2 and grid.size[1] > 2 * (R * s + 2) + 2  # + a caption per row
    ev = json.load(open(out / "eval.json"))
    for k in ("psnr", "zero_shot_top1", "teacher_zero_shot_top1", "codes_pix", "codes_sem", "wall_s"):
        assert k in ev
    assert ev["n_images"] == 18 and len(ev["codes_sem"]["usage"]) == 2
    loaded = DualToken.from_pretrained(str(out))  # the exported folder is the trained model
    assert_same(loaded.state_dict(), {k: v for k, v in raw.state_dict().items()}, "from_pretrained")
    assert_same(load_state(out)["model"], raw.state_dict(), "train_state")
    # the text tower and logit scale / bias never train
    teacher = SigLIP.from_pretrained(teacher_dir)
    for k, v in teacher.text.state_dict().items():
        assert torch.equal(raw.siglip.text.state_dict()[k], v), k
    assert torch.equal(raw.siglip.logit_scale, teacher.logit_scale)


def test_real_eval_data_zero_shot_uses_class_names(teacher_dir, tmp_path):
    """ImageNet-style eval_data: the trainer's zero-shot prompts read "tench", not the folder id n01440764
    (eval.py's rule, data.ImageFolderDataset.class_names); --classnames overrides it."""
    from PIL import Image
    root = tmp_path / "val"
    for k in range(1000):
        (root / f"n{k:08d}").mkdir(parents=True)
    Image.new("RGB", (20, 20), (200, 30, 30)).save(root / "n00000000" / "a.png")
    cfg = make_cfg(teacher_dir, tmp_path / "out", data=str(root), eval_data=str(root))
    _, ev = tt.make_data(cfg, 16)
    assert ev["classes"][:2] == ["tench", "goldfish"] and len(ev["classes"]) == 1000
    names = tmp_path / "names.txt"
    names.write_text("".join(f"class {k}\n" for k in range(1000)))
    cfg.classnames = str(names)
    assert tt.make_data(cfg, 16)[1]["classes"][0] == "class 0"
    with pytest.raises(ValueError, match="give --eval_data too"):
        tt.validate(make_cfg(teacher_dir, tmp_path / "o2", classnames=str(names)))


def test_gan_updates_generator_and_discriminator(teacher_dir, tmp_path):
    out = tmp_path / "gan"
    tt.train(make_cfg(teacher_dir, out, gan_start=1, stop_step=1))
    before = load_state(out)
    tt.train(make_cfg(teacher_dir, out, gan_start=1, max_steps=3, resume=True))
    after = load_state(out)
    assert before["step"] == 1 and after["step"] == 3
    for k, v in before["disc"].items():  # step 0 had no D update (GAN off); steps 1, 2 trained D
        if k.endswith("weight"):
            assert not torch.equal(v, after["disc"][k]), k
    assert after["disc_optimizer"]["state"] and not before["disc_optimizer"]["state"]
    assert not torch.equal(before["model"]["decoder.conv_out.weight"], after["model"]["decoder.conv_out.weight"])
    rows = read_log(out)
    assert "g" not in rows[0] and rows[0]["disc_lr"] is None
    for r in rows[1:]:
        assert 0.3 <= r["adaptive_w"] <= 10.0 and "d_loss" in r and "logits_fake" in r and r["disc_lr"] > 0


def test_resume_is_bit_exact(teacher_dir, tmp_path):
    kw = dict(gan_start=2, max_steps=4, ckpt_interval=2)
    tt.train(make_cfg(teacher_dir, tmp_path / "a", **kw))
    tt.train(make_cfg(teacher_dir, tmp_path / "b", stop_step=2, **kw))
    assert load_state(tmp_path / "b")["step"] == 2
    tt.train(make_cfg(teacher_dir, tmp_path / "b", resume=True, **kw))
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    for k in ("model", "optimizer", "disc", "disc_optimizer", "rng", "step", "consumed"):
        assert_same(a[k], b[k], k)  # weights, codebooks + EMA buffers, both optimizers, RNG, data position
    # ... so the next batch is the same too
    cfg = make_cfg(teacher_dir, tmp_path / "a")
    ds, _ = tt.make_data(cfg, 32)
    ctx = tt.tu.setup_ddp("cpu")
    assert torch.equal(next(tt.batch_stream(ds, cfg, ctx, a["consumed"])),
                       next(tt.batch_stream(ds, cfg, ctx, b["consumed"])))
    assert [r["total"] for r in read_log(tmp_path / "a")] == [r["total"] for r in read_log(tmp_path / "b")]


def test_crash_mid_save_leaves_loadable_checkpoint(teacher_dir, tmp_path, monkeypatch):
    out = tmp_path / "crash"
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the step-4 checkpoint dies half-written
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="simulated"):
        tt.train(make_cfg(teacher_dir, out, max_steps=6, ckpt_interval=2))
    monkeypatch.undo()
    assert load_state(out)["step"] == 2
    DualToken.from_pretrained(str(out))
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    _, res = tt.train(make_cfg(teacher_dir, out, max_steps=6, ckpt_interval=2, resume=True))
    assert load_state(out)["step"] == 6 and res["step"] == 6


def test_nan_stops_naming_the_term_and_keeps_last_checkpoint(teacher_dir, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real, n = losses.mse_cos, [0]

    def poisoned(pred, target):
        if pred.dim() == 2:  # the pooled term
            n[0] += 1
            if n[0] == 3:
                return real(pred, target) * float("nan")
        return real(pred, target)

    monkeypatch.setattr(losses, "mse_cos", poisoned)
    with pytest.raises(FloatingPointError, match=r"'sem_pool'.*last good checkpoint is step 2"):
        tt.train(make_cfg(teacher_dir, out, max_steps=5, ckpt_interval=1))
    assert load_state(out)["step"] == 2
    assert read_log(out, "nonfinite")[0]["step"] == 2


def _ddp_worker(rank, world, port, teacher_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # decay 0.5: a code used twice in step 1 survives it keeping half of its initial value (at 0.99
    # every code restarts from rank 0's batch at step 1 and a per-rank initial codebook goes unseen)
    raw, _ = tt.train(make_cfg(teacher_dir, out_dir, batch_size=4, micro_batch=2, max_steps=3, gan_start=1,
                               vq_pix=dict(decay=0.5), vq_sem=dict(decay=0.5)))
    torch.save({k: v.clone() for k, v in raw.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow  # two fresh interpreters importing torch: ~20 s idle, ~50 s on the shared 2-core box
def test_ddp_two_processes_stay_identical(teacher_dir, tmp_path, free_port):
    port = free_port
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, teacher_dir, out), nprocs=2, join=True)
    a, b = (torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(2))
    assert_same(a, b, "rank0 vs rank1")  # weights and both quantizers' codebooks / EMA buffers
    init = DualToken(tt.build(make_cfg(teacher_dir, out))[0].config).state_dict()
    assert not torch.equal(a["decoder.conv_out.weight"], init["decoder.conv_out.weight"])
    assert load_state(out)["step"] == 3 and len(load_state(out)["rng"]) == 2


def test_trains_with_gan_under_bf16_autocast(teacher_dir, tmp_path, monkeypatch):
    """The cuda path's bf16 autocast, simulated on CPU (train_utils.autocast_ctx is plain fp32 there): both
    optimisers step with the GAN on, every logged term stays finite, the evaluation runs, and the export
    loads with fp32 weights equal to the trained ones (the quantizer's fp32 distance / EMA math included)."""
    import math
    import train_utils as tu
    monkeypatch.setattr(tu, "autocast_ctx", lambda device, dtype="bfloat16": torch.autocast("cpu", torch.bfloat16))
    out = tmp_path / "bf16"
    raw, res = tt.train(make_cfg(teacher_dir, out, max_steps=3, gan_start=1, eval_interval=3))
    rows = read_log(out)
    assert len(rows) == 3 and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert math.isfinite(res["psnr"])
    model = DualToken.from_pretrained(str(out))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for k, v in raw.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.slow  # inductor compiles the tokenizer on CPU
def test_trains_compiled(teacher_dir, tmp_path):
    """compile=True (the cuda default) on CPU's inductor, with the GAN on: both optimisers step, the export is
    the unwrapped model, and the compiled forward computes what the eager one does. Compared on step 1's
    semantic terms: the semantic quantizer searches every depth with the initial book (deferred update), so
    they do not depend on the random restart vectors, which inductor draws from another generator stream."""
    logs = {}
    for name, comp in (("eager", False), ("compiled", True)):
        raw, res = tt.train(make_cfg(teacher_dir, tmp_path / name, max_steps=2, gan_start=1, eval_interval=2,
                                     compile=comp))
        logs[name] = read_log(tmp_path / name)
    a, b = logs["eager"][0], logs["compiled"][0]
    for k in ("sem_tok", "sem_pool", "commit_sem"):
        assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]), (k, a[k], b[k])
    assert len(logs["compiled"]) == 2 and "d_loss" in logs["compiled"][1] and torch.isfinite(torch.tensor(res["psnr"]))
    model = DualToken.from_pretrained(str(tmp_path / "compiled"))
    for k, v in raw.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
