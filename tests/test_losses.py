import math

import pytest
import torch
import torch.nn.functional as F

from losses import (LPIPS, Discriminator, LossConfig, TokenizerLoss, adaptive_weight, g_loss,
                    hinge_d_loss, lpips_or_none, mse_cos)

TINY = (4, 8, 8, 16, 16)  # tiny VGG widths: same layer list and taps as VGG16, milliseconds on CPU


def img(*shape):
    return torch.rand(*shape) * 2 - 1


# --- semantic distillation ---

def test_mse_cos_matches_hand_computation():
    p, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    cos = (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1))  # (2, 5)
    want = ((p - t) ** 2).mean() - cos.mean()
    torch.testing.assert_close(mse_cos(p, t), want)
    torch.testing.assert_close(mse_cos(t, t), torch.tensor(-1.0))
    with pytest.raises(ValueError, match=r"pred \(2, 5, 7\).*target \(2, 5, 6\)"):
        mse_cos(p, t[..., :6])


# --- LPIPS ---

def test_lpips_properties():
    m = LPIPS(TINY)
    x, y = img(2, 3, 32, 32), img(2, 3, 32, 32)
    assert m(x, x).item() == 0.0
    d = m(x, y, reduction="none")
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(m(y, x, reduction="none"), d)
    torch.testing.assert_close(m(x, y), d.mean())
    xg = x.clone().requires_grad_(True)
    m(xg, y).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_lpips_is_frozen_and_checks_input():
    m = LPIPS(TINY)
    m.train()
    assert not m.training and all(not p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match=r"x \(2, 3, 32, 32\) and y \(2, 3, 16, 16\)"):
        m(img(2, 3, 32, 32), img(2, 3, 16, 16))


def test_lpips_one_layer_by_hand():
    """Zero heads 1..4 so LPIPS is the relu1_2 term alone, then recompute that term from scratch."""
    m = LPIPS(TINY)
    with torch.no_grad():
        for k in range(1, 5):
            m.lin[k].weight.zero_()
        m.lin[0].weight.copy_(torch.rand(1, TINY[0], 1, 1))
    x, y = img(2, 3, 16, 16), img(2, 3, 16, 16)
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    c1, c2 = m.features[0], m.features[2]

    def relu1_2(z):
        z = (z - shift) / scale
        z = F.relu(F.conv2d(z, c1.weight, c1.bias, padding=1))
        return F.relu(F.conv2d(z, c2.weight, c2.bias, padding=1))  # (B, C, H, W)

    fx, fy = relu1_2(x), relu1_2(y)
    nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    w = m.lin[0].weight.view(1, -1, 1, 1)
    want = ((nx - ny) ** 2 * w).sum(1).mean(dim=(1, 2))  # (B,)
    torch.testing.assert_close(m(x, y, reduction="none"), want)


def _tiny_files(tmp_path, m, vgg_extra=None, lin_drop=None):
    vgg = {k: v for k, v in m.state_dict().items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(3, 3)  # the FC head: ignored by name, any shape
    vgg.update(vgg_extra or {})
    lin = {f"lin{k}.model.1.weight": m.lin[k].weight.detach().clone() for k in range(5)}
    if lin_drop:
        del lin[lin_drop]
    torch.save(vgg, tmp_path / "vgg.pth")
    torch.save(lin, tmp_path / "lin.pth")
    return str(tmp_path / "vgg.pth"), str(tmp_path / "lin.pth")


def test_lpips_from_files_round_trip(tmp_path):
    src = LPIPS(TINY)
    with torch.no_grad():
        for lin in src.lin:
            lin.weight.uniform_(0, 1)
    vgg_path, lin_path = _tiny_files(tmp_path, src)
    m = LPIPS.from_files(vgg_path, lin_path, chns=TINY)
    x, y = img(2, 3, 32, 32), img(2, 3, 32, 32)
    torch.testing.assert_close(m(x, y), src(x, y))
    assert all(not p.requires_grad for p in m.parameters()) and not m.training


def test_lpips_strict_load_errors(tmp_path):
    src = LPIPS(TINY)
    vgg_path, lin_path = _tiny_files(tmp_path, src, vgg_extra={"features.30.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"vgg\.pth.*unexpected keys \['features\.30\.weight'\]"):
        LPIPS.from_files(vgg_path, lin_path, chns=TINY)
    vgg_path, lin_path = _tiny_files(tmp_path, src, lin_drop="lin3.model.1.weight")
    with pytest.raises(ValueError, match=r"lin\.pth.*missing keys \['lin3\.model\.1\.weight'\]"):
        LPIPS.from_files(vgg_path, lin_path, chns=TINY)
    # a full-size model reading the tiny files: every mismatched shape is listed
    vgg_path, lin_path = _tiny_files(tmp_path, src)
    with pytest.raises(ValueError, match=r"shape mismatches \['features\.0\.weight: file \(4, 3, 3, 3\) vs "
                                         r"model \(64, 3, 3, 3\)'"):
        LPIPS.from_files(vgg_path, lin_path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        LPIPS.from_files(str(tmp_path / "nope.pth"), lin_path)


def test_lpips_or_none(tmp_path):
    m, msg = lpips_or_none(None, None)
    assert m is None and "LPIPS off" in msg
    with pytest.raises(ValueError, match="both files"):
        lpips_or_none(str(tmp_path / "vgg.pth"), None)


def test_vgg_layers_match_torchvision():
    """Our full-size layer list takes torchvision's vgg16 state dict (classifier included, ignored) and
    taps the same activations as torchvision's own `features` at relu1_2 ... relu5_3."""
    tv = pytest.importorskip("torchvision", reason="torchvision builds the reference VGG16")
    with torch.device("meta"):  # skip initialising the 120M-parameter classifier nobody runs here
        ref = tv.models.vgg16(weights=None).eval()
    ref.features.to_empty(device="cpu")
    for p in ref.features.parameters():
        torch.nn.init.normal_(p, 0.0, 0.05)
    m = LPIPS()
    m.load_vgg(ref.state_dict())
    x = torch.randn(1, 3, 32, 32)
    h, ours = x, []
    for i, layer in enumerate(m.features):
        h = layer(h)
        if i in m.taps:
            ours.append(h)
    with torch.no_grad():
        for k, i in enumerate([3, 8, 15, 22, 29]):
            torch.testing.assert_close(ours[k], ref.features[:i + 1](x))


# --- discriminator and GAN losses ---

def test_discriminator_shapes_and_init():
    d = Discriminator(width=8)
    assert d(img(2, 3, 32, 32)).shape == (2, 1, 4, 4)
    full = Discriminator()
    assert full(img(1, 3, 64, 64)).shape == (1, 1, 8, 8)
    w = torch.cat([m.weight.flatten() for m in full.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in full.modules()) == 3


def test_hinge_and_g_loss_by_hand():
    lr, lf = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0])
    # leaky_relu(1 - lr) = [-0.01, 0.5, 2.0]; leaky_relu(1 + lf) = [-0.02, 1.0]
    want = 0.5 * ((-0.01 + 0.5 + 2.0) / 3 + (-0.02 + 1.0) / 2)
    assert math.isclose(hinge_d_loss(lr, lf).item(), want, rel_tol=1e-6)
    assert math.isclose(hinge_d_loss(lr, lf, slope=0.0).item(), 0.5 * (2.5 / 3 + 0.5), rel_tol=1e-6)
    assert g_loss(lf).item() == 1.5


def test_discriminator_learns_toy_split():
    torch.manual_seed(0)
    d = Discriminator(width=8)
    crit = TokenizerLoss()
    opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.5, 0.9))
    real = (torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(4, 3, 16, 16)).contiguous()  # smooth ramps
    fake = img(4, 3, 16, 16)  # noise
    losses = []
    for _ in range(10):
        loss, terms = crit.d_loss(d, real, fake)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(terms["d_loss"])
    assert losses[-1] < 0.5 * losses[0], losses
    _, terms = crit.d_loss(d, real, fake)
    assert terms["logits_real"] > terms["logits_fake"]


# --- adaptive weight ---

def test_adaptive_weight_by_hand():
    W = torch.randn(2, 3, requires_grad=True)
    x, tgt, c = torch.randn(3), torch.randn(2), torch.randn(2, 3)
    rec = ((W @ x - tgt) ** 2).sum()
    g = (W * c).sum()
    grad_rec = 2 * torch.outer(W.detach() @ x - tgt, x)  # d rec / dW
    want = (grad_rec.norm() / (c.norm() + 1e-4)).clamp(0.3, 10.0)
    w = adaptive_weight(rec, g, W)
    torch.testing.assert_close(w, want)
    assert not w.requires_grad
    assert adaptive_weight(rec, 1e6 * g, W).item() == pytest.approx(0.3)  # clamped low
    assert adaptive_weight(rec, 1e-6 * g, W).item() == pytest.approx(10.0)  # clamped high
    rec.backward()  # the graph survives (retain_graph=True)


# --- the whole objective ---

class ToyDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.conv_in(z)))


def _batch():
    dec = ToyDecoder()
    z = torch.randn(2, 4, 16, 16)
    x = img(2, 3, 16, 16)
    zq = torch.randn(2, 5, 8, requires_grad=True)
    args = dict(x=x, x_hat=dec(z), zq_sem=zq, t_sem=torch.randn(2, 5, 8), pooled=zq.mean(1),
                t_pool=torch.randn(2, 8), commit_pix=torch.tensor(0.3), commit_sem=torch.tensor(0.2))
    return dec, args


def test_default_weights_are_the_released():
    """5 x layer-26 tokens + 1 x pooled (the semantic distillation), 5 commitment, 5 MSE, 1 LPIPS, 0.75 GAN."""
    c = LossConfig()
    assert (c.w_sem_tok, c.w_sem_pool, c.w_commit, c.w_rec, c.w_lpips, c.w_gan, c.w_edge) == (5, 1, 5, 5, 1, 0.75, 0)


def test_tokenizer_loss_total_is_weighted_sum():
    dec, a = _batch()
    cfg = LossConfig(w_sem_tok=2.0, w_sem_pool=3.0, w_commit=4.0, w_rec=6.0, w_lpips=0.5, w_gan=0.25)
    crit = TokenizerLoss(cfg, lpips=LPIPS(TINY))
    total, t = crit(**a)
    assert set(t) == {"sem_tok", "sem_pool", "commit_pix", "commit_sem", "rec_mse", "lpips", "total"}
    assert all(isinstance(v, float) for v in t.values())
    want = 2 * t["sem_tok"] + 3 * t["sem_pool"] + 4 * (0.3 + 0.2) + 6 * t["rec_mse"] + 0.5 * t["lpips"]
    assert t["total"] == pytest.approx(want, rel=1e-5) and total.item() == pytest.approx(want, rel=1e-5)
    assert t["lpips"] > 0

    # GAN on: adaptive weight balances MSE + w_lpips * LPIPS (not x w_rec) against G at conv_out.weight
    d = Discriminator(width=8)
    total, t = crit(**a, disc=d, last_layer=dec.conv_out.weight)
    assert {"g", "adaptive_w"} <= set(t)
    rec = F.mse_loss(a["x_hat"], a["x"]) + 0.5 * crit.lpips(a["x_hat"], a["x"])
    w = adaptive_weight(rec, g_loss(d(a["x_hat"])), dec.conv_out.weight)
    assert t["adaptive_w"] == pytest.approx(w.item(), rel=1e-5)
    assert t["total"] == pytest.approx(want + 0.25 * t["adaptive_w"] * t["g"], rel=1e-5)
    total.backward()
    assert dec.conv_out.weight.grad.abs().sum() > 0 and a["zq_sem"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="last_layer"):
        crit(**a, disc=d)
    with torch.no_grad(), pytest.raises(ValueError, match="needs autograd"):
        crit(**a, disc=d, last_layer=dec.conv_out.weight)


def test_tokenizer_loss_absent_terms():
    """Recon-only ablation runs pass None: the semantic / commit_sem terms are neither computed nor logged."""
    _, a = _batch()
    a.update(zq_sem=None, t_sem=None, pooled=None, t_pool=None, commit_sem=None)
    total, t = TokenizerLoss(LossConfig(w_commit=4.0, w_rec=6.0))(**a)
    assert set(t) == {"commit_pix", "rec_mse", "total"}
    assert t["total"] == pytest.approx(4 * 0.3 + 6 * t["rec_mse"], rel=1e-5)


def test_tokenizer_loss_without_lpips_defaults():
    _, a = _batch()
    total, t = TokenizerLoss()(**a)
    assert "lpips" not in t and "g" not in t
    want = 5 * t["sem_tok"] + t["sem_pool"] + 5 * 0.5 + 5 * t["rec_mse"]
    assert total.item() == pytest.approx(want, rel=1e-5)



def test_edge_loss_by_hand_and_in_the_objective():
    """edge_loss (not in the release): L1 of horizontal + vertical pixel differences. A flat shift of the
    whole image costs nothing (its edges are unchanged), a vertical edge of height 1 added to a flat 2x2
    image costs 1 (both rows' horizontal differences) + 0; w_edge adds it to the total, and it is absent
    (not logged) at the default 0."""
    from losses import edge_loss
    x = img(2, 3, 8, 8)
    assert edge_loss(x + 0.5, x).item() == pytest.approx(0.0, abs=1e-6)
    a, b = torch.zeros(1, 1, 2, 2), torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    assert edge_loss(b, a).item() == pytest.approx(1.0)  # dx differences (1, 1) -> mean 1; dy (0, 0) -> 0
    _, kw = _batch()
    _, t0 = TokenizerLoss()(**kw)
    total, t = TokenizerLoss(LossConfig(w_edge=2.0))(**kw)
    assert "edge" not in t0 and t["edge"] == pytest.approx(edge_loss(kw["x_hat"], kw["x"]).item(), rel=1e-5)
    assert total.item() == pytest.approx(t0["total"] + 2.0 * t["edge"], rel=1e-5)
