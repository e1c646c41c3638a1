"""
Image metrics on the project's [-1, 1] images (design §7), one home for every script: PSNR and SSIM
on [0, 1] RGB after clamping, and rFID through the optional clean-fid package (fid_or_reason). Used by
eval.py (the reported numbers), train_tokenizer.py (its periodic eval, so the two agree by construction)
and sample.py reconstruct.
"""
import os

import torch
import torch.nn.functional as F


def _unit(x):
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x, y):
    """Per-image PSNR in dB on [0, 1] RGB after clamping (design §7) -> (B,). Identical images give
    100 dB (MSE floored at 1e-10) instead of inf, so averages stay finite."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"psnr: expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (_unit(x) - _unit(y)).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1 / mse)


def gaussian_window(size=11, sigma=1.5):
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-g ** 2 / (2 * sigma ** 2))
    return g / g.sum()  # (size,)


def ssim(x, y, size=11, sigma=1.5, data_range=1.0, k1=0.01, k2=0.03):
    """Per-image SSIM (Wang et al. 2004) on [0, 1] RGB after clamping -> (B,). Gaussian window size x size,
    sigma 1.5, 'valid' filtering (no padding), C1 = (k1 L)^2, C2 = (k2 L)^2, mean over the SSIM map and
    the channels: the convention of the paper's numbers (and of pytorch-msssim / skimage's
    gaussian_weights=True). Computed in float64 so small images and near-identical pairs are exact."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim: expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < size:
        raise ValueError(f"ssim: images {tuple(x.shape[-2:])} are smaller than the {size}x{size} window")
    a, b = _unit(x).double(), _unit(y).double()
    C = a.shape[1]
    g = gaussian_window(size, sigma).to(a.device)
    gh, gv = g.view(1, 1, 1, size).repeat(C, 1, 1, 1), g.view(1, 1, size, 1).repeat(C, 1, 1, 1)

    def blur(t):  # separable depthwise filter, valid: (B, C, H, W) -> (B, C, H-size+1, W-size+1)
        return F.conv2d(F.conv2d(t, gh, groups=C), gv, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a ** 2
    sbb = blur(b * b) - mu_b ** 2
    sab = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return m.flatten(1).mean(1).float()


def fid_or_reason(real_dir, fake_dir, inception_path, device):
    """rFID with clean-fid's protocol ("clean" resize, the torchscript Inception of StyleGAN2-ADA), from
    a local Inception file only. -> (value or None, note)."""
    if not inception_path:
        return None, "unavailable: no --inception_path (clean-fid's inception-2015-12-05.pt) given"
    if os.path.basename(inception_path) != "inception-2015-12-05.pt" or not os.path.isfile(inception_path):
        return None, f"unavailable: {inception_path!r} is not an existing file named inception-2015-12-05.pt"
    try:
        from cleanfid import fid
        from cleanfid.inception_torchscript import InceptionV3W
    except ImportError as e:
        return None, f"unavailable: the optional clean-fid package is not installed ({e})"
    try:  # download=False: the file must be where we said; nothing is fetched
        net = InceptionV3W(os.path.dirname(os.path.abspath(inception_path)), download=False,
                           resize_inside=False).to(device).eval()
        value = fid.compute_fid(real_dir, fake_dir, mode="clean", custom_feat_extractor=lambda x: net(x),
                                device=torch.device(device), num_workers=0, verbose=False)
    except Exception as e:  # an API change or a broken file: say so instead of guessing a number
        return None, f"unavailable: clean-fid failed ({type(e).__name__}: {e})"
    return float(value), "clean-fid mode=clean"
