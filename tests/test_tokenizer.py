"""tokenizer.py and convert.py: parity with the authors' reference outputs, loading/saving, presets, API contracts."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import FIXTURES
import convert
import tokenizer as T

REF = os.path.join(FIXTURES, "dualtoken_reference")


@pytest.fixture(scope="module")
def outputs():
    return load_file(os.path.join(REF, "outputs.safetensors"))


@pytest.fixture(scope="module")
def ref_model():
    return convert.from_authors(os.path.join(REF, "model.pt"))


def run_all(m, x):
    """Every output the reference stored, computed by our model (eval, fp32)."""
    with torch.no_grad():
        latent_pix, latent_sem, _ = m.encode_latents(x)
        o = m(x)
        return dict(code_pix=o.pix_codes, code_sem=o.sem_codes, latent_pix=latent_pix, latent_sem=latent_sem,
                    zq_pix=o.zq_pix, zq_sem=o.zq_sem, pooler_output=o.pooled,
                    image_features=F.normalize(o.pooled, dim=-1), decoder_input=m.decoder_input(o.zq_pix),
                    images_recon=o.recon, quant_loss_pix=o.commit_pix, quant_loss_sem=o.commit_sem)


def assert_matches_reference(m, outputs):
    got = run_all(m, outputs["input.images"])
    assert len(got) == len([k for k in outputs if k.startswith("output.")])
    for k, v in got.items():
        ref = outputs["output." + k]
        assert v.shape == ref.shape and v.dtype == ref.dtype, (k, v.shape, v.dtype, ref.shape, ref.dtype)
        if k.startswith("code_"):
            assert torch.equal(v, ref), k
        else:
            torch.testing.assert_close(v, ref, atol=1e-4, rtol=0, msg=k)


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors", ""])  # "": the folder
def test_reference_parity(name, outputs):
    m = convert.from_authors(os.path.join(REF, name))
    assert not m.training
    assert_matches_reference(m, outputs)


def test_api_agrees(ref_model, outputs):
    m = ref_model
    x = outputs["input.images"]
    pix, sem = m.encode(x)
    assert torch.equal(pix, outputs["output.code_pix"]) and torch.equal(sem, outputs["output.code_sem"])
    with torch.no_grad():
        torch.testing.assert_close(m.decode(pix), outputs["output.images_recon"], atol=1e-4, rtol=0)
        torch.testing.assert_close(m.encode_image(x), outputs["output.pooler_output"], atol=1e-4, rtol=0)
        zq = m.quantizer_pix.embed(pix).reshape(2, 16, 16)  # sum over depths == the quantized latent
        torch.testing.assert_close(zq, outputs["output.zq_pix"], atol=1e-5, rtol=0)
        per = m.quantizer_sem.embed_per_depth(sem)
        assert per.shape == (2, 4, 4, 3, 16)
        torch.testing.assert_close(per.sum(-2), m.quantizer_sem.embed(sem))


def test_save_load_round_trip_and_convert(ref_model, outputs, tmp_path):
    ref_model.save_pretrained(tmp_path / "ours")
    cfg = json.load(open(tmp_path / "ours" / "config.json"))
    assert cfg["format"] == "nano-dualtoken" and cfg["dualtoken"]["vq_sem"]["ema_update"] == "deferred"
    sd = load_file(tmp_path / "ours" / "model.safetensors")
    assert sd["quantizer_pix.codebook"].shape == (1, 32, 16)  # shared book stored once, padding row dropped
    m = T.DualToken.from_pretrained(str(tmp_path / "ours"))
    assert m.config == ref_model.config
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k
    assert_matches_reference(m, outputs)
    # the converter entry point writes the same thing
    convert.main([os.path.join(REF, "model.pt"), str(tmp_path / "conv")])
    conv = load_file(tmp_path / "conv" / "model.safetensors")
    assert sorted(conv) == sorted(sd) and all(torch.equal(conv[k], sd[k]) for k in sd)
    # one loader takes either checkpoint, the format detected: the release in memory equals its conversion
    direct = T.DualToken.from_pretrained(REF)
    assert direct.config == T.DualToken.from_pretrained(str(tmp_path / "conv")).config == ref_model.config
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in ref_model.state_dict().items())
    assert convert.load_dualtoken(REF).config == ref_model.config
    with pytest.raises(ValueError, match="not the authors'"):  # from_authors takes their release only
        convert.from_authors(str(tmp_path / "conv"))
    with pytest.raises(ValueError, match="a DualToken tokenizer folder is needed"):  # neither format
        T.DualToken.from_pretrained(os.path.join(REF, "siglip"))


def test_save_pretrained_is_atomic(tmp_path, request):
    """A crash while the weights are written (disk full, a killed job) leaves the previous export loadable:
    train_tokenizer.py re-exports into the same folder at every checkpoint."""
    m = T.DualToken(T.tiny_config())
    m.save_pretrained(str(tmp_path))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    broken = request.getfixturevalue("broken_safetensors")  # from here on every write fails
    with torch.no_grad():
        m.decoder.conv_out.bias.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        m.save_pretrained(str(tmp_path))
    broken.undo()
    loaded = T.DualToken.from_pretrained(str(tmp_path)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in before.items())
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temporary file left


def _authors_copy(tmp_path, edit):
    """Authors' layout checkpoint with an edited state_dict in tmp_path/ckpt (SigLIP config from the fixture)."""
    ck = torch.load(os.path.join(REF, "model.pt"), map_location="cpu", weights_only=True)
    edit(ck["state_dict"])
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(os.path.join(REF, "config.json"), d / "config.json")
    torch.save(ck, d / "model.pt")
    return str(d / "model.pt")


@pytest.mark.parametrize("edit, needle", [
    (lambda sd: sd.pop("decoder.conv_out.bias"), "decoder.conv_out.bias"),
    (lambda sd: sd.pop("siglip_model.vision_model.post_layernorm.weight"), "post_layernorm.weight"),
    (lambda sd: sd.update({"decoder.extra.weight": torch.zeros(1)}), "decoder.extra.weight"),
    (lambda sd: sd.update({"prequant_pix.proj.bias": torch.zeros(17)}), "prequant_pix.proj.bias"),
    (lambda sd: sd.update({"quantizer_sem.codebooks.2.weight": torch.zeros(33, 16)}), "quantizer_sem.codebooks.2.weight"),
    (lambda sd: sd.update({"quantizer_pix.codebooks.1.weight": torch.zeros(32, 16)}), "quantizer_pix.codebooks.1.weight"),
])
def test_strict_loading_names_the_key(tmp_path, edit, needle):
    path = _authors_copy(tmp_path, edit)
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        convert.from_authors(path, siglip_config=os.path.join(REF, "siglip"))


def test_authors_config_errors(tmp_path):
    raw = json.load(open(os.path.join(REF, "config.json")))
    sig = T.SigLIPConfig.from_hf(json.load(open(os.path.join(REF, "siglip", "config.json"))))
    a, tiny = convert.config_from_authors(raw, sig), T.tiny_config()
    assert a.siglip.vision == tiny.siglip.vision  # the tiny preset IS the fixture's shape
    tiny.siglip = a.siglip
    assert a == tiny and convert.config_from_authors(raw["rqvaesiglip"], sig) == a  # wrapper optional
    bad = json.loads(json.dumps(raw))
    bad["rqvaesiglip"]["vq_pix"]["n_embeds"] = 3
    with pytest.raises(ValueError, match="n_embeds"):
        convert.config_from_authors(bad, sig)
    bad = json.loads(json.dumps(raw))
    bad["rqvaesiglip"]["vq_sem"]["code_shape"] = [5, 5, 3]
    with pytest.raises(ValueError, match="code_shape"):
        convert.config_from_authors(bad, sig)
    d = tmp_path / "nosig"
    d.mkdir()
    shutil.copy(os.path.join(REF, "config.json"), d / "config.json")
    shutil.copy(os.path.join(REF, "model.pt"), d / "model.pt")
    with pytest.raises(ValueError, match="siglip_config"):  # relative "siglip" folder is not there
        convert.from_authors(str(d))


def test_wrong_image_size(ref_model):
    with pytest.raises(ValueError, match=r"images: expected \(B, 3, 32, 32\)"):
        ref_model.encode(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="images"):
        ref_model(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="pix_codes"):
        ref_model.decode(torch.zeros(1, 4, 4, 2, dtype=torch.long))


def test_postquant_is_causal(ref_model):
    x = torch.randn(1, 16, 16)
    y = x.clone()
    y[:, 9:] = torch.randn(1, 7, 16)
    with torch.no_grad():
        a, b = ref_model.postquant_sem(x), ref_model.postquant_sem(y)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    with torch.no_grad():  # pre-quant attention is bidirectional
        x = torch.randn(1, 16, 64)
        y = x.clone()
        y[:, 15] = torch.randn(1, 64)
        assert not torch.allclose(ref_model.prequant_sem(x)[:, 0], ref_model.prequant_sem(y)[:, 0])


def test_train_step_gradients():
    m = T.DualToken(T.tiny_config()).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    cb = m.quantizer_pix.codebook.clone()
    o = m(x)
    assert o.recon.shape == (2, 3, 32, 32) and o.pooled.shape == (2, 64) and o.h_sem.shape == (2, 16, 64)
    assert o.pix_codes.shape == o.sem_codes.shape == (2, 4, 4, 3) and o.pix_codes.dtype == torch.int64
    assert set(o.stats) == {"pix", "sem"} and o.stats["pix"]["usage"].shape == (3,)
    assert not torch.equal(cb, m.quantizer_pix.codebook)  # EMA moved in training mode
    loss = o.recon.pow(2).mean() + o.pooled.pow(2).mean() + o.commit_pix + o.commit_sem
    loss.backward()
    for name in ("prequant_pix.proj.weight", "prequant_shortcut.attn.qkv.weight", "prequant_sem.mlp.w0.weight",
                 "postquant_pix.attn.q_bias", "postquant_sem.norm2.weight", "decoder.conv_out.weight",
                 "siglip.vision.blocks.0.attn.qkv.weight", "siglip.vision.blocks.5.attn.qkv.weight"):
        g = m.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name
    cb = m.quantizer_sem.codebook.clone()
    m.encode(x), m.encode_image(x)
    assert torch.equal(cb, m.quantizer_sem.codebook)  # encoding never moves the books, even in train mode
    assert m.quantizer_sem.training


def test_encode_is_fp32_under_autocast():
    """The MLLM's codes come from DualToken.encode in one precision, fp32, whatever autocast the caller runs
    under: the code cache (built in fp32) and eval.py / sample.py (bf16 autocast on cuda) must give the model
    the same deep residual codes. CPU bf16 autocast stands in for cuda's."""
    import codec
    torch.manual_seed(0)
    m = T.DualToken(T.tiny_config()).eval()
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    pix, sem = m.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pix_a, sem_a = m.encode(x)
        flat = codec.image_codes(m, x)  # what eval.py and sample.py read
    assert torch.equal(pix_a, pix) and torch.equal(sem_a, sem)
    assert torch.equal(flat[0], pix.flatten(1, 2)) and torch.equal(flat[1], sem.flatten(1, 2))


def test_no_shortcut_config():
    cfg = T.tiny_config()
    cfg.layer_shortcut = None
    m = T.DualToken(cfg).eval()
    assert m.prequant_shortcut is None and not any(k.startswith("prequant_shortcut") for k in m.state_dict())
    assert m.encode(torch.zeros(1, 3, 32, 32))[0].shape == (1, 4, 4, 3)


def test_from_siglip():
    m, teacher = T.DualToken.from_siglip(os.path.join(REF, "siglip"), layer_recon=2, layer_shortcut=1, layer_sem=5,
                                         vq_pix=T.QuantizerConfig(codebook_size=32, code_dim=16, depth=2),
                                         decoder=T.DecoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                                                 attn_resolutions=(), latent_channels=32,
                                                                 resolution=32),
                                         decoder_latent_shape=(16, 16))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t_sem, t_pool = T.teacher_features(teacher, x, 5)
    o = m.eval()(x)
    torch.testing.assert_close(t_sem, o.h_sem)  # same weights: block-5 features agree before training
    torch.testing.assert_close(t_pool, teacher.encode_image(x))
    assert not any("teacher" in k for k in m.state_dict())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, m.siglip.state_dict()[k]), k
    assert m.config.vq_sem.code_dim == 32 and m.config.layer_sem == 5
    pix, sem = m.eval().encode(torch.zeros(1, 3, 32, 32))
    assert pix.shape == (1, 4, 4, 2) and sem.shape == (1, 4, 4, 8)
    assert m.decode(pix).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("name, grid, depth, res, lat", [("384", 27, 8, 384, 24), ("256", 16, 4, 256, 16)])
def test_released_presets_on_meta(name, grid, depth, res, lat):
    with torch.device("meta"):
        m = T.DualToken(convert.released_config(name))
    assert all(t.is_meta for t in m.state_dict().values())  # nothing allocated
    n = sum(p.numel() for p in m.parameters())
    new = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("siglip."))  # beyond SigLIP
    assert 1.30e9 < n < 1.40e9, n  # the release: ~1.35 B with both towers
    assert 200e6 < new < 220e6, new  # the release: ~211 M new modules
    assert m.quantizer_pix.codebook.shape == m.quantizer_sem.codebook.shape == (1, 16384, 32)
    x = torch.empty(2, 3, res, res, device="meta")
    latent_pix, latent_sem, h_sem = m.encode_latents(x)
    assert latent_pix.shape == latent_sem.shape == (2, grid, grid, 32) and h_sem.shape == (2, grid * grid, 1152)
    z = m.decoder_input(torch.empty(2, grid * grid, 32, device="meta"))
    assert z.shape == (2, 1024, lat, lat)
    assert m.decoder(z).shape == (2, 3, res, res)
    assert m.config.vq_pix.depth == m.config.vq_sem.depth == depth and m.config.grid == grid


def test_deduplicated_safetensors_without_aliases(tmp_path, outputs):
    """Any de-duplicated form of the shared book loads: here only codebooks.0, no alias metadata."""
    from safetensors.torch import save_file
    sd = load_file(os.path.join(REF, "model.safetensors"))
    assert not any(".codebooks.1." in k for k in sd)
    d = tmp_path / "dedup"
    d.mkdir()
    shutil.copy(os.path.join(REF, "config.json"), d / "config.json")
    save_file(sd, d / "model.safetensors")
    m = convert.from_authors(str(d), siglip_config=os.path.join(REF, "siglip"))
    assert torch.equal(m.encode(outputs["input.images"])[1], outputs["output.code_sem"])


def test_authors_layout_unshared_vision_only(tmp_path):
    """Write a model in the authors' layout (one codebook per depth, no text tower) and load it back."""
    cfg = T.tiny_config()
    cfg.siglip.text = None
    cfg.vq_sem.shared_codebook = False
    m = T.DualToken(cfg).eval()
    sd = {"siglip_model." + k: v for k, v in m.siglip.hf_state_dict().items()}
    sd.update({k: v for k, v in m.state_dict().items() if not k.startswith(("siglip.", "quantizer_"))})
    for n in ("prequant_pix", "prequant_shortcut", "prequant_sem", "postquant_pix", "postquant_sem"):
        sd[n + ".attn.zero_k_bias"] = torch.zeros_like(sd[n + ".attn.q_bias"])
    for q in ("quantizer_pix", "quantizer_sem"):
        r = getattr(m, q)
        for d in range(3):
            b = r.book_of(d)
            sd[f"{q}.codebooks.{d}.weight"] = torch.cat([r.codebook[b], torch.zeros(1, 16)])
            sd[f"{q}.codebooks.{d}.cluster_size_ema"] = r.cluster_size_ema[b]
            sd[f"{q}.codebooks.{d}.embed_ema"] = r.embed_ema[b]
    torch.save({"state_dict": {k: v.clone() for k, v in sd.items()}}, tmp_path / "model.pt")
    raw = json.load(open(os.path.join(REF, "config.json")))
    raw["rqvaesiglip"]["vq_sem"]["shared_codebook"] = False
    json.dump(raw, open(tmp_path / "config.json", "w"))
    m2 = convert.from_authors(str(tmp_path), siglip_config=os.path.join(REF, "siglip"))
    assert m2.siglip.text is None and m2.quantizer_sem.codebook.shape == (3, 32, 16)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_patch_skip_paints_each_cell_into_its_own_patch(tmp_path):
    """patch_skip (not in the release) adds a pixel-shuffled per-cell MLP of the latent: with the conv stack's
    output zeroed, a change to one latent cell changes exactly that cell's f x f patch. The key saves and
    loads with config.json; the released layout (patch_skip 0) has no such weight."""
    cfg = T.tiny_config()
    assert not cfg.decoder.patch_skip and T.DualToken(cfg).decoder.patch_skip is None
    dcfg = T.DecoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=0, attn_resolutions=(), latent_channels=16,
                           resolution=32, patch_skip=24)
    dec = T.Decoder(dcfg).eval()
    assert dec.f == 4 and dec.patch_skip[2].out_channels == 3 * 16
    torch.nn.init.zeros_(dec.conv_out.weight)
    torch.nn.init.zeros_(dec.conv_out.bias)
    z = torch.randn(1, 16, 8, 8)
    z2 = z.clone()
    z2[0, :, 2, 5] += 1.0
    with torch.no_grad():
        d = (dec(z2) - dec(z)).abs().sum(1)[0]  # (32, 32)
    changed = d > 0
    assert changed[8:12, 20:24].all() and changed.sum() == 16
    cfg.decoder.patch_skip = 8
    m = T.DualToken(cfg).eval()
    m.save_pretrained(str(tmp_path))
    m2 = T.DualToken.from_pretrained(str(tmp_path))
    assert m2.config.decoder.patch_skip == 8 and "decoder.patch_skip.2.weight" in m2.state_dict()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(m2(x).recon, m(x).recon)


def test_patch_local_pixel_branch(tmp_path):
    """layer_recon=0 with pix_attn=False (not in the release): the pixel latent of a position depends on its
    own patch only, so one changed patch changes exactly one position; the released layout (attention in
    the pre-quant projection, a deeper block) spreads the same change to every position. The switch
    round-trips through config.json and the per-token projections carry no attention weights."""
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    x2 = x.clone()
    x2[0, :, 8:16, 16:24] = -x2[0, :, 8:16, 16:24]  # patch (row 1, column 2) of the 4x4 grid
    for local in (True, False):
        cfg = T.tiny_config()
        if local:
            cfg.layer_recon, cfg.layer_shortcut, cfg.pix_attn = 0, None, False
        m = T.DualToken(cfg).eval()
        with torch.no_grad():
            d = (m.encode_latents(x2)[0] - m.encode_latents(x)[0]).abs().sum(-1)[0]  # (4, 4)
        if local:
            assert d[1, 2] > 0 and (d > 0).sum() == 1
        else:
            assert (d > 0).all()
    assert m.prequant_pix.attn is not None
    cfg = T.tiny_config()
    cfg.layer_recon, cfg.layer_shortcut, cfg.pix_attn = 0, None, False
    m = T.DualToken(cfg).eval()
    assert m.prequant_pix.attn is None and m.postquant_pix.attn is None
    assert not any(k.startswith(("prequant_pix.attn", "postquant_pix.attn")) for k in m.state_dict())
    m.save_pretrained(str(tmp_path))
    m2 = T.DualToken.from_pretrained(str(tmp_path))
    assert m2.config.pix_attn is False and m2.config.layer_recon == 0
    with torch.no_grad():
        assert torch.equal(m2.encode(x)[0], m.encode(x)[0])
