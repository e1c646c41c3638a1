"""train_mllm.py on a tiny random DualToken (32 px, 4x4 grid, depth 3, 32 codes) and a tiny LLM: loss goes
down for each sample kind, loss masks, the code cache (exact round trip, refuses another tokenizer),
exact resume, the exported checkpoint loads, 2-process gloo DDP keeps ranks identical."""
import json
import math
import os

import numpy as np
import pytest
import torch

import configurator

from configurator import UserError
import codec
import codecache
import data
import loaders
import sequences
import text
import tokenizer as tkz
import train_mllm as tm
import train_utils as tu
from mllm import MLLM, MLLMConfig


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("dualtoken"))
    tkz.DualToken(tkz.tiny_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cache_dir(tok_dir, tmp_path_factory):
    """One cache for the module (made by train() itself, like a first run)."""
    folder = str(tmp_path_factory.mktemp("cache"))
    tm.train(make_cfg(tok_dir, folder + "/prep", folder, prepare=True))
    return folder


def make_cfg(tok_dir, out_dir, cache_dir="", **kw):
    c = configurator.make(
        tm.TrainMLLMConfig, out_dir=str(out_dir), tokenizer=tok_dir, cache_dir=cache_dir, train_size=48, eval_size=8, n_layer=2,
        n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, head_n_layer=1, head_n_embd=32, head_n_head=2,
        batch_size=8, micro_batch=8, max_steps=4, warmup=1, lr=3e-3, eval_qa=4, eval_gen=2, eval_batch=4,
        log_interval=1, sample_interval=0, ckpt_interval=1000, device="cpu")
    configurator.assign(c, kw, "make_cfg")
    return c


def read_log(out_dir, event="train"):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["event"] == event]


def load_state(out_dir):
    return torch.load(os.path.join(out_dir, "train_state.pt"), weights_only=True)


@pytest.mark.parametrize("kind,term", [("und", "text"), ("cap", "text"), ("gen", "pix"), ("gen", "sem")])
def test_loss_drops_for_each_kind(tok_dir, cache_dir, tmp_path, kind, term):
    mix = tuple(float(k == kind) for k in tm.KINDS)
    out = tmp_path / kind
    tm.train(make_cfg(tok_dir, out, cache_dir, mix=mix, max_steps=8, eval_qa=0, eval_gen=0))
    rows = read_log(out)
    assert len(rows) == 8
    assert rows[-1][term] < 0.8 * rows[0][term], [r[term] for r in rows]
    if kind != "gen":  # understanding and captioning never train the depth heads
        assert all(r["pix"] == 0 and r["sem"] == 0 for r in rows)


def _batch(tok_dir, cache_dir, kind, **kw):
    cfg = make_cfg(tok_dir, "unused", cache_dir)
    dual = loaders.load_image_tokenizer(tok_dir)
    cache = codecache.CodeCache(cache_dir, "train", codecache.cache_meta(cfg, dual, loaders.tokenizer_hash(dual, tok_dir)))
    tok = tm.mllm_text_tokenizer(cfg)[0]
    model = tm.build_model(cfg, tok, dual)
    rec = cache.records[0]
    parts, flags = sequences.sample_parts(kind, rec, tok, np.random.default_rng(0), kw.get("drop", 0.0), 16, kw.get("n_qa", 1))
    b = sequences.make_batch(model.config, [(parts, flags, cache.pix[0], cache.sem[0])])
    return b, parts, tok, model, cache


@pytest.mark.parametrize("n_qa", [1, 3])
def test_understanding_mask_answers_only(tok_dir, cache_dir, n_qa):
    b, parts, tok, model, cache = _batch(tok_dir, cache_dir, "und", n_qa=n_qa)
    ids, t = b["idx"][0], b["targets"][0]
    assert len(parts) == 1 + 2 * n_qa and parts[0] == ("und", 16)
    truth = {tuple(p) for p in cache.records[0]["qa"]}
    pos, want = 1 + 18, []  # bos, <im_start> 16 positions <im_end>
    for q, a in zip(parts[1::2], parts[2::2]):
        assert a[-1] == tok.eos_id and (tok.decode(q).strip(), tok.decode(a[:-1])) in truth
        pos += len(q)
        want += list(range(pos - 1, pos - 1 + len(a)))  # position t predicts token t + 1
        pos += len(a)
    assert pos == len(ids)
    # targets exist exactly for the predictions of the answer tokens (and their eos): none on bos, the
    # image, its delimiters or the questions
    assert (t != -1).nonzero().flatten().tolist() == want
    assert t[want].tolist() == [x for a in parts[2::2] for x in a]
    assert b["image_mask"][0].sum() == 16 and not b["gen_mask"][0].any()  # input image: no code loss
    assert ids[0] == model.config.bos_id and ids[1] == model.config.im_start_id
    _, loss = model(**b)
    assert model.loss_parts["pix"] == 0 and model.loss_parts["sem"] == 0 and loss > 0


def test_generation_mask_and_caption_dropout(tok_dir, cache_dir):
    b, parts, tok, model, cache = _batch(tok_dir, cache_dir, "gen")
    mc, ids, t = model.config, b["idx"][0], b["targets"][0]
    assert parts[0] == tok.encode(cache.records[0]["caption"])
    assert torch.equal(b["gen_mask"][0], b["image_mask"][0]) and b["gen_mask"][0].sum() == 16
    # text loss only on <image_gen_end> (predicted by the last image position) and eos
    assert t[t != -1].tolist() == [mc.image_gen_end_id, tok.eos_id]
    assert (ids == mc.image_gen_start_id).nonzero().item() == 1 + len(parts[0])
    model(**b)
    assert model.loss_parts["pix"] > 0 and model.loss_parts["sem"] > 0 and model.loss_parts["text"] > 0
    # dropped caption == MLLM.generate_image's unconditional prompt: [bos] <image_gen_start>
    b, parts, *_ = _batch(tok_dir, cache_dir, "gen", drop=1.0)
    assert b["idx"][0, :2].tolist() == [mc.bos_id, mc.image_gen_start_id]


def test_loss_weights_reach_the_model(tok_dir, cache_dir):
    b, _, tok, model, _ = _batch(tok_dir, cache_dir, "gen")
    cfg = make_cfg(tok_dir, "unused", cache_dir, text_loss_weight=8.0, pix_loss_weight=0.5, sem_loss_weight=2.0)
    weighted = tm.build_model(cfg, tok, loaders.load_image_tokenizer(tok_dir))
    weighted.load_state_dict(model.state_dict())
    _, loss = weighted(**b)
    p = weighted.loss_parts
    assert p["text"] > 0 and p["pix"] > 0 and p["sem"] > 0
    torch.testing.assert_close(loss, 8.0 * p["text"] + 0.5 * p["pix"] + 2.0 * p["sem"])
    _, plain = model(**b)  # the default weights are the spec's 1, 1, 1
    torch.testing.assert_close(plain, sum(model.loss_parts.values()))


def test_special_ids_come_from_the_text_tokenizer(tok_dir, cache_dir):
    _, _, tok, model, _ = _batch(tok_dir, cache_dir, "cap")
    mc = model.config
    assert (mc.pad_id, mc.eos_id, mc.vocab_size) == (tok.pad_id, tok.eos_id, tok.vocab_size)
    assert mc.image_gen_start_id == tok.token_id("<image_gen_start>") and mc.bos_id == tok.token_id("<bos>")
    # MLLMConfig's defaults are the byte model's ids, so a config written by hand means what the trainer writes
    byte, d = text.PromptTokenizer("bytes"), MLLMConfig()
    assert (d.pad_id, d.eos_id, d.bos_id, d.vocab_size) == (byte.pad_id, byte.eos_id, byte.token_id("<bos>"),
                                                            byte.vocab_size)
    assert [d.im_start_id, d.im_end_id, d.image_gen_start_id, d.image_gen_end_id] == \
        [byte.token_id(n) for n in text.IMAGE_TOKENS]


def test_kind_counts():
    assert tm.kind_counts((0.4, 0.1, 0.5), 8) == {"und": 3, "cap": 1, "gen": 4}
    assert tm.kind_counts((1, 0, 0), 5) == {"und": 5, "cap": 0, "gen": 0}
    assert sum(tm.kind_counts((0.34, 0.01, 0.65), 3).values()) == 3
    with pytest.raises(ValueError, match="mix"):
        tm.kind_counts((1, -1, 0), 4)


def test_cache_round_trip_and_refuses_other_tokenizer(tok_dir, cache_dir, tmp_path):
    cfg = make_cfg(tok_dir, tmp_path, cache_dir)
    dual = loaders.load_image_tokenizer(tok_dir)
    thash = loaders.tokenizer_hash(dual, tok_dir)
    cache = codecache.CodeCache(cache_dir, "train", codecache.cache_meta(cfg, dual, thash))
    assert cache.pix.dtype == np.int16 and cache.pix.shape == (48, 16, 3) and len(cache) == 48
    world = data.ShapesWorld(data.ShapesConfig(image_size=32, max_objects=2, seed=0))
    for i in (0, 7, 47):
        s = world.sample("train", i)
        p, q = dual.encode(data.to_tensor(s["image"])[None])  # (1, 4, 4, 3)
        assert torch.equal(torch.from_numpy(np.array(cache.pix[i])).long(), p.reshape(16, 3))
        assert torch.equal(torch.from_numpy(np.array(cache.sem[i])).long(), q.reshape(16, 3))
        assert cache.records[i]["caption"] == s["caption"] and cache.records[i]["objects"] == s["objects"]
    # another tokenizer (one codebook entry moved) must not read these codes
    other = str(tmp_path / "other")
    sd = dual.state_dict()
    sd["quantizer_pix.codebook"][0, 0] += 1
    dual.load_state_dict(sd)
    dual.save_pretrained(other)
    with pytest.raises(ValueError, match="made by tokenizer"):
        tm.train(make_cfg(other, tmp_path / "run", cache_dir))
    with pytest.raises(ValueError, match="train_size"):  # same tokenizer, different data
        codecache.CodeCache(cache_dir, "train", codecache.cache_meta(make_cfg(tok_dir, tmp_path, train_size=49),
                                                                   loaders.load_image_tokenizer(tok_dir), thash))


def test_cache_codes_are_what_eval_reads_under_autocast(tok_dir, cache_dir):
    """Train/eval agreement: the cached codes (what the MLLM trains on) are exactly the codes eval.py /
    sample.py get for the same image while they run under bf16 autocast (CPU autocast stands in for cuda's)."""
    dual = loaders.load_image_tokenizer(tok_dir)
    cache = codecache.CodeCache(cache_dir, "train", codecache.cache_meta(make_cfg(tok_dir, cache_dir), dual,
                                                           loaders.tokenizer_hash(dual, tok_dir)))
    world = data.ShapesWorld(data.ShapesConfig(image_size=32, max_objects=2, seed=0))
    x = torch.stack([data.to_tensor(world.sample("train", i)["image"]) for i in range(48)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pix, sem = codec.image_codes(dual, x)  # (48, 16, 3) each
    assert torch.equal(torch.from_numpy(np.array(cache.pix[:])).long(), pix)
    assert torch.equal(torch.from_numpy(np.array(cache.sem[:])).long(), sem)


def test_interrupted_prepare_leaves_the_old_cache_whole(tok_dir, tmp_path, monkeypatch):
    """--prepare=True over an existing cache, stopped mid-encode: the old cache still reads back exactly.
    (Before, the rebuild wrote into the cache in place: the old meta.json and index stayed beside freshly
    zero-filled code arrays, a cache of all-zero rows that passed every check.) A later build completes."""
    folder = str(tmp_path / "cache")
    cfg = make_cfg(tok_dir, tmp_path / "run", folder, prepare=True)
    tm.train(cfg)
    dual = loaders.load_image_tokenizer(tok_dir)
    expect = codecache.cache_meta(cfg, dual, loaders.tokenizer_hash(dual, tok_dir))
    old = codecache.CodeCache(folder, "train", expect)
    pix, sem, recs = np.array(old.pix), np.array(old.sem), old.records
    assert pix.any()
    sample = data.ShapesWorld.sample

    def stop(self, split, i):
        if split == "train" and i == 30:
            raise KeyboardInterrupt
        return sample(self, split, i)
    monkeypatch.setattr(data.ShapesWorld, "sample", stop)
    with pytest.raises(KeyboardInterrupt):
        tm.train(cfg)
    monkeypatch.undo()
    c = codecache.CodeCache(folder, "train", expect)
    assert np.array_equal(c.pix, pix) and np.array_equal(c.sem, sem) and c.records == recs
    tm.train(cfg)  # a leftover partial build is cleared and the rebuild completes
    c = codecache.CodeCache(folder, "train", expect)
    assert np.array_equal(c.pix, pix) and np.array_equal(c.sem, sem) and sorted(os.listdir(folder)) == sorted(
        ["meta.json"] + [f"{s}_{k}" for s in ("train", "val") for k in ("pix.npy", "sem.npy", "index.json")])


def test_holdout_pairs_never_reach_the_cache(tok_dir, tmp_path):
    """Compositional generalisation: a held-out colour-shape pair is in no cached training image."""
    cfg = make_cfg(tok_dir, tmp_path / "run", str(tmp_path / "cache"), holdout_pairs=(("red", "circle"),),
                   prepare=True, train_size=64)
    tm.train(cfg)
    dual = loaders.load_image_tokenizer(tok_dir)
    cache = codecache.CodeCache(str(tmp_path / "cache"), "train", codecache.cache_meta(cfg, dual, loaders.tokenizer_hash(dual, tok_dir)))
    pairs = {(o["color"], o["shape"]) for r in cache.records for o in r["objects"]}
    assert ("red", "circle") not in pairs and len(pairs) > 5
    assert all("red circle" not in r["caption"] for r in cache.records)
    cfg.prepare, cfg.max_steps, cfg.eval_qa, cfg.eval_gen = False, 1, 0, 0
    tm.train(cfg)  # the export records the pairs, so eval.py scores them as the "holdout" split
    assert MLLM.from_pretrained(str(tmp_path / "run")).export_info["holdout_pairs"] == [["red", "circle"]]
    with pytest.raises(ValueError, match="holdout_pairs"):  # a cache made without the holdout is refused
        codecache.CodeCache(str(tmp_path / "cache"), "train",
                           codecache.cache_meta(make_cfg(tok_dir, tmp_path, train_size=64), dual,
                                               loaders.tokenizer_hash(dual, tok_dir)))


def test_train_exports_loadable_model_and_eval(tok_dir, cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    raw, res = tm.train(make_cfg(tok_dir, out, cache_dir, sample_interval=4))
    for k in ("qa_accuracy", "gen_accuracy", "n_qa", "n_gen", "wall_s", "tokenizer_hash"):
        assert k in res
    val = json.load(open(os.path.join(cache_dir, "val_index.json")))
    assert res["qa_images"] == 4 and res["n_qa"] == sum(len(r["qa"]) for r in val[:4]) > 4  # every question
    assert res["n_gen"] == 2 and res["sampling"]["cfg_scale"] == 3.0
    assert json.load(open(out / "eval.json"))["qa_accuracy"] == res["qa_accuracy"]
    assert read_log(out, "samples")
    from PIL import Image
    R = loaders.load_image_tokenizer(tok_dir).config.siglip.vision.image_size
    s = -(-144 // R)  # enlarged (nearest neighbour) to >= 144 px, as sample.py's grids
    grid = Image.open(out / "samples" / "step_000004.png")  # per val image: codes decoded | drawn, caption under
    assert grid.size[0] == 2 * (R * s + 2) + 2 and grid.size[1] > 8 * (R * s + 2) + 2
    real, normal = [], torch.nn.init.normal_

    def spy(tensor, *a, **k):  # built on the meta device: no real tensor is randomly initialised
        real.append(not tensor.is_meta)
        return normal(tensor, *a, **k)
    monkeypatch.setattr(torch.nn.init, "normal_", spy)
    model = MLLM.from_pretrained(str(out))
    info = model.export_info
    monkeypatch.undo()
    assert real and not any(real)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers(), model.inv_freq])
    assert torch.equal(model.inv_freq, raw.inv_freq) and model.inv_freq.dtype == torch.float32
    assert info["tokenizer_hash"] == res["tokenizer_hash"] and info["text_tokenizer"] == "bytes"
    assert info["sampling"] == res["sampling"]  # eval.py / sample.py draw with these by default
    for k, v in raw.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.lm_head.weight is model.embed.weight  # tie restored
    # the tokenizer is recorded relative to the run folder: the two copied elsewhere together still pair up
    rel = info["tokenizer"]
    assert not os.path.isabs(rel) and os.path.samefile(os.path.join(out, rel), tok_dir)
    import shutil
    from types import SimpleNamespace
    run2 = tmp_path.joinpath("moved", *["d"] * rel.count(".."), "run")
    shutil.copytree(out, run2)
    shutil.copytree(tok_dir, os.path.normpath(os.path.join(run2, rel)))
    cfg = SimpleNamespace(mllm=str(run2), tokenizer="", siglip_config="", check_hash=True)
    loaders.load_pair(cfg, "cpu")  # the hash check passes: the same tokenizer, found at its new place
    assert os.path.samefile(cfg.tokenizer, os.path.normpath(os.path.join(run2, rel)))
    assert str(tmp_path / "moved") in os.path.abspath(cfg.tokenizer)
    from safetensors.torch import load_file, save_file
    sd = load_file(str(out / "model.safetensors"))
    sd.pop("vis_in.0.bias")
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*vis_in.0.bias"):
        MLLM.from_pretrained(str(out))


def test_stage_trainable_sets():
    cfg = configurator.make(tm.TrainMLLMConfig, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, intermediate_size=64,
                            head_n_layer=1, head_n_embd=16, head_n_head=2)
    from mllm import tiny_config
    m = MLLM(tiny_config())
    m.set_trainable("input")
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == {"vis_in"}
    m.set_trainable("output")
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == {"pix_head", "sem_head"}
    m.set_trainable("all")
    cfg.vis_lr = 1e-3
    groups = tm.optimizer_groups(m, cfg)
    lrs = {g["name"]: g["base_lr"] for g in groups}
    assert lrs["llm_decay"] == cfg.lr and lrs["vis_decay"] == 1e-3
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_resume_is_bit_exact(tok_dir, cache_dir, tmp_path):
    kw = dict(max_steps=4, ckpt_interval=2, eval_qa=0, eval_gen=0, caption_dropout=0.5)
    tm.train(make_cfg(tok_dir, tmp_path / "a", cache_dir, **kw))
    tm.train(make_cfg(tok_dir, tmp_path / "b", cache_dir, stop_step=2, **kw))
    assert load_state(tmp_path / "b")["step"] == 2
    tm.train(make_cfg(tok_dir, tmp_path / "b", cache_dir, resume=True, **kw))
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert a["step"] == b["step"] == 4 and a["consumed"] == b["consumed"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]


def test_lr_cycles_restart_the_schedule(tok_dir, cache_dir, tmp_path):
    """Warm restarts reach the optimizer: the logged lr (what the param groups were set to) restarts at the
    second cycle's peak; the default is the one-cycle cosine."""
    kw = dict(max_steps=6, eval_qa=0, eval_gen=0)
    tm.train(make_cfg(tok_dir, tmp_path / "c", cache_dir, lr_cycles=((4, 1.0), (2, 0.5)), **kw))
    want = [1.0, 1.0, 0.775, 0.325, 0.5, 0.5]  # warmup 1, cosine to 0.1 of each peak (then 0.05, never reached)
    assert [r["lr"] for r in read_log(tmp_path / "c")] == pytest.approx([3e-3 * f for f in want])
    assert load_state(tmp_path / "c")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-3 * 0.5)
    tm.train(make_cfg(tok_dir, tmp_path / "d", cache_dir, **kw))
    one = [r["lr"] for r in read_log(tmp_path / "d")]
    assert one == pytest.approx([3e-3 * tu.cosine_lr(s, 1, 6, 1.0, 0.1) for s in range(6)]) and one[4] < one[3]


def _ddp_worker(rank, world, port, tok_dir, cache_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    raw, _ = tm.train(make_cfg(tok_dir, out_dir, cache_dir, batch_size=8, micro_batch=4, max_steps=2, eval_qa=0,
                               eval_gen=0))
    torch.save({k: v.clone() for k, v in raw.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow  # two fresh interpreters importing torch
def test_ddp_two_processes_stay_identical(tok_dir, cache_dir, tmp_path, free_port):
    port = free_port
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, tok_dir, cache_dir, out), nprocs=2, join=True)
    a, b = (torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(2))
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    init = MLLM.from_pretrained(out)  # the exported model is rank 0's
    assert torch.equal(init.state_dict()["vis_in.0.weight"], a["vis_in.0.weight"])
    assert load_state(out)["step"] == 2


def _prepare_worker(rank, world, port, tok_dir, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    seen, sample = [], data.ShapesWorld.sample
    data.ShapesWorld.sample = lambda self, split, i: seen.append((split, i)) or sample(self, split, i)
    tm.train(make_cfg(tok_dir, os.path.join(folder, "prep"), folder, prepare=True, prepare_batch=5,
                      micro_batch=4))
    with open(os.path.join(folder, f"seen{rank}.json"), "w") as f:
        json.dump(seen, f)


@pytest.mark.slow  # two fresh interpreters importing torch
def test_ddp_prepare_every_rank_encodes_its_shard(tok_dir, cache_dir, tmp_path, free_port):
    """Under torchrun each rank encodes a disjoint shard of every split (not rank 0 everything while the
    others wait in a barrier); the merged cache equals the one-process cache, row for row."""
    port = free_port
    folder = str(tmp_path / "cache")
    os.makedirs(folder)
    torch.multiprocessing.spawn(_prepare_worker, args=(2, port, tok_dir, folder), nprocs=2, join=True)
    seen = []
    for r in range(2):
        with open(os.path.join(folder, f"seen{r}.json")) as f:
            seen.append({tuple(x) for x in json.load(f)})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {("train", i) for i in range(48)} | {("val", i) for i in range(8)}
    assert all(len(s) == 28 for s in seen)
    assert not os.path.exists(os.path.join(folder, ".building"))
    with open(os.path.join(folder, "meta.json")) as f, open(os.path.join(cache_dir, "meta.json")) as g:
        assert json.load(f) == json.load(g)
    for split in ("train", "val"):
        for k in ("pix", "sem"):
            a, b = (np.load(os.path.join(d, f"{split}_{k}.npy")) for d in (folder, cache_dir))
            assert np.array_equal(a, b), (split, k)
        with open(os.path.join(folder, f"{split}_index.json")) as f, \
                open(os.path.join(cache_dir, f"{split}_index.json")) as g:
            assert json.load(f) == json.load(g)


def test_next_stage_starts_from_previous_out_dir(tok_dir, cache_dir, tmp_path):
    """Stage chaining: init_from a train_mllm out_dir; trainable="output" (stage 3) moves only the heads."""
    prev, _ = tm.train(make_cfg(tok_dir, tmp_path / "s1", cache_dir, max_steps=1, eval_qa=0, eval_gen=0))
    nxt, res = tm.train(make_cfg(tok_dir, tmp_path / "s3", cache_dir, init_from=str(tmp_path / "s1"), trainable="output",
                                 mix=(0, 0, 1), max_steps=2, eval_qa=0, eval_gen=2, top_k=8, top_p=0.9))
    a, b = prev.state_dict(), nxt.state_dict()
    for k in a:
        same = torch.equal(a[k], b[k])
        assert same != k.startswith(("pix_head.", "sem_head.")), k
    assert res["n_gen"] == 2


def test_trains_and_evaluates_under_bf16_autocast(tok_dir, cache_dir, tmp_path, monkeypatch):
    """The cuda path's bf16 autocast, simulated on CPU (train_utils.autocast_ctx gives plain fp32 there):
    training, the periodic / final evaluation with generation, and the export all run, the losses stay
    finite, and the saved weights are fp32 (autocast computes in bf16, the master weights stay fp32)."""
    import train_utils as tu
    monkeypatch.setattr(tu, "autocast_ctx", lambda device, dtype="bfloat16": torch.autocast("cpu", torch.bfloat16))
    out = tmp_path / "bf16"
    raw, res = tm.train(make_cfg(tok_dir, out, cache_dir, max_steps=3, eval_interval=2, gen_caption_loss=1.0,
                                 eval_qa=2, eval_gen=1))
    rows = read_log(out)
    assert len(rows) == 3 and all(math.isfinite(r[k]) for r in rows for k in ("loss", "text", "pix", "sem", "cap"))
    assert read_log(out, "eval") and res["n_gen"] == 1
    model = MLLM.from_pretrained(str(out))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for k, v in raw.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.slow  # inductor compiles the model on CPU
def test_trains_compiled(tok_dir, cache_dir, tmp_path):
    """compile=True (the cuda default) on CPU's inductor: training runs, losses stay finite, the export is the
    unwrapped model (no `_orig_mod.` keys) and loads."""
    out = tmp_path / "compiled"
    raw, res = tm.train(make_cfg(tok_dir, out, cache_dir, max_steps=2, compile=True, eval_qa=1, eval_gen=1))
    assert all(math.isfinite(r["loss"]) for r in read_log(out))
    model = MLLM.from_pretrained(str(out))
    for k, v in raw.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_trainer_and_eval_py_share_one_protocol(tok_dir, cache_dir, tmp_path):
    """One QA number per model (evaluation.py): the trainer's eval.json, on its cached codes, and eval.py mllm,
    encoding the world's images itself, ask every question of the same first held-out images, get the same
    answers, draw the same captions with the same recorded sampler and judge them the same way."""
    import eval as ev
    out = tmp_path / "run"
    _, res = tm.train(make_cfg(tok_dir, out, cache_dir, mix=(0.75, 0, 0.25), max_steps=150, eval_qa=3,
                               text_tokenizer="words", eval_gen=2))
    got = ev.main(["mllm", f"--mllm={out}", "--train_images=1", "--qa_images=3", "--gen_captions=2",
                   "--batch_size=4", "--blind_samples=10",
                   "--device=cpu", f"--out={tmp_path / 'eval_mllm.json'}"])["val"]
    q = got["qa"]
    assert res["n_qa"] == q["n"] > 3 and res["qa_accuracy"] == q["accuracy"] > 0  # the model answers something
    assert res["qa_examples"][:6] == q["examples"]
    assert res["qa_by_type"] == {t: dict(accuracy=v["accuracy"], n=v["n"]) for t, v in q["by_type"].items()}
    g = got["gen_cfg"]
    assert res["sampling"]["cfg_scale"] == g["cfg_scale"] and res["n_gen"] == g["n"] == 2
    assert res["gen_accuracy"] == g["all_correct"] and res["gen_objects_correct"] == g["objects_correct"]
    for k in ("count", "color", "shape", "size", "cell", "false_objects", "missed_cells"):
        assert res[f"gen_{k}"] == g[k], k
    assert res["tokenizer_recon_accuracy"] == got["tokenizer_ceiling"]["all_correct"]


def test_gen_ground_loss_trains_on_a_grid_of_whole_cells(tok_dir, tmp_path):
    """gen_ground_loss end to end: on a 48 px / patch 8 tokenizer (6x6 patches, 2x2 a cell) the trainer feeds
    every generated patch its object's words and logs a finite, falling `ground` term; on the 4x4 fixture
    tokenizer (cells cut across patches) it refuses before any step."""
    with pytest.raises(UserError, match="3x3 cells"):
        tm.train(make_cfg(tok_dir, tmp_path / "g4", str(tmp_path / "c4"), gen_ground_loss=1.0))
    torch.manual_seed(0)
    c = tkz.tiny_config()
    c.siglip.vision.image_size = c.decoder.resolution = 48
    c.decoder_latent_shape = (6, 6)
    tok6 = str(tmp_path / "tok6")
    tkz.DualToken(c).save_pretrained(tok6)
    out = tmp_path / "g6"
    tm.train(make_cfg(tok6, out, str(tmp_path / "c6"), train_size=16, eval_size=4, mix=(0.0, 0.0, 1.0),
                      max_steps=6, lr=1e-2, gen_ground_loss=1.0, eval_qa=0, eval_gen=1))
    g = [r["ground"] for r in read_log(out)]
    assert len(g) == 6 and all(math.isfinite(v) for v in g) and g[-1] < g[0]


@pytest.mark.parametrize("switch", [dict(semantic_branch=False), dict(tie_branches=True)])
def test_one_vocabulary_tokenizer_trains_a_one_stack_mllm(tmp_path, switch):
    """A reconstruction-only or tied tokenizer: the cache holds pixel codes only, the trainer builds a model with
    one stack and one head (input_codes=pix, gen_sem=False) and evaluates it; anything else is refused up front."""
    import dataclasses
    c = tkz.tiny_config()
    if "tie_branches" in switch:
        c = dataclasses.replace(c, layer_recon=c.layer_sem, tie_branches=True)
    else:
        c = dataclasses.replace(c, **switch)
    folder = str(tmp_path / "tok")
    torch.manual_seed(0)
    tkz.DualToken(c).save_pretrained(folder)
    with pytest.raises(UserError, match="one vocabulary"):
        tm.train(make_cfg(folder, tmp_path / "both", str(tmp_path / "cache")))
    model, res = tm.train(make_cfg(folder, tmp_path / "run", str(tmp_path / "cache"), input_codes="pix", gen_sem=False))
    assert model.sem_book is None and model.sem_head is None and res["n_qa"] > 0 and "gen_accuracy" in res
    assert not os.path.exists(tmp_path / "cache" / "train_sem.npy")
    assert json.load(open(tmp_path / "cache" / "meta.json"))["sem_depth"] is None
