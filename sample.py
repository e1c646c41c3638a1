"""
Use the trained (or released) models: three jobs, one script, typed `--key=value` settings per job.

    python sample.py reconstruct --tokenizer=out-shapes/tokenizer --images=photo.jpg|folder/
    python sample.py generate --mllm=out-shapes/mllm --tokenizer=out-shapes/tokenizer \\
        --captions="a large red circle in the center" --num_per_caption=4 --cfg_scale=3.0
    python sample.py answer --mllm=out-shapes/mllm --tokenizer=out-shapes/tokenizer \\
        --image=img.png --question="what color is the circle?"

reconstruct: image(s) -> tokenizer -> pixel codes -> decoder; a PNG grid (original | reconstruction per
row) plus one PNG per reconstruction and per-image PSNR. generate: captions -> MLLM image codes (CFG,
temperature, top-k, top-p, seed) -> tokenizer decode of the PIXEL codes only (spec section 3); a PNG grid
with the captions written under the rows and the sampling settings in a JSON file beside it. answer: an
image and a question -> the MLLM's text answer (greedy by default).

Tokenizer: our folder or the authors' release (`DualToken.from_pretrained`; `--siglip_config` when the
release's absolute SigLIP path is not on this machine). MLLM: a folder/file written by train_mllm.py.
"""
import json
import os
import sys
from dataclasses import dataclass

import torch

import data
import train_utils as tu
from configurator import config_dict, parse_config


@dataclass
class Common:
    tokenizer: str = ""        # tokenizer folder (ours) or the authors' release folder / weights file
    siglip_config: str = ""    # authors' release only: SigLIP folder / config.json if pretrained_model is absent
    out_dir: str = "out-samples"
    device: str = ""           # '' -> cuda > mps > cpu
    dtype: str = "bfloat16"    # autocast on cuda only
    seed: int = 0
    batch_size: int = 16

# -----------------------------------------------------------------------------
# helpers


def _device(cfg):
    return cfg.device or tu.default_device()


def load_tokenizer(cfg, device):
    from tokenizer import DualToken
    if not cfg.tokenizer:
        raise ValueError("--tokenizer is required (a tokenizer folder, or the authors' release)")
    return DualToken.from_pretrained(cfg.tokenizer, siglip_config=cfg.siglip_config or None).to(device).eval()


def list_images(path):
    """A file, or every image under a folder (sorted, recursive)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = data._list_images(path)
        if not files:
            raise ValueError(f"--images={path!r}: no files ending in {', '.join(data.IMAGE_EXTS)} under it")
        return files
    raise ValueError(f"--images={path!r} is neither a file nor a folder")


def grid_png(rows, path, labels=None, pad=2):
    """rows: list of lists of uint8 (H, W, 3) arrays -> one PNG, white padding; labels: one caption per row
    written under it with PIL's default font (long captions are wrapped)."""
    from PIL import Image, ImageDraw
    H, W = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    width = ncol * (W + pad) + pad
    line_h, chars = 12, max(8, width // 6)
    wrapped = [[]] * len(rows) if labels is None else \
        [[lab[i:i + chars] for i in range(0, len(lab), chars)] or [""] for lab in labels]
    heights = [H + pad + len(w) * line_h for w in wrapped]
    canvas = Image.new("RGB", (width, sum(heights) + pad), (255, 255, 255))
    draw, y = ImageDraw.Draw(canvas), pad
    for row, text, h in zip(rows, wrapped, heights):
        for j, img in enumerate(row):
            canvas.paste(Image.fromarray(img), (pad + j * (W + pad), y))
        for k, line in enumerate(text):
            draw.text((pad, y + H + 1 + k * line_h), line, fill=(0, 0, 0))
        y += h
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path

# -----------------------------------------------------------------------------
# reconstruct


@dataclass
class ReconstructConfig(Common):
    images: str = ""           # an image file or a folder of images
    max_images: int = 64       # 0 = all


@torch.no_grad()
def reconstruct(cfg):
    from eval import psnr
    device = _device(cfg)
    model = load_tokenizer(cfg, device)
    R = model.config.siglip.vision.image_size
    files = list_images(cfg.images)
    files = files if cfg.max_images <= 0 else files[:cfg.max_images]
    tf = data.eval_transform(R)  # shortest side to R, centre crop: the evaluation protocol
    rows, results = [], []
    os.makedirs(os.path.join(cfg.out_dir, "recon"), exist_ok=True)
    for i in range(0, len(files), cfg.batch_size):
        chunk = files[i:i + cfg.batch_size]
        x = torch.stack([tf(data.load_image(p)) for p in chunk]).to(device)  # (B, 3, R, R)
        with tu.autocast_ctx(device, cfg.dtype):
            pix, _ = model.encode(x)  # (B, h, w, depth)
            rec = model.decode(pix).float()
        p = psnr(x, rec).tolist()
        from PIL import Image
        for path, a, b, v, codes in zip(chunk, data.to_image(x), data.to_image(rec), p, pix):
            name = os.path.splitext(os.path.basename(path))[0]
            out = os.path.join(cfg.out_dir, "recon", f"{len(results):04d}_{name}.png")
            Image.fromarray(b).save(out)
            rows.append([a, b])
            results.append(dict(image=path, recon=out, psnr=v, pix_codes_shape=list(codes.shape)))
            print(f"{path}: PSNR {v:.2f} dB -> {out}")
    grid = grid_png(rows, os.path.join(cfg.out_dir, "reconstruct.png"))
    info = dict(job="reconstruct", grid=grid, resolution=R, mean_psnr=sum(r["psnr"] for r in results) / len(results),
                images=results, config=config_dict(cfg))
    with open(os.path.join(cfg.out_dir, "reconstruct.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"{len(results)} images at {R} px, mean PSNR {info['mean_psnr']:.2f} dB; grid (original | reconstruction): {grid}")
    return info


JOBS = {"reconstruct": (ReconstructConfig, reconstruct)}


def main(argv):
    if not argv or argv[0] not in JOBS:
        sys.exit(f"usage: python sample.py {{{'|'.join(JOBS)}}} [config/preset.py] [--key=value ...]")
    klass, fn = JOBS[argv[0]]
    cfg = parse_config(klass(), argv[1:])
    torch.manual_seed(cfg.seed)
    return fn(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
