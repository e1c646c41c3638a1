"""siglip.py: parity with transformers' SiglipModel (tiny random weights, fp32), the reference fixture
with omitted config defaults, strict loading, the save/load round trip and the block-level interface
the DualToken tokenizer uses."""
import dataclasses
import json
import os

import pytest
import torch

import siglip
from conftest import FIXTURES

FIXTURE_SIGLIP = os.path.join(FIXTURES, "dualtoken_reference", "siglip")
ATOL = 1e-4


def _hf_model(cfg, vision_only=False):
    """A transformers SigLIP built from our config, with every parameter randomised (HF's init zeroes
    biases and logit scale/bias, which would hide mapping mistakes)."""
    transformers = pytest.importorskip("transformers", reason="parity reference (requirements-dev.txt)")
    d = cfg.to_hf()
    d = {k: v for k, v in d.items() if k not in ("architectures", "model_type")}
    if vision_only:
        m = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**d))
    else:
        m = transformers.SiglipModel(transformers.SiglipConfig(**d))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.eval()


def _roundtrip_through_hf(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    return siglip.SigLIP.from_pretrained(str(tmp_path)).eval()


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(transformers model, ours loaded from its save_pretrained folder), shared by several tests."""
    hf = _hf_model(siglip.tiny_config())
    return hf, _roundtrip_through_hf(hf, tmp_path_factory.mktemp("tiny"))


def _wide_text_config():
    """Text width (96) differs from vision width (64) and has its own projection to 64."""
    cfg = siglip.tiny_config()
    cfg.text = dataclasses.replace(cfg.text, hidden_size=96, intermediate_size=128, num_attention_heads=3)
    return cfg


def _same_width_config():
    cfg = siglip.tiny_config()
    cfg.text = dataclasses.replace(cfg.text, hidden_size=64, projection_size=64)
    return cfg


@pytest.mark.parametrize("make_cfg", [siglip.tiny_config, _wide_text_config, _same_width_config])
def test_parity_with_transformers(make_cfg, tmp_path):
    cfg = make_cfg()
    hf = _hf_model(cfg)
    ours = _roundtrip_through_hf(hf, tmp_path)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    ids = torch.randint(0, cfg.text.vocab_size, (2, cfg.text.max_position_embeddings))
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=x, return_loss=False, output_hidden_states=True)
        out = ours.vision(x, output_hidden_states=True)
        txt = ours.encode_text(ids)
        logits = ours(x, ids)
    rv = ref.vision_model_output
    torch.testing.assert_close(out["last_hidden_state"], rv.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["pooler_output"], rv.pooler_output, atol=ATOL, rtol=0)
    assert len(out["hidden_states"]) == len(rv.hidden_states) == cfg.vision.num_hidden_layers + 1
    for a, b in zip(out["hidden_states"], rv.hidden_states):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(txt, ref.text_model_output.pooler_output, atol=ATOL, rtol=0)
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits, ref.logits_per_image, atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", [48, 44, 24])  # 6x6 grid, 5x5 with 4 px dropped (valid padding), 3x3
def test_position_interpolation_matches_transformers(size, tiny_pair):
    hf, ours = tiny_pair
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=x, interpolate_pos_encoding=True)
        out = ours.vision(x)
    g = size // 8
    assert out["last_hidden_state"].shape == (2, g * g, 64)
    torch.testing.assert_close(out["last_hidden_state"], ref.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["pooler_output"], ref.pooler_output, atol=ATOL, rtol=0)


def test_sigmoid_loss_matches_transformers(tiny_pair):
    cfg = siglip.tiny_config()
    hf, ours = tiny_pair
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    ids = torch.randint(0, cfg.text.vocab_size, (4, 16))
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=x, return_loss=True)
        loss = ours.sigmoid_loss(ours(x, ids))
    torch.testing.assert_close(loss, ref.loss, atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="square"):
        ours.sigmoid_loss(torch.zeros(2, 3))


def test_fixture_with_omitted_defaults_matches_transformers():
    transformers = pytest.importorskip("transformers", reason="parity reference (requirements-dev.txt)")
    with open(os.path.join(FIXTURE_SIGLIP, "config.json")) as f:
        raw = json.load(f)
    assert "vision_use_head" not in raw["vision_config"]  # the default that must be filled in
    ours = siglip.SigLIP.from_pretrained(FIXTURE_SIGLIP).eval()
    assert ours.vision.head is not None and ours.config.vision.layer_norm_eps == 1e-6
    hf = transformers.SiglipModel.from_pretrained(FIXTURE_SIGLIP).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=x)
        out = ours.vision(x)
        logits = ours(x, ids)
    torch.testing.assert_close(out["last_hidden_state"], ref.vision_model_output.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["pooler_output"], ref.vision_model_output.pooler_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.encode_text(ids), ref.text_model_output.pooler_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, ref.logits_per_image, atol=ATOL, rtol=0)


def test_config_defaults_equal_transformers():
    transformers = pytest.importorskip("transformers", reason="parity reference (requirements-dev.txt)")
    cfg = siglip.SigLIPConfig.from_hf({"model_type": "siglip", "text_config": {}, "vision_config": {}})
    hv, ht = transformers.SiglipVisionConfig(), transformers.SiglipTextConfig()
    for f in dataclasses.fields(cfg.vision):
        assert getattr(cfg.vision, f.name) == getattr(hv, f.name), f.name
    for f in dataclasses.fields(cfg.text):
        assert getattr(cfg.text, f.name) == getattr(ht, f.name), f.name
    assert cfg.text.projection_size == cfg.text.hidden_size == 768


def test_config_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="use_rope"):
        siglip.SigLIPConfig.from_hf({"model_type": "siglip", "vision_config": {"use_rope": True}})
    with pytest.raises(ValueError, match="siglip2"):
        siglip.SigLIPConfig.from_hf({"model_type": "siglip2"})
    with pytest.raises(ValueError, match="hidden_act"):
        siglip.SigLIPConfig.from_hf({"model_type": "siglip_vision_model", "hidden_act": "relu"})


def test_strict_loading_names_the_key():
    model = siglip.SigLIP(siglip.tiny_config())
    sd = model.hf_state_dict()
    k = "vision_model.encoder.layers.1.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match=r"missing \[.*" + k.replace(".", r"\.")):
        model.load_hf_state_dict({n: x for n, x in sd.items() if n != k})
    with pytest.raises(ValueError, match=r"unexpected \['vision_model\.extra\.weight'\]"):
        model.load_hf_state_dict(dict(sd, **{"vision_model.extra.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"text_model\.head\.weight: checkpoint \[64, 47\] vs model \[64, 48\]"):
        model.load_hf_state_dict(dict(sd, **{"text_model.head.weight": torch.zeros(64, 47)}))


def test_prefixed_checkpoint_loads_strictly():
    """The authors' DualToken checkpoint stores the fine-tuned SigLIP under `siglip_model.`."""
    path = os.path.join(FIXTURES, "dualtoken_reference", "model.pt")
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = siglip.SigLIP.from_pretrained(FIXTURE_SIGLIP)
    model.load_hf_state_dict(sd, prefix="siglip_model.")
    torch.testing.assert_close(model.hf_state_dict()["vision_model.head.probe"], sd["siglip_model.vision_model.head.probe"])
    wrapped = {"module." + k: v for k, v in sd.items()}  # DDP-saved variant
    model.load_hf_state_dict(wrapped, prefix="siglip_model.")
    del sd["siglip_model.logit_bias"]
    with pytest.raises(ValueError, match="logit_bias"):
        model.load_hf_state_dict(sd, prefix="siglip_model.")


def test_save_load_roundtrip_identical(tmp_path):
    model = siglip.SigLIP(siglip.tiny_config())
    model.save_pretrained(str(tmp_path))
    again = siglip.SigLIP.from_pretrained(str(tmp_path))
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_saved_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="parity reference (requirements-dev.txt)")
    model = siglip.SigLIP(siglip.tiny_config()).eval()
    model.save_pretrained(str(tmp_path))
    hf = transformers.SiglipModel.from_pretrained(str(tmp_path)).eval()
    hf_keys = {k for k in hf.state_dict() if not k.endswith("position_ids")}
    assert hf_keys == set(model.hf_state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), hf.vision_model(pixel_values=x).pooler_output, atol=ATOL, rtol=0)


def test_vision_only_checkpoint(tmp_path):
    cfg = siglip.tiny_config(text=False)
    hf = _hf_model(cfg, vision_only=True)
    hf.save_pretrained(tmp_path)
    ours = siglip.SigLIP.from_pretrained(str(tmp_path)).eval()
    assert ours.text is None and ours.logit_scale is None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), hf(pixel_values=x).pooler_output, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="vision-only"):
        ours.encode_text(torch.zeros(1, 4, dtype=torch.long))
    ours.save_pretrained(str(tmp_path / "ours"))  # our vision-only layout loads back into transformers
    again = type(hf).from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=x).pooler_output, hf(pixel_values=x).pooler_output)
    # a full SiglipModel folder whose safetensors hold no text weights also loads vision-only
    full = siglip.SigLIP(siglip.tiny_config())
    full.save_pretrained(str(tmp_path / "full"))
    from safetensors.torch import load_file, save_file
    p = str(tmp_path / "full" / "model.safetensors")
    save_file({k: v for k, v in load_file(p).items() if k.startswith("vision_model.")}, p)
    assert siglip.SigLIP.from_pretrained(str(tmp_path / "full")).text is None


def test_sharded_checkpoint(tmp_path, tiny_pair):
    hf = tiny_pair[0]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ours = siglip.SigLIP.from_pretrained(str(tmp_path)).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), hf.vision_model(pixel_values=x).pooler_output, atol=ATOL, rtol=0)


def test_block_interface_composes_to_forward():
    """What the tokenizer does: embed, run blocks [0, k), tap, run [k, L), pool == forward."""
    v = siglip.SigLIP(siglip.tiny_config()).vision.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        full = v(x, output_hidden_states=True)
        h = v.embed(x)
        h2 = v.run_blocks(h, 0, 2)
        h4 = v.run_blocks(h2, start=2)
        pooled = v.pool(h4)
    assert isinstance(v.blocks, torch.nn.ModuleList) and isinstance(v.post_ln, torch.nn.LayerNorm)
    torch.testing.assert_close(h, full["hidden_states"][0])
    torch.testing.assert_close(h2, full["hidden_states"][2])
    torch.testing.assert_close(v.post_ln(h4), full["last_hidden_state"])
    torch.testing.assert_close(pooled, full["pooler_output"])
    assert pooled.shape == (2, 64)


def test_bad_inputs_raise():
    model = siglip.SigLIP(siglip.tiny_config())
    with pytest.raises(ValueError, match=r"pixels: expected \(B, 3, H, W\)"):
        model.encode_image(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="T <= 16"):
        model.encode_text(torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        model.encode_text(torch.full((2, 4), 300))


def test_zero_shot():
    torch.manual_seed(0)
    C, D = 10, 16
    classifier = torch.nn.functional.normalize(torch.randn(D, C), dim=0)
    labels = torch.arange(20) % C
    img = classifier.t()[labels] * 3.0  # perfectly aligned, unnormalised
    acc = siglip.zero_shot_accuracy(img, classifier, labels, topk=(1, 5))
    assert acc == {1: 1.0, 5: 1.0}
    wrong = classifier.t()[(labels + 1) % C]
    acc = siglip.zero_shot_accuracy(wrong, classifier, labels, topk=(1,))
    assert acc[1] == 0.0
    # classifier from prompts: a tokenizer stub mapping each text to its own ids
    model = siglip.SigLIP(siglip.tiny_config()).eval()

    def tok(texts, max_len):
        return torch.tensor([[sum(map(ord, t)) % 300] * max_len for t in texts])
    W = siglip.zero_shot_classifier(model, tok, ["cat", "dog", "fish"], ["a {}", "the {}."])
    assert W.shape == (64, 3)
    torch.testing.assert_close(W.norm(dim=0), torch.ones(3))
    with pytest.raises(ValueError, match="topk"):
        siglip.zero_shot_accuracy(img[:, :D], classifier[:, :3], labels % 3, topk=(5,))


def test_save_pretrained_is_atomic(tmp_path, request):
    """A crash while the weights are written leaves the previous export loadable and no temporary file
    (train_siglip.py re-exports into the same folder at every checkpoint)."""
    torch.manual_seed(0)
    m = siglip.SigLIP(siglip.tiny_config())
    m.save_pretrained(str(tmp_path))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    broken = request.getfixturevalue("broken_safetensors")  # from here on every write fails
    with torch.no_grad():
        m.logit_bias.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        m.save_pretrained(str(tmp_path))
    broken.undo()
    loaded = siglip.SigLIP.from_pretrained(str(tmp_path)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in before.items())
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
