"""train_siglip: a few steps learn, the output folder loads with SigLIP.from_pretrained, resume is exact."""
import json
import os

import pytest
import torch

import train_utils as tu
from configurator import parse_config
from siglip import SigLIP
from train_siglip import TrainSigLIPConfig, build_model, train


def tiny(out_dir, **kw):
    """A ~60k-parameter SigLIP on 32 px shapes: one step takes a fraction of a second on a CPU."""
    cfg = TrainSigLIPConfig(out_dir=str(out_dir), image_size=32, patch_size=8, vision_width=32,
                            vision_layers=1, vision_heads=2, text_width=32, text_layers=1, text_heads=2,
                            max_len=48, batch_size=16, micro_batch=8, max_steps=6, warmup=2, lr=3e-3,
                            eval_size=18, log_interval=1, eval_interval=1000, ckpt_interval=1000,
                            device="cpu", compile=False, train_size=1000)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def fixed_batch(cfg, n=16):
    import data
    from text import ByteTokenizer
    world = data.ShapesWorld(data.ShapesConfig(image_size=cfg.image_size, seed=cfg.seed))
    ds = data.ShapesDataset(world, "train", n)
    b = data.collate([ds[i] for i in range(n)])
    return b["image"], ByteTokenizer()(b["caption"], cfg.max_len)


def test_preset_parses_and_sets_the_pipeline_grid():
    cfg = parse_config(TrainSigLIPConfig(), ["config/shapes.py"])
    assert (cfg.image_size, cfg.patch_size) == (48, 8)  # 3x3 cells = 2x2 patches each
    import data
    longest = max(len(data.caption([dict(color=c, shape=s, size=z, cell=p)])) for c in data.COLORS
                  for s in data.SHAPES for z in data.SIZES for p in data.CELLS)
    assert cfg.max_objects == 1 and cfg.max_len >= longest + 1  # a caption + eos is never truncated


def test_few_steps_lower_loss_and_checkpoint_loads(tmp_path):
    cfg = tiny(tmp_path / "run", max_steps=12, batch_size=16, micro_batch=16)
    pixels, ids = fixed_batch(cfg)
    torch.manual_seed(cfg.seed)  # train() seeds the same way before building the model
    from text import ByteTokenizer
    init = build_model(cfg, ByteTokenizer().vocab_size)
    res = train(cfg)
    model = SigLIP.from_pretrained(cfg.out_dir)
    with torch.no_grad():
        before = init.sigmoid_loss(init(pixels, ids)).item()
        after = model.sigmoid_loss(model(pixels, ids)).item()
    assert after < 0.9 * before, (before, after)
    ev = json.load(open(os.path.join(cfg.out_dir, "eval.json")))
    assert ev["step"] == 12 and 0.0 <= ev["zero_shot_top1"] <= 1.0 and ev == json.loads(json.dumps(res))
    rows = [json.loads(l) for l in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    assert [r["step"] for r in rows if r["event"] == "train"] == list(range(1, 13))
    # the exported weights are the trained weights
    st = torch.load(os.path.join(cfg.out_dir, "train_state.pt"), weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, st["model"][k]), k


def test_resume_equals_uninterrupted_run(tmp_path):
    full = tiny(tmp_path / "full")
    train(full)
    part = tiny(tmp_path / "part", stop_step=3)
    train(part)
    assert torch.load(os.path.join(part.out_dir, "train_state.pt"), weights_only=True)["step"] == 3
    part.stop_step, part.resume = 0, True
    train(part)
    a = torch.load(os.path.join(full.out_dir, "train_state.pt"), weights_only=True)
    b = torch.load(os.path.join(part.out_dir, "train_state.pt"), weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["sampler"] == b["sampler"]
    nxt = []
    for st in (a, b):  # the batch each run would read next
        s = tu.ShardedSampler(full.train_size, full.seed, 0, 1, full.micro_batch)
        s.load_state_dict(st["sampler"])
        nxt.append(next(s))
    assert nxt[0] == nxt[1]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_resume_without_state_and_nan_stop(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="train_state.pt"):
        train(tiny(tmp_path / "none", resume=True))
    monkeypatch.setattr(SigLIP, "sigmoid_loss", staticmethod(lambda logits: logits.sum() * float("nan")))
    with pytest.raises(FloatingPointError, match="sigmoid_loss"):
        train(tiny(tmp_path / "nan"))


def test_trains_under_bf16_autocast(tmp_path, monkeypatch):
    """The cuda path's bf16 autocast, simulated on CPU (tu.autocast_ctx is plain fp32 there): the sigmoid
    loss stays finite, the zero-shot evaluation runs, and the export holds the fp32 trained weights."""
    import math
    monkeypatch.setattr(tu, "autocast_ctx", lambda device, dtype="bfloat16": torch.autocast("cpu", torch.bfloat16))
    cfg = tiny(tmp_path / "bf16", max_steps=3, eval_interval=3)
    res = train(cfg)
    rows = [json.loads(l) for l in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    assert all(math.isfinite(r["loss"]) for r in rows if r["event"] == "train")
    assert 0.0 <= res["zero_shot_top1"] <= 1.0
    model = SigLIP.from_pretrained(cfg.out_dir)
    st = torch.load(os.path.join(cfg.out_dir, "train_state.pt"), weights_only=True)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, st["model"][k]), k


@pytest.mark.slow  # inductor compiles the model on CPU
def test_trains_compiled(tmp_path):
    """compile=True (the cuda default) on CPU's inductor: the compiled step computes what the eager one does
    (same first loss), training runs on, and the export is the unwrapped model's weights (no `_orig_mod.`)."""
    logs = {}
    for name, comp in (("eager", False), ("compiled", True)):
        cfg = tiny(tmp_path / name, max_steps=2, compile=comp, eval_interval=2)
        train(cfg)
        logs[name] = [json.loads(l) for l in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    first = [[r["loss"] for r in logs[n] if r["event"] == "train"][0] for n in ("eager", "compiled")]
    assert abs(first[0] - first[1]) <= 1e-4 * abs(first[0]), first
    model = SigLIP.from_pretrained(str(tmp_path / "compiled"))
    st = torch.load(os.path.join(tmp_path / "compiled", "train_state.pt"), weights_only=True)
    assert not any("_orig_mod" in k for k in st["model"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, st["model"][k]), k
