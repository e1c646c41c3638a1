"""
The DualToken tokenizer objective (design §3), one piece per block:

  L = w_sem_tok * mse_cos(zq_sem, T26) + w_sem_pool * mse_cos(pooled, T_pool)      semantic distillation
    + w_commit * (commit_pix + commit_sem)                                        RVQ commitment
    + w_rec * MSE(x_hat, x) + w_lpips * LPIPS(x_hat, x)                           reconstruction
    + w_gan * w * G,  G = -mean(D(x_hat)),  w = adaptive weight                   once the GAN is on

defaults 5 / 1 / 5 / 5 / 1 / 0.75 as in the released trainer, which distils the features after block 26
(zq_sem replaces that block's output) and the pooled embedding, not the last layer the paper names. The discriminator is trained separately
with `TokenizerLoss.d_loss` and its own optimizer. LPIPS weights never download: the user names two local
files (torchvision's `vgg16-397923af.pth` and the `lpips` package's `weights/v0.1/vgg.pth`); without them
the trainer runs with LPIPS off (`lpips_or_none`).
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import UserError

# -----------------------------------------------------------------------------
# semantic distillation


def mse_cos(pred, target):
    """MSE(pred, target) - mean over tokens of the cosine over channels (last dim). Works for
    (B, N, C) token features and (B, C) pooled embeddings alike."""
    if pred.shape != target.shape:
        raise ValueError(f"mse_cos: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return F.mse_loss(pred, target) - F.cosine_similarity(pred, target, dim=-1).mean()


def edge_loss(x_hat, x):
    """Mean L1 between the horizontal and vertical pixel differences of x_hat and x (B, C, H, W). Why:
    MSE is content with a blurred edge (half the error of a shifted one); small flat shapes are read by
    their edges, and this term needs no downloaded network, unlike LPIPS."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]
    return (dx(x_hat) - dx(x)).abs().mean() + (dy(x_hat) - dy(x)).abs().mean()


# -----------------------------------------------------------------------------
# LPIPS (VGG16, v0.1 linear heads)

VGG16_CHANNELS = (64, 128, 256, 512, 512)
VGG16_CONVS = (2, 2, 3, 3, 3)  # convs per stage; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018, v0.1) on torchvision's VGG16 `features`.

    The layer list reproduces torchvision's indices (`features.0` ... `features.29`, the last max-pool
    is never needed) so its state dict loads by name. `chns` exists for tiny test models; real weights
    need the default. Inputs are in [-1, 1]."""

    def __init__(self, chns=VGG16_CHANNELS):
        super().__init__()
        layers, taps, c_in = [], [], 3
        for stage, (c, n) in enumerate(zip(chns, VGG16_CONVS)):
            if stage > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
                c_in = c
            taps.append(len(layers) - 1)  # index of the stage's last ReLU: 3, 8, 15, 22, 29 for VGG16
        self.features = nn.Sequential(*layers)
        self.taps = taps
        self.chns = tuple(chns)
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chns)
        for lin in self.lin:  # the released heads are >= 0 (clamped in LPIPS training): keep random ones so
            nn.init.uniform_(lin.weight, 0.0, 1.0)  # an unloaded model is still a distance (tests, tiny runs)
        # LPIPS's ScalingLayer: maps [-1, 1] onto ImageNet-normalised input, (x - shift) / scale
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # frozen for good: a trainer calling .train() on a parent must not flip it (no dropout here, but
        # the reference's heads carry one, and a future layer with state must stay in eval)
        return super().train(False)

    def forward(self, x, y, reduction="mean"):
        """x, y (B, 3, H, W) in [-1, 1] -> scalar (reduction "mean") or (B,) ("none")."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS: expected two (B, 3, H, W) images of one shape, got x {tuple(x.shape)}"
                             f" and y {tuple(y.shape)}")
        B = x.shape[0]
        h = (torch.cat([x, y]) - self.shift) / self.scale  # (2B, 3, H, W), one VGG pass for both
        d = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                k = self.taps.index(i)
                # unit-normalise over channels; LPIPS uses sqrt(sum x^2) + 1e-10, whose backward is nan
                # where a whole feature vector is zero (dead ReLUs); vector_norm's backward gives 0 there
                n = h / (torch.linalg.vector_norm(h, dim=1, keepdim=True) + 1e-10)
                diff = (n[:B] - n[B:]) ** 2  # (B, C_k, h, w)
                d = d + self.lin[k](diff).mean(dim=(1, 2, 3))  # (B,)
        if reduction == "none":
            return d
        if reduction == "mean":
            return d.mean()
        raise ValueError(f"LPIPS: reduction must be 'mean' or 'none', got {reduction!r}")

    # --- strict loading from the two published files ---

    def load_vgg(self, sd, name="vgg state dict"):
        """torchvision vgg16 state dict -> self.features. `classifier.*` (the FC head LPIPS never runs)
        is the one documented ignore; everything else must match by name and shape."""
        sd = {k: v for k, v in _strip(sd).items() if not k.startswith("classifier.")}
        table = {k: k for k in self.state_dict() if k.startswith("features.")}
        self._load(sd, table, name)

    def load_lin(self, sd, name="lin state dict"):
        """lpips v0.1 heads: `lin{k}.model.1.weight` (1, C_k, 1, 1); `.model.0` is the head's dropout."""
        table = {f"lin{k}.model.1.weight": f"lin.{k}.weight" for k in range(len(self.chns))}
        self._load(_strip(sd), table, name)

    def _load(self, sd, table, name):
        own = self.state_dict()
        missing = sorted(k for k in table if k not in sd)
        unexpected = sorted(k for k in sd if k not in table)
        shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[table[k]].shape)}"
                  for k in table if k in sd and sd[k].shape != own[table[k]].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"LPIPS: {name} does not fit: missing keys {missing}; unexpected keys "
                             f"{unexpected}; shape mismatches {shapes}")
        with torch.no_grad():
            for k, ours in table.items():
                own[ours].copy_(sd[k])

    @classmethod
    def from_files(cls, vgg_path, lin_path, chns=VGG16_CHANNELS):
        for p in (vgg_path, lin_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"LPIPS: weight file {p!r} not found")
        m = cls(chns)
        m.load_vgg(torch.load(vgg_path, map_location="cpu", weights_only=True), vgg_path)
        m.load_lin(torch.load(lin_path, map_location="cpu", weights_only=True), lin_path)
        return m


def _strip(sd):
    """Drop `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            k = k[len(p):] if k.startswith(p) else k
        out[k] = v
    return out


def lpips_or_none(vgg_path=None, lin_path=None):
    """-> (LPIPS or None, a line for the log). No paths: LPIPS off (the trainer logs the line once).
    One path without the other is a mistake, not a request to turn it off."""
    if not vgg_path and not lin_path:
        return None, ("LPIPS off: no lpips_vgg / lpips_lin files given (torchvision vgg16-397923af.pth and "
                      "lpips weights/v0.1/vgg.pth); the perceptual term is left out of the loss")
    if not vgg_path or not lin_path:
        raise UserError(f"LPIPS needs both files: lpips_vgg={vgg_path!r}, lpips_lin={lin_path!r}")
    for key, p in (("lpips_vgg_path", vgg_path), ("lpips_lin_path", lin_path)):
        if not os.path.isfile(p):
            raise UserError(f"--{key}={p!r}: LPIPS weight file not found")
    return LPIPS.from_files(vgg_path, lin_path), f"LPIPS on: vgg {vgg_path}, lin {lin_path}"

# -----------------------------------------------------------------------------
# PatchGAN discriminator and GAN losses


class DResBlock(nn.Module):
    """As released: GN, LeakyReLU 0.2, ONE 3x3 conv (with the stride), plus a 1x1 shortcut applied to
    the input bilinearly resized to the output grid. The blocks always change width, so the shortcut
    always exists."""

    def __init__(self, c_in, c_out, stride, groups):
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(groups, c_in), c_in, eps=1e-6)
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv(F.leaky_relu(self.norm(x), 0.2))
        if h.shape[-2:] != x.shape[-2:]:
            x = F.interpolate(x, size=h.shape[-2:], mode="bilinear", align_corners=False)
        return self.skip(x) + h


class Discriminator(nn.Module):
    """PatchGAN-like: conv 3->w s2, LeakyReLU 0.2, blocks w->2w s2, 2w->4w s2, 4w->8w s1, conv 8w->1.
    (B, 3, H, W) -> logits (B, 1, H/8, W/8). width 64 is the released model (~1.7M parameters); GroupNorm
    uses 32 groups there, gcd(groups, C) keeps tiny widths valid."""

    def __init__(self, width=64, groups=32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1), nn.LeakyReLU(0.2),
            DResBlock(w, 2 * w, 2, groups), DResBlock(2 * w, 4 * w, 2, groups), DResBlock(4 * w, 8 * w, 1, groups),
            nn.Conv2d(8 * w, 1, 3, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # taming's weights_init: conv weights only, biases stay default
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x):
        return self.net(x)


def hinge_d_loss(logits_real, logits_fake, slope=0.01):
    """0.5 * (mean(leaky_relu(1 - D(x))) + mean(leaky_relu(1 + D(x_hat)))). The released DualToken code
    swapped taming/RQ-VAE's relu for F.leaky_relu with its default slope 0.01, so logits already past
    the margin still get a small push; slope=0 gives the classic hinge."""
    return 0.5 * (F.leaky_relu(1 - logits_real, slope).mean() + F.leaky_relu(1 + logits_fake, slope).mean())


def g_loss(logits_fake):
    return -logits_fake.mean()


def adaptive_weight(rec_loss, g_loss, last_layer, lo=0.3, hi=10.0, eps=1e-4):
    """Taming's balance of the GAN gradient against the reconstruction gradient at the decoder's last
    conv weight: clamp(|grad rec| / (|grad G| + eps), lo, hi), detached. The released code clamps to
    [0.3, 10] instead of taming's [0, 1e4]."""
    if not torch.is_grad_enabled():
        raise ValueError("adaptive_weight needs autograd: run with the GAN off (disc=None) under no_grad")
    gr = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gg = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(gr.norm() / (gg.norm() + eps), lo, hi).detach()

# -----------------------------------------------------------------------------
# the whole objective


@dataclass
class LossConfig:
    w_sem_tok: float = 5.0     # mse_cos(zq_sem, teacher block 26)
    w_sem_pool: float = 1.0    # mse_cos(pooled, teacher pooled)
    w_commit: float = 5.0      # x (commit_pix + commit_sem)
    w_rec: float = 5.0         # pixel MSE
    w_lpips: float = 1.0
    w_edge: float = 0.0        # not in the release (0): x L1 of the horizontal / vertical pixel differences
    w_gan: float = 0.75        # x adaptive weight x G
    adaptive_lo: float = 0.3   # the adaptive GAN weight |grad rec| / (|grad G| + adaptive_eps), clamped to
    adaptive_hi: float = 10.0  # [adaptive_lo, adaptive_hi] (adaptive_weight)
    adaptive_eps: float = 1e-4
    d_slope: float = 0.01      # leaky slope of the discriminator's hinge (0 = classic hinge)


class TokenizerLoss(nn.Module):
    """Holds the frozen LPIPS (or None) and the weights. forward -> (total, {term: float}); the dict
    has the raw (unweighted) terms sem_tok, sem_pool, commit_pix, commit_sem, rec_mse, lpips (only with
    LPIPS on), g and adaptive_w (only with the GAN on), and the weighted total. Terms must be tensors.
    With the GAN on, total.backward() also leaves G's gradient in D's parameters: zero D's grads before
    its own step (the released trainer calls disc_optimizer.zero_grad() right before d_loss)."""

    def __init__(self, cfg=None, lpips=None):
        super().__init__()
        self.cfg = cfg or LossConfig()
        self.lpips = lpips

    def forward(self, x, x_hat, zq_sem, t_sem, pooled, t_pool, commit_pix, commit_sem,
                disc=None, last_layer=None):
        c = self.cfg
        if x.shape != x_hat.shape:
            raise ValueError(f"TokenizerLoss: x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ")
        # a term whose inputs are None is absent (recon-only ablations: no semantic branch; tied or
        # recon-only: no semantic quantizer of its own): not computed, not logged
        t = {}
        if zq_sem is not None:
            t["sem_tok"] = mse_cos(zq_sem, t_sem)
        if pooled is not None:
            t["sem_pool"] = mse_cos(pooled, t_pool)
        t["commit_pix"] = commit_pix
        if commit_sem is not None:
            t["commit_sem"] = commit_sem
        t["rec_mse"] = F.mse_loss(x_hat, x)
        if c.w_edge:
            t["edge"] = edge_loss(x_hat, x)
        w = {"sem_tok": c.w_sem_tok, "sem_pool": c.w_sem_pool, "commit_pix": c.w_commit, "commit_sem": c.w_commit,
             "rec_mse": c.w_rec, "edge": c.w_edge}
        total = sum(w[k] * v for k, v in t.items())
        rec = t["rec_mse"]  # what the adaptive weight balances: MSE + w_lpips * LPIPS, without w_rec (as released)
        if self.lpips is not None:
            t["lpips"] = self.lpips(x_hat, x)
            total = total + c.w_lpips * t["lpips"]
            rec = rec + c.w_lpips * t["lpips"]
        if disc is not None:
            if last_layer is None:
                raise ValueError("TokenizerLoss: the GAN term needs last_layer (the decoder's conv_out.weight)")
            t["g"] = g_loss(disc(x_hat))
            t["adaptive_w"] = adaptive_weight(rec, t["g"], last_layer, c.adaptive_lo, c.adaptive_hi,
                                              c.adaptive_eps)
            total = total + c.w_gan * t["adaptive_w"] * t["g"]
        t["total"] = total
        vals = torch.stack([v.detach().float().reshape(()) for v in t.values()]).tolist()  # one device sync
        return total, dict(zip(t.keys(), vals))

    def d_loss(self, disc, x, x_hat):
        """Discriminator objective on detached images -> (loss, {d_loss, logits_real, logits_fake}).
        Real and fake go through D in one batch: GroupNorm is per sample, so this equals two passes."""
        logits = disc(torch.cat([x.detach(), x_hat.detach()]))  # (2B, 1, h, w)
        lr, lf = logits.chunk(2)
        loss = hinge_d_loss(lr, lf, self.cfg.d_slope)
        vals = torch.stack([loss.detach(), lr.detach().mean(), lf.detach().mean()]).float().tolist()
        return loss, dict(zip(("d_loss", "logits_real", "logits_fake"), vals))

