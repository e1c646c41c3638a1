"""Tests for mllm.py: HF parity (Qwen2, LLaMA incl. llama3 RoPE, tied / untied, sharded), strict loading,
vocabulary growth, KV cache (prefill + step, token by token, left padding), depth heads, losses, CFG."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import llm
import mllm
import mllm_hf
import sequences
from mllm import MLLM, tiny_config
from sequences import build_sequence, collate_sequences, make_targets

VIS = dict(pix_vocab=32, pix_dim=8, pix_depth=3, sem_vocab=24, sem_dim=6, sem_depth=2, head_n_layer=2,
           head_n_embd=32, head_n_head=2)


def tiny_model(**kw):
    cfg = tiny_config(**kw)
    m = MLLM(cfg).eval()
    m.set_codebooks(torch.randn(cfg.pix_vocab, cfg.pix_dim), torch.randn(cfg.sem_depth, cfg.sem_vocab, cfg.sem_dim))
    return m


def random_codes(cfg, n):
    return (torch.randint(0, cfg.pix_vocab, (n, cfg.pix_depth)), torch.randint(0, cfg.sem_vocab, (n, cfg.sem_depth)))


# --- HF parity ---------------------------------------------------------------------------------------

def hf_model(kind, tied, tmp_path, shard=None):
    transformers = pytest.importorskip("transformers", reason="HF parity needs transformers")
    common = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=256, rms_norm_eps=1e-6)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(rope_parameters=dict(rope_type="default", rope_theta=1e6), **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:  # llama3 rope scaling with a short original context so all three frequency bands occur
        rope = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=32)
        cfg = transformers.LlamaConfig(rope_parameters=rope, attention_bias=not tied, **common)
        model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0: randomise so parity means something
        for n, p in model.named_parameters():
            p.copy_((1.0 if "norm" in n else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    return model


@pytest.mark.parametrize("kind,tied,shard", [("qwen2", True, "40KB"), ("qwen2", False, None),
                                             ("llama", False, "40KB"), ("llama", True, None)])
def test_hf_parity_logits_and_greedy(kind, tied, shard, tmp_path):
    ref = hf_model(kind, tied, tmp_path, shard)
    if shard:
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ours = mllm_hf.from_pretrained(str(tmp_path), **VIS).eval()
    assert (ours.lm_head.weight is ours.embed.weight) == tied
    idx = torch.randint(0, 120, (2, 40))
    with torch.no_grad():
        a = ref(idx).logits
        b, _ = ours(idx)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    prompt = idx[:1, :10]
    with torch.no_grad():
        # explicit mask: HF would otherwise treat prompt tokens equal to pad_token_id as padding
        g_ref = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    g_ours = ours.generate(prompt, 12, temperature=0)
    assert torch.equal(g_ours, g_ref)


def test_config_legacy_rope_layout_matches_v5():
    new = dict(model_type="llama", hidden_size=64, num_attention_heads=4,
               rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=32))
    old = dict(model_type="llama", hidden_size=64, num_attention_heads=4, rope_theta=5e5,
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=32))
    a, b = mllm_hf.config_from_hf(new), mllm_hf.config_from_hf(old)
    assert a == b and a.rope_theta == 5e5 and a.rope_scaling["factor"] == 8.0
    assert torch.equal(llm.rope_inv_freq(a), llm.rope_inv_freq(b))
    assert not torch.equal(llm.rope_inv_freq(a), llm.rope_inv_freq(mllm_hf.config_from_hf(dict(old, rope_scaling=None))))


def test_unknown_rope_type_and_model_type_are_errors():
    with pytest.raises(ValueError, match="yarn"):
        mllm_hf.config_from_hf(dict(model_type="llama", rope_scaling=dict(rope_type="yarn", factor=2.0)))
    with pytest.raises(ValueError, match="model_type"):
        mllm_hf.config_from_hf(dict(model_type="gpt2"))
    with pytest.raises(ValueError, match="dynamic"):
        llm.rope_inv_freq(tiny_config(rope_scaling=dict(rope_type="dynamic", factor=2.0)))


def write_folder(path, cfg_json, sd):
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_json, f)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"))


def test_strict_loading_names_the_bad_key(tmp_path):
    cfg_json = dict(model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = MLLM(mllm_hf.config_from_hf(cfg_json, **VIS))
    ours = dict(model.named_parameters())
    sd = {hf: ours[us].detach().clone() for hf, us in mllm_hf.hf_name_table(model).items()}
    write_folder(tmp_path / "ok", cfg_json, sd)
    mllm_hf.from_pretrained(str(tmp_path / "ok"), **VIS)
    bad = dict(sd)
    del bad["model.layers.0.self_attn.k_proj.bias"]
    write_folder(tmp_path / "missing", cfg_json, bad)
    with pytest.raises(ValueError, match="missing keys.*k_proj.bias"):
        mllm_hf.from_pretrained(str(tmp_path / "missing"), **VIS)
    write_folder(tmp_path / "extra", cfg_json, dict(sd, **{"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
        mllm_hf.from_pretrained(str(tmp_path / "extra"), **VIS)
    write_folder(tmp_path / "shape", cfg_json, dict(sd, **{"model.norm.weight": torch.ones(31)}))
    with pytest.raises(ValueError, match=r"model.norm.weight \(31,\) vs \(32,\)"):
        mllm_hf.from_pretrained(str(tmp_path / "shape"), **VIS)
    with pytest.raises(ValueError, match="config.json"):
        mllm_hf.from_pretrained(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("tied", [True, False])
def test_vocab_growth_mean_rows_and_tie(tied, tmp_path):
    cfg_json = dict(model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = MLLM(mllm_hf.config_from_hf(cfg_json, **VIS))
    ours = dict(model.named_parameters())
    write_folder(tmp_path, cfg_json, {hf: ours[us].detach() for hf, us in mllm_hf.hf_name_table(model).items()})
    base = mllm_hf.from_pretrained(str(tmp_path), **VIS).eval()
    names = ("<im_start>", "<im_end>", "<image_gen_start>", "<image_gen_end>")
    grown = mllm_hf.from_pretrained(str(tmp_path), new_tokens=names, **VIS).eval()
    c = grown.config
    assert c.vocab_size == 54 and (c.im_start_id, c.im_end_id, c.image_gen_start_id, c.image_gen_end_id) == (50, 51, 52, 53)
    assert (grown.lm_head.weight is grown.embed.weight) == tied
    mean = base.embed.weight.mean(0)
    torch.testing.assert_close(grown.embed.weight[50:], mean.expand(4, -1))
    torch.testing.assert_close(grown.lm_head.weight[50:], base.lm_head.weight.mean(0).expand(4, -1))
    idx = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(grown(idx)[0][..., :50], base(idx)[0])


def write_tokenizer_config(path, tc):
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)


def test_bos_follows_the_tokenizer_config(tmp_path):
    """Qwen2.5 names <|endoftext|> as bos_token_id in config.json, but its tokenizer adds no bos
    (tokenizer_config.json: "bos_token": null); LLaMA-3's adds <|begin_of_text|>; "add_bos_token" decides
    when present; without a tokenizer_config.json config.json's id stands."""
    cfg_json = dict(model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=47,
                    eos_token_id=47)
    model = MLLM(mllm_hf.config_from_hf(cfg_json, **VIS))
    ours = dict(model.named_parameters())
    sd = {hf: ours[us].detach() for hf, us in mllm_hf.hf_name_table(model).items()}
    added = {"47": dict(content="<|endoftext|>", special=True), "48": dict(content="<|begin_of_text|>", special=True)}
    cases = {"qwen": (dict(bos_token=None, eos_token="<|endoftext|>", added_tokens_decoder=added), None),
             "llama3": (dict(bos_token="<|begin_of_text|>", added_tokens_decoder=added), 48),
             "llama2": (dict(add_bos_token=True, bos_token=dict(content="<s>")), 47),  # id from config.json
             "off": (dict(add_bos_token=False, bos_token="<|begin_of_text|>", added_tokens_decoder=added), None),
             "none": (None, 47)}
    for name, (tc, want) in cases.items():
        write_folder(tmp_path / name, cfg_json, sd)
        if tc is not None:
            write_tokenizer_config(tmp_path / name, tc)
        m = mllm_hf.from_pretrained(str(tmp_path / name), **VIS)
        assert m.config.bos_id == want, name
        ids = sequences.build_sequence(m.config, [[5, 6]])[0]
        assert ids[0].item() == (5 if want is None else want), name  # what a training sequence starts with
    with pytest.raises(ValueError, match="bos"):
        mllm_hf.config_from_hf(dict(cfg_json, bos_token_id=None), dict(bos_token="<s>"))


@pytest.mark.parametrize("tied", [True, False])
def test_from_pretrained_builds_the_trunk_on_meta(tied, tmp_path, monkeypatch):
    """One copy of the weights: no trunk tensor is allocated or randomly initialised before the checkpoint
    is assigned. Same logits as the old path (a full random model, the trunk copied in), vocabulary growth
    and tie kept, RoPE frequencies real and fp32."""
    from safetensors.torch import load_file
    cfg_json = dict(model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, rope_theta=1e4)
    src = MLLM(mllm_hf.config_from_hf(cfg_json, **VIS))
    table = mllm_hf.hf_name_table(src)
    ours = dict(src.named_parameters())
    write_folder(tmp_path, cfg_json, {hf: ours[us].detach() + 0.01 * torch.randn(ours[us].shape)
                                      for hf, us in table.items()})  # norms away from 1, biases from 0
    old = MLLM(mllm_hf.config_from_hf(cfg_json, **VIS)).eval()  # the old path
    mllm_hf.load_hf_state_dict(old, load_file(str(tmp_path / "model.safetensors")))
    real = []  # elements randomly initialised in real (not meta) tensors
    normal = torch.nn.init.normal_

    def spy(tensor, *a, **k):
        real.append(0 if tensor.is_meta else tensor.numel())
        return normal(tensor, *a, **k)
    monkeypatch.setattr(torch.nn.init, "normal_", spy)
    names = ("<im_start>", "<im_end>", "<image_gen_start>", "<image_gen_end>")
    new = mllm_hf.from_pretrained(str(tmp_path), new_tokens=names, **VIS).eval()
    monkeypatch.undo()
    trunk = set(table.values()) | {"lm_head.weight"}
    n_visual = sum(p.numel() for n, p in old.named_parameters() if n not in trunk)
    assert 0 < sum(real) <= n_visual  # only the new visual side was initialised
    assert not any(t.is_meta for t in [*new.parameters(), *new.buffers(), new.inv_freq])
    assert new.inv_freq.dtype == torch.float32 and torch.equal(new.inv_freq, old.inv_freq)
    assert (new.lm_head.weight is new.embed.weight) == tied and new.config.vocab_size == 54
    mllm_hf.grow_vocab(old, 4)
    idx = torch.randint(0, 54, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(new(idx)[0], old(idx)[0], atol=0, rtol=0)
    bf = mllm_hf.from_pretrained(str(tmp_path), dtype=torch.bfloat16, **VIS)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16} and bf.inv_freq.dtype == torch.float32


# --- KV cache ----------------------------------------------------------------------------------------

def test_kv_cache_prefill_step_and_token_by_token_match_full():
    m = tiny_model()
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = m.trunk(m.embed(idx))
        cache = m.new_cache(2, 20)
        pre = m.trunk(m.embed(idx[:, :19]), cache=cache)
        step = m.trunk(m.embed(idx[:, 19:]), cache=cache)
        torch.testing.assert_close(torch.cat([pre, step], 1), full, atol=1e-5, rtol=1e-5)
        cache = m.new_cache(2, 20)
        one = torch.cat([m.trunk(m.embed(idx[:, t:t + 1]), cache=cache) for t in range(20)], 1)
        torch.testing.assert_close(one, full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_rows_one_by_one():
    m = tiny_model()
    rows = [torch.randint(0, 256, (n,)) for n in (5, 12, 9)]
    no = lambda r: torch.zeros(len(r), dtype=torch.bool)  # noqa: E731 (no image, no generation)
    batch = collate_sequences(m.config, [(r, no(r), no(r)) for r in rows])
    with torch.no_grad():
        cache = m.new_cache(3, 12 + 4)
        h = m.trunk(m.embed(batch["idx"]), batch["attention_mask"], cache)
        nxt = torch.randint(0, 256, (3, 4))
        steps = [m.trunk(m.embed(nxt[:, i:i + 1]), cache=cache) for i in range(4)]
        full_pad = m.trunk(m.embed(batch["idx"]), batch["attention_mask"])  # no cache, same padding
        for b, r in enumerate(rows):
            ref = m.trunk(m.embed(torch.cat([r, nxt[b]])[None]))[0]  # (n + 4, C)
            n = len(r)
            torch.testing.assert_close(h[b, 12 - n:], ref[:n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(full_pad[b, 12 - n:], ref[:n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.cat(steps, 1)[b], ref[n:], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(h).all()


def test_generate_cache_equals_no_cache_and_generate_text_matches():
    m = tiny_model(eos_id=None)
    idx = torch.randint(0, 256, (2, 7))
    a = m.generate(idx, 10, temperature=0)
    b = m.generate(idx, 10, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    prompt = idx[0].tolist()
    out = m.generate_text([prompt], max_new_tokens=10)[0]
    ref = m.generate(build_sequence(m.config, [prompt])[0][None], 10, temperature=0)[0, -10:].tolist()
    assert out == ref


class EosAfter(torch.nn.Module):
    """Wraps the output head: row b gets an overwhelming eos logit from call stops[b] on."""

    def __init__(self, head, eos, stops):
        super().__init__()
        self.head, self.eos, self.stops, self.calls = head, eos, stops, 0

    def forward(self, h):
        logits = self.head(h).clone()
        self.calls += 1
        for b, s in enumerate(self.stops):
            if self.calls >= s:
                logits[b, self.eos] = 1e4
        return logits


def test_generate_text_stops_at_eos():
    m = tiny_model()
    m.lm_head = EosAfter(m.lm_head, m.config.eos_id, [3, 5])
    out = m.generate_text([[65, 66], [67]], images=random_codes_b(m.config, 2, 4), max_new_tokens=8)
    assert [len(o) for o in out] == [2, 4] and m.config.eos_id not in out[0] + out[1]
    assert m.lm_head.calls == 5  # stopped once every row had its eos


def random_codes_b(cfg, B, N):
    p, s = random_codes(cfg, B * N)
    return p.view(B, N, -1), s.view(B, N, -1)


# --- visual in / out ---------------------------------------------------------------------------------

def test_set_codebooks_shapes_and_image_embedding():
    m = tiny_model()
    cfg = m.config
    book = torch.randn(cfg.pix_vocab, cfg.pix_dim)
    for b in (book, book[None]):
        m.set_codebooks(b, torch.randn(1, cfg.sem_vocab, cfg.sem_dim))
        assert torch.equal(m.pix_book[2], book)
    per = torch.randn(cfg.sem_depth, cfg.sem_vocab, cfg.sem_dim)
    m.set_codebooks(book, per)
    pix, sem = random_codes(cfg, 5)
    e = torch.cat([book[pix].sum(1), per[torch.arange(cfg.sem_depth), sem].sum(1)], -1)
    torch.testing.assert_close(m.embed_images(pix, sem), m.vis_in(e))
    with pytest.raises(ValueError, match="pix_codebook"):
        m.set_codebooks(torch.randn(cfg.pix_vocab, cfg.pix_dim + 1), per)
    with pytest.raises(ValueError, match="sem_codebook"):
        m.set_codebooks(book, torch.randn(cfg.sem_depth + 1, cfg.sem_vocab, cfg.sem_dim))
    assert not any(p is m.pix_book for p in m.parameters())


def test_bad_visual_inputs_are_named():
    m = tiny_model()
    s = collate_sequences(m.config, [build_sequence(m.config, [[1, 2], ("gen", 3)])])
    pix, sem = random_codes(m.config, 2)
    with pytest.raises(ValueError, match=r"pix_codes: expected \(3, 3\)"):
        m(s["idx"], image_mask=s["image_mask"], pix_codes=pix, sem_codes=sem)
    pix, sem = random_codes(m.config, 3)
    with pytest.raises(ValueError, match="sem_codes: codes must lie"):
        m(s["idx"], image_mask=s["image_mask"], pix_codes=pix, sem_codes=sem + 100)
    with pytest.raises(ValueError, match="image_mask"):
        m(s["idx"], image_mask=s["image_mask"][:, 1:], pix_codes=pix, sem_codes=sem)


def test_depth_heads_only_see_earlier_depths():
    m = tiny_model()
    h = torch.randn(4, m.config.n_embd)
    for head, book in ((m.pix_head, m.pix_book), (m.sem_head, m.sem_book)):
        D, K = book.shape[0], book.shape[1]
        codes = torch.randint(0, K, (4, D))
        cum = mllm.code_vectors(book, codes).cumsum(1)[:, :-1]
        base = head(h, cum)  # (4, D, K)
        for d in range(D):  # change the code at depth d: logits at depths <= d (which predict 0..d) unchanged
            c2 = codes.clone()
            c2[:, d] = (c2[:, d] + 1) % K
            out = head(h, mllm.code_vectors(book, c2).cumsum(1)[:, :-1])
            torch.testing.assert_close(out[:, :d + 1], base[:, :d + 1])
            if d + 1 < D:
                assert not torch.allclose(out[:, d + 1:], base[:, d + 1:])
        for d in range(D):  # sampling path (last_only) equals the training path
            torch.testing.assert_close(head(h, cum[:, :d], last_only=True), base[:, d], atol=1e-5, rtol=1e-5)


def training_batch(m):
    cfg = m.config
    seqs = [build_sequence(cfg, [[65, 66, 67], ("gen", 4), [cfg.eos_id]]),
            build_sequence(cfg, [("und", 3), [70, 71], [cfg.eos_id]])]
    b = collate_sequences(cfg, seqs)
    pix, sem = random_codes(cfg, int(b["image_mask"].sum()))
    return b, pix, sem


def test_text_loss_ignores_image_and_padding_positions():
    m = tiny_model()
    b, pix, sem = training_batch(m)
    t = make_targets(b["idx"], b["image_mask"], b["attention_mask"])
    T = b["idx"].shape[1]
    for r in range(2):
        for i in range(T - 1):
            expect_kept = not b["image_mask"][r, i + 1] and b["attention_mask"][r, i] and b["attention_mask"][r, i + 1]
            assert (t[r, i] != -1) == bool(expect_kept)
            if expect_kept:
                assert t[r, i] == b["idx"][r, i + 1]
    assert (t[:, -1] == -1).all()
    logits, loss = m(b["idx"], t, b["image_mask"], pix, sem, b["attention_mask"], b["gen_mask"])
    keep = t != -1
    torch.testing.assert_close(m.loss_parts["text"], F.cross_entropy(logits[keep], t[keep]))
    # the placeholder ids under image and padding positions never matter
    idx2 = b["idx"].clone()
    idx2[b["image_mask"] | (b["attention_mask"] == 0)] = 3
    _, loss2 = m(idx2, t, b["image_mask"], pix, sem, b["attention_mask"], b["gen_mask"])
    torch.testing.assert_close(loss2, loss)


def test_visual_loss_covers_all_depths_of_both_heads():
    m = tiny_model()
    b, pix, sem = training_batch(m)
    t = make_targets(b["idx"], b["image_mask"], b["attention_mask"])
    _, loss = m(b["idx"], t, b["image_mask"], pix, sem, b["attention_mask"], b["gen_mask"])
    parts = m.loss_parts
    torch.testing.assert_close(loss, parts["text"] + parts["pix"] + parts["sem"])
    loss.backward()
    for head in (m.pix_head, m.sem_head):
        for cls in head.cls:
            assert cls.weight.grad is not None and cls.weight.grad.abs().sum() > 0
    # by hand: only the generation image (row 0) is trained, predicted from the previous position
    with torch.no_grad():
        h = m.trunk(m.embed_inputs(b["idx"], b["image_mask"], pix, sem), b["attention_mask"])
        pos = b["gen_mask"][0].nonzero().squeeze(1)
        hs = h[0, pos - 1]
        rows = torch.arange(len(pos))  # row 0's image comes first in image_mask order
        for head, book, codes, key in ((m.pix_head, m.pix_book, pix, "pix"), (m.sem_head, m.sem_book, sem, "sem")):
            c = codes[rows]
            lg = head(hs, mllm.code_vectors(book, c).cumsum(1)[:, :-1])
            ref = sum(F.cross_entropy(lg[:, d], c[:, d]) for d in range(c.shape[1]))
            torch.testing.assert_close(parts[key], ref)


def test_loss_weights_are_config_keys():
    m = tiny_model(pix_loss_weight=0.0, sem_loss_weight=2.0)
    b, pix, sem = training_batch(m)
    t = make_targets(b["idx"], b["image_mask"], b["attention_mask"])
    _, loss = m(b["idx"], t, b["image_mask"], pix, sem, b["attention_mask"], b["gen_mask"])
    torch.testing.assert_close(loss, m.loss_parts["text"] + 2.0 * m.loss_parts["sem"])


# --- image generation --------------------------------------------------------------------------------

def test_cfg_scale_one_equals_unguided_and_cache_equals_no_cache():
    m = tiny_model()
    caps = [[65, 66, 67], [70]]
    run = lambda **kw: m.generate_image(caps, 5, generator=torch.Generator().manual_seed(3), top_k=20, **kw)
    p1, s1 = run(cfg_scale=1.0)
    p0, s0 = run(cfg_scale=None)
    assert p1.shape == (2, 5, m.config.pix_depth) and s1.shape == (2, 5, m.config.sem_depth)
    assert torch.equal(p1, p0) and torch.equal(s1, s0)
    p3, s3 = run(cfg_scale=3.0)
    p3n, s3n = run(cfg_scale=3.0, use_cache=False)
    assert torch.equal(p3, p3n) and torch.equal(s3, s3n)
    assert not torch.equal(p3, p1)  # guidance changes the samples


def test_cfg_guidance_formula_and_codes_written_to_both_halves():
    m = tiny_model()
    h = torch.randn(4, m.config.n_embd)  # rows [cond0, cond1, uncond0, uncond1]
    seen = []
    orig = mllm.sample_logits
    mllm.sample_logits = lambda lg, *a: seen.append(lg) or orig(lg, *a)
    try:
        codes = m._sample_depths(m.pix_head, m.pix_book, h, 2, 3.0, 0.0, None, None, None)
    finally:
        mllm.sample_logits = orig
    assert torch.equal(codes[:2], codes[2:])
    c = m.pix_head(h[:2], torch.zeros(2, 0, m.config.pix_dim), last_only=True)
    u = m.pix_head(h[2:], torch.zeros(2, 0, m.config.pix_dim), last_only=True)
    torch.testing.assert_close(seen[0], u + 3.0 * (c - u))


def test_sample_logits_top_k_top_p_and_greedy():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).log_softmax(-1)
    assert sample_ids(logits, top_k=1).unique().tolist() == [3]
    assert set(sample_ids(logits, top_k=2).unique().tolist()) == {2, 3}
    p = logits.exp()[0]  # top_p just below the mass of the two largest keeps exactly those two
    assert set(sample_ids(logits, top_p=float(p[3] + p[2]) - 1e-3).unique().tolist()) == {2, 3}
    assert mllm.sample_logits(logits, temperature=0).item() == 3


def sample_ids(logits, **kw):
    g = torch.Generator().manual_seed(0)
    return torch.stack([mllm.sample_logits(logits, generator=g, **kw) for _ in range(200)])


def test_export_load_roundtrip(tmp_path):
    """The one MLLM checkpoint format: MLLM.save_pretrained's folder, read strictly by MLLM.from_pretrained."""
    m = tiny_model()
    m.save_pretrained(str(tmp_path), dict(text_tokenizer="bytes"))
    m2 = MLLM.from_pretrained(str(tmp_path))
    info = m2.export_info
    assert m2.config == m.config and m2.lm_head.weight is m2.embed.weight and info["text_tokenizer"] == "bytes"
    assert torch.equal(m2.pix_book, m.pix_book)
    idx = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(m2(idx)[0], m(idx)[0])


def test_presets_name_released_shapes():
    c = mllm_hf.preset_config("qwen2.5-3b")
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.intermediate_size) == (36, 2048, 16, 2, 11008)
    c = mllm_hf.preset_config("qwen2.5-0.5b")
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.intermediate_size) == (24, 896, 14, 2, 4864)
    with pytest.raises(ValueError, match="unknown preset"):
        mllm_hf.preset_config("gpt-5")


def test_bf16_keeps_rope_frequencies_fp32():
    m = tiny_model()
    idx = torch.randint(0, 256, (1, 16))
    ref, _ = m(idx)
    m = m.to(torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32 and m.embed.weight.dtype == torch.bfloat16
    out, _ = m(idx)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


# --- visual input path switches (not in the paper) ----------------------------------------------------

def test_image_positions_index_each_image_from_zero():
    cfg = tiny_config()
    seqs = [build_sequence(cfg, [[65, 66], ("und", 3), [67], ("gen", 2), [68]]),
            build_sequence(cfg, [("und", 4)])]
    b = collate_sequences(cfg, seqs)  # left-padded
    m = b["image_mask"]
    pos = sequences.image_positions(m)
    assert pos[0][m[0]].tolist() == [0, 1, 2, 0, 1] and pos[1][m[1]].tolist() == [0, 1, 2, 3]


def test_normalised_projector_and_image_position_table():
    """vis_norm: each image input has RMS vis_gain at init, whatever the codebook scale (the unnormalised
    projector's output grows with it); image_pos: the same codes at two positions embed differently, and
    embed_inputs gives each position its index inside its image (what generate_image passes one by one)."""
    m = tiny_model(vis_norm=True, vis_gain=0.1, image_pos=6)
    cfg = m.config
    m.set_codebooks(100 * torch.randn(cfg.pix_vocab, cfg.pix_dim), torch.randn(cfg.sem_vocab, cfg.sem_dim))
    p, s = random_codes(cfg, 5)
    with torch.no_grad():
        y = m.embed_images(p, s, torch.zeros(5, dtype=torch.long)) - m.image_pos[0]
        torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.full((5,), 0.1), rtol=0.03, atol=0)  # eps 1e-6
        a = m.embed_images(p[:1], s[:1], torch.tensor([0]))
        assert not torch.allclose(a, m.embed_images(p[:1], s[:1], torch.tensor([3])))
        ids, img, gen = build_sequence(cfg, [[65], ("gen", 5), [66]])
        x = m.embed_inputs(ids[None], img[None], p, s)[0][img]
        torch.testing.assert_close(x, m.embed_images(p, s, torch.arange(5)))
    with pytest.raises(ValueError, match="image_pos"):
        m.embed_images(p, s)
    with pytest.raises(ValueError, match="outside the table"):
        m.embed_images(p, s, torch.arange(5) + 2)
    # the paper's layout is the default: no extra modules, no extra keys
    plain = tiny_model()
    assert plain.vis_in_norm is None and plain.image_pos is None
    assert not any(k.startswith(("vis_in_norm", "vis_out_norm", "image_pos")) for k in plain.state_dict())
    # generation feeds each sampled position with its index: cache and no cache agree
    run = lambda **kw: m.generate_image([[65, 66]], 5, generator=torch.Generator().manual_seed(3), **kw)
    assert all(torch.equal(a, b) for a, b in zip(run(), run(use_cache=False)))


def test_forward_under_bf16_autocast():
    """Under autocast the projector gives bf16 while the token embeddings are fp32: embed_inputs casts
    before writing the image rows (index_put needs equal dtypes)."""
    m = tiny_model(vis_norm=True, image_pos=4).train()
    cfg = m.config
    ids, img, gen = build_sequence(cfg, [[65, 66], ("und", 4), [67, 68]])
    p, s = random_codes(cfg, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m(ids[None], make_targets(ids[None], img[None]), img[None], p, s)
        out = m.generate_text([[65, 66]], images=(p[None], s[None]), max_new_tokens=3)
    assert torch.isfinite(loss) and len(out) == 1


def test_gen_sem_off_generates_and_trains_pixel_codes_only():
    """gen_sem=False: no semantic depth head, the semantic half of a generated image's input is zero (so its
    semantic codes cannot matter) while an understood image still reads them; generate_image returns
    sem None and cache / no cache agree."""
    m = tiny_model(gen_sem=False, image_pos=4).train()
    cfg = m.config
    assert m.sem_head is None and not any(k.startswith("sem_head") for k in m.state_dict())
    seq = [build_sequence(cfg, [("und", 4), [65, 66]]), build_sequence(cfg, [[67], ("gen", 4), [cfg.eos_id]])]
    b = collate_sequences(cfg, seq)
    p, s = random_codes(cfg, 8)
    s2 = s.clone()
    s2[4:] = (s2[4:] + 1) % cfg.sem_vocab  # other semantic codes on the generated image only
    t = make_targets(b["idx"], b["image_mask"], b["attention_mask"])
    kw = dict(image_mask=b["image_mask"], attention_mask=b["attention_mask"], gen_mask=b["gen_mask"], pix_codes=p)
    with torch.no_grad():
        _, l1 = m(b["idx"], t, sem_codes=s, **kw)
        _, l2 = m(b["idx"], t, sem_codes=s2, **kw)
        s3 = s.clone()
        s3[:4] = (s3[:4] + 1) % cfg.sem_vocab  # ... and on the understood image: that one is read
        _, l3 = m(b["idx"], t, sem_codes=s3, **kw)
    assert torch.equal(l1, l2) and not torch.equal(l1, l3)
    assert float(m.loss_parts["sem"]) == 0.0 and float(m.loss_parts["pix"]) > 0
    m.eval()
    run = lambda **kw: m.generate_image([[65, 66]], 4, generator=torch.Generator().manual_seed(3), **kw)
    (pa, sa), (pb, sb) = run(), run(use_cache=False)
    assert sa is None and sb is None and torch.equal(pa, pb) and pa.shape == (1, 4, cfg.pix_depth)


def test_head_code_logits_score_codes_by_distance():
    """head_code_logits: with the free classifier silenced, a depth head whose code-space prediction IS code
    k's vector ranks code k first and the others by distance (the quantizer's nearest-code rule); the
    paper's layout (the default) has no such parameters."""
    m = tiny_model(head_code_logits=True, gen_sem=False)
    head, book = m.pix_head, m.pix_book
    assert not any("to_code" in k or "log_scale" in k for k in tiny_model().state_dict())
    x = torch.randn(5, head.cls[0].in_features)
    with torch.no_grad():
        for lin in head.cls:
            lin.weight.zero_()
        k = torch.tensor([3, 0, 7, 7, 1])
        target = book[1][k]  # (5, d): depth 2's codes
        # make to_code[1] map x onto the target vectors exactly (least squares on 5 points, width 32 > 5)
        head.to_code[1].weight.copy_(torch.linalg.lstsq(x, target).solution.t())
        logits = head.classify(x, 1, book)
    assert torch.equal(logits.argmax(-1), k)
    d2 = torch.cdist(target, book[1]).pow(2)  # (5, K)
    torch.testing.assert_close(logits - logits.max(-1, keepdim=True).values, -(d2 - d2.min(-1, keepdim=True).values),
                               rtol=1e-4, atol=1e-3)


def test_export_with_the_removed_gen_input_drop_key_loads_only_at_zero(tmp_path):
    """An export's config.json may hold gen_input_drop, a training switch the model no longer has: at 0.0 (it
    changed nothing) the key is dropped and the model loads as saved; any other value is one clear error."""
    from configurator import UserError
    m = tiny_model()
    m.save_pretrained(str(tmp_path))
    path = tmp_path / "config.json"
    conf = json.loads(path.read_text())
    path.write_text(json.dumps(dict(conf, mllm=dict(conf["mllm"], gen_input_drop=0.0))))
    back = MLLM.from_pretrained(str(tmp_path))
    assert back.config == m.config and not hasattr(back.config, "gen_input_drop")
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    path.write_text(json.dumps(dict(conf, mllm=dict(conf["mllm"], gen_input_drop=0.3))))
    with pytest.raises(UserError, match=r"gen_input_drop=0\.3, a switch this code does not have"):
        MLLM.from_pretrained(str(tmp_path))


def test_gen_caption_loss_targets_the_caption_words_of_generated_rows():
    """gen_caption_loss: the multi-hot holds exactly the caption's non-special words for a generation row and
    nothing for an understanding row; the term trains the generated image positions (and the trunk under
    them) and is zero where a batch has no generated image; the default adds no head (paper layout)."""
    assert tiny_model().cap_head is None and not any(k.startswith("cap_head") for k in tiny_model().state_dict())
    m = tiny_model(gen_caption_loss=1.0, image_pos=4).train()
    cfg = m.config
    seq = [build_sequence(cfg, [("und", 4), [65, 66]]), build_sequence(cfg, [[67, 68, 67], ("gen", 4), [cfg.eos_id]])]
    b = collate_sequences(cfg, seq)  # left-padded: row 0 is longer
    words = m.caption_words(b["idx"], b["image_mask"], b["attention_mask"], b["gen_mask"])
    assert words[0].sum() == 0 and words[1].nonzero().flatten().tolist() == [67, 68]
    p, s = random_codes(cfg, 8)
    t = make_targets(b["idx"], b["image_mask"], b["attention_mask"])
    _, loss = m(b["idx"], t, image_mask=b["image_mask"], attention_mask=b["attention_mask"], gen_mask=b["gen_mask"],
                pix_codes=p, sem_codes=s)
    assert float(m.loss_parts["cap"]) > 0
    cap = m._caption_loss(b["idx"], m.trunk(m.embed_inputs(b["idx"], b["image_mask"], p, s, b["gen_mask"]),
                                            b["attention_mask"]), b["image_mask"], b["attention_mask"], b["gen_mask"])
    cap.backward()
    assert m.cap_head.weight.grad.abs().sum() > 0 and m.embed.weight.grad[67].abs().sum() > 0
    und = collate_sequences(cfg, [seq[0]])
    zero = m._caption_loss(und["idx"], torch.zeros(*und["idx"].shape, cfg.n_embd), und["image_mask"],
                           und["attention_mask"], und["gen_mask"])
    assert float(zero.detach()) == 0.0


def test_gen_ground_loss_predicts_each_generated_patchs_object_words():
    """gen_ground_loss: the state that predicts a generated patch's codes (at t-1) is asked for the words of
    that patch's object: the term equals a BCE computed by hand on exactly those states and multi-hots, an
    understood image adds nothing, training without ground_words is an error, and the default adds no head."""
    assert tiny_model().ground_head is None
    m = tiny_model(gen_ground_loss=1.0, image_pos=4).train()
    cfg = m.config
    b = collate_sequences(cfg, [build_sequence(cfg, [("und", 4), [65, 66]]), build_sequence(cfg, [[67, 68], ("gen", 4), [cfg.eos_id]])])
    p, s = random_codes(cfg, 8)
    gw = torch.full((8, 2), -1)
    gw[5] = torch.tensor([70, 71])  # the generated image's 2nd patch shows an object; the rest is background
    gw[0] = torch.tensor([72, -1])  # a row of the understood image: never a target
    t = make_targets(b["idx"], b["image_mask"], b["attention_mask"])
    kw = dict(image_mask=b["image_mask"], attention_mask=b["attention_mask"], gen_mask=b["gen_mask"],
              pix_codes=p, sem_codes=s)
    torch.manual_seed(0)
    _, loss = m(b["idx"], t, ground_words=gw, **kw)
    with pytest.raises(ValueError, match="ground_words"):
        m(b["idx"], t, **kw)
    h = m.trunk(m.embed_inputs(b["idx"], b["image_mask"], p, s, b["gen_mask"]), b["attention_mask"])
    gen = (b["gen_mask"].bool() & b["image_mask"].bool())[1].nonzero().flatten()  # the 4 generated positions
    hs = h[1, gen - 1]  # the states that predict them
    y = torch.zeros(4, cfg.vocab_size)
    y[1, [70, 71]] = 1
    ref = torch.nn.functional.binary_cross_entropy_with_logits(m.ground_head(hs), y)
    torch.testing.assert_close(m.loss_parts["ground"], ref.detach())
    assert loss.item() > float(m.loss_parts["text"] + m.loss_parts["pix"] + m.loss_parts["sem"])


def test_image_code_nll_is_the_pixel_loss_per_position():
    """MLLM.image_code_nll: NaN off the generated positions, and its mean over them is forward's pixel loss
    (each depth's mean CE, summed over depths)."""
    m = tiny_model(gen_sem=False).eval()
    cfg = m.config
    b = collate_sequences(cfg, [build_sequence(cfg, [("und", 4), [65]]),
                                build_sequence(cfg, [[67, 68], ("gen", 5), [cfg.eos_id]])])
    p, s = random_codes(cfg, 9)
    nll = m.image_code_nll(b["idx"], b["image_mask"], p, s, b["attention_mask"], b["gen_mask"])
    gen = b["gen_mask"].bool() & b["image_mask"].bool()
    assert torch.isnan(nll[~gen]).all() and not torch.isnan(nll[gen]).any()  # the first position is not the row's
    with torch.no_grad():
        m(b["idx"], make_targets(b["idx"], b["image_mask"], b["attention_mask"]), image_mask=b["image_mask"],
          attention_mask=b["attention_mask"], gen_mask=b["gen_mask"], pix_codes=p, sem_codes=s)
    torch.testing.assert_close(nll[gen].mean(), m.loss_parts["pix"], rtol=1e-5, atol=1e-5)
