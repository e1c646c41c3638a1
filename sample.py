"""
Use the trained (or released) models: three jobs, one script, typed `--key=value` settings per job.

    python sample.py reconstruct --tokenizer=out-shapes/tokenizer --images=photo.jpg|folder/
    python sample.py generate --mllm=out-shapes/mllm --tokenizer=out-shapes/tokenizer \\
        --captions="a large red circle in the center" --num_per_caption=4 --cfg_scale=3.0
    python sample.py answer --mllm=out-shapes/mllm --tokenizer=out-shapes/tokenizer \\
        --image=img.png --question="what color is the circle?"

Tokenizer: our folder or the authors' release (`DualToken.from_pretrained` detects which; `--siglip_config` when the
release's absolute SigLIP path is not on this machine). MLLM: a folder/file written by train_mllm.py.
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch

import data
from metrics import psnr
from codec import compile_tokenizer, generate_images, image_codes, sampling_settings
from loaders import check_texts, load_image_tokenizer, load_pair
from sequences import qa_prompt
import train_utils as tu
from configurator import UserError, command, config_dict, parse_config, read_lines, run_main, text_lines
from folders import check_outputs, hold_folder, path_fields


@dataclass
class Common:
    """The keys every job takes."""
    tokenizer: str = ""        # tokenizer folder (ours) or the authors' release; MLLM jobs: '' -> the one it was trained with
    siglip_config: str = ""    # authors' release only: SigLIP folder / config.json if pretrained_model is absent
    out_dir: str = "out-samples"  # where the job writes its PNGs and JSON
    device: str = ""           # '' -> cuda > mps > cpu
    dtype: str = "bfloat16"    # autocast on cuda only
    seed: int = 0
    batch_size: int = 16
    threads: int = 0           # CPU intra-op threads; 0 = torch's default (1 is faster for tiny models)
    compile: bool = False      # torch.compile the image tokenizer's blocks and decoder (codec.compile_tokenizer)
    #                            and generate's decode step (decode.py: the same codes; minutes to compile on a CPU)

# -----------------------------------------------------------------------------
# helpers


def _device(cfg):
    return cfg.device or tu.default_device()


def list_images(path):
    """A file, or every image under a folder (sorted, recursive)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = data._list_images(path)
        if not files:
            raise UserError(f"--images={path!r}: no files ending in {', '.join(data.IMAGE_EXTS)} under it")
        return files
    raise UserError(f"--images={path!r} is neither a file nor a folder")


def looks_like_path(text):
    """A value meant as a file path: ends in .txt / .jsonl or holds a path separator."""
    return text.endswith((".txt", ".jsonl")) or "/" in text or os.sep in text


def text_or_file(value, key):
    """A paths-or-text argument (--captions): an existing file gives its non-empty lines, anything else is
    the text itself, except a path-like string (looks_like_path) with no file behind it, which is refused:
    a mistyped file name must not be drawn as a caption. Says which it took. -> [(where, text)]: where is
    file:line, or --key for the text itself."""
    if not value:
        raise UserError(f"--{key} is required: the text itself or a file with one per line")
    if os.path.isfile(value):
        read_lines(value, f"--{key}")  # refuses a file with no line
        items = [(f"{value}:{n}", ln.strip()) for n, ln in text_lines(value) if ln.strip()]
        print(f"--{key}: {len(items)} line(s) read from the file {value}")
        return items
    if looks_like_path(value):
        raise UserError(f"--{key}={value!r} looks like a file path but there is no such file (give the text "
                        f"itself without '/' or a .txt/.jsonl ending, or an existing file)")
    print(f"--{key}: taken as text ({value!r})")
    return [(f"--{key}", value)]




def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _opt(v):
    """0 / 1.0 / negative mean 'off' for top-k / top-p / cfg on the command line."""
    return None if v is None or v <= 0 else v


# -----------------------------------------------------------------------------
# reconstruct


@dataclass
class ReconstructConfig(Common):
    images: str = ""           # an image file or a folder of images
    max_images: int = 64       # 0 = all


@torch.no_grad()
def reconstruct(cfg):
    """Image(s) -> tokenizer -> pixel codes -> decoder: a PNG grid (original | reconstruction per row) plus one
    PNG per reconstruction and per-image PSNR."""
    device = _device(cfg)
    model = load_image_tokenizer(cfg.tokenizer, cfg.siglip_config, device)
    if cfg.compile:
        compile_tokenizer(model)
    R = model.config.siglip.vision.image_size
    files = list_images(cfg.images)
    files = files if cfg.max_images <= 0 else files[:cfg.max_images]
    bad = []  # a folder: files that do not decode are skipped and counted, as the trainers do

    def batches():
        chunk, xs = [], []
        for k, p in enumerate(files):
            try:
                xs.append(data.read_image(p, R))  # shortest side to R, centre crop: the evaluation protocol
                chunk.append(p)
            except UserError as e:
                if os.path.isfile(cfg.images):  # the one image asked for: the user's mistake
                    raise
                bad.append(str(e))
            if chunk and (len(chunk) == cfg.batch_size or k == len(files) - 1):
                yield chunk, torch.stack(xs).to(device)  # (B, 3, R, R)
                chunk, xs = [], []

    rows, labels, results = [], [], []
    os.makedirs(os.path.join(cfg.out_dir, "recon"), exist_ok=True)
    for chunk, x in batches():
        with tu.autocast_ctx(device, cfg.dtype):
            pix, _ = model.encode(x)  # (B, h, w, depth)
            rec = model.decode(pix).float()
        p = psnr(x, rec).tolist()
        for path, a, b, v, codes in zip(chunk, data.to_image(x), data.to_image(rec), p, pix):
            name = os.path.splitext(os.path.basename(path))[0]
            out = os.path.join(cfg.out_dir, "recon", f"{len(results):04d}_{name}.png")
            data.save_png(b, out)
            rows.append([a, b])
            labels.append(f"{name}: PSNR {v:.2f} dB")
            results.append(dict(image=path, recon=out, psnr=v, pix_codes_shape=list(codes.shape)))
            print(f"{path}: PSNR {v:.2f} dB -> {out}")
    if bad:
        print(f"skipped {len(bad)} of {len(files)} files under {cfg.images} that do not decode, e.g. {bad[0]}")
    if not results:
        raise UserError(f"--images={cfg.images!r}: none of its {len(files)} image files decodes")
    grid = data.grid_png(rows, os.path.join(cfg.out_dir, "reconstruct.png"), labels=labels)  # enlarged, captioned
    info = dict(job="reconstruct", grid=grid, resolution=R, mean_psnr=sum(r["psnr"] for r in results) / len(results),
                images=results, config=config_dict(cfg))
    tu.write_json(info, os.path.join(cfg.out_dir, "reconstruct.json"))
    print(f"{len(results)} images at {R} px, mean PSNR {info['mean_psnr']:.2f} dB; grid (original | reconstruction): {grid}")
    return info


# -----------------------------------------------------------------------------
# generate


@dataclass
class GenerateConfig(Common):
    mllm: str = ""             # out_dir of train_mllm.py
    check_hash: bool = True    # refuse a tokenizer whose hash differs from the one the MLLM recorded
    captions: str = ""         # one caption, or a file with one caption per line (sample.text_or_file)
    num_per_caption: int = 4   # images drawn per caption (one grid row each)
    # sampler; None: as the MLLM's trainer evaluated it (its config.json "sampling"), see sampling_settings
    cfg_scale: Optional[float] = None         # <= 0: no classifier-free guidance (and no unconditional half)
    temperature: Optional[float] = None       # 0: greedy
    fine_temperature: Optional[float] = None  # depths 2..; < 0: = temperature
    top_k: Optional[int] = None               # <= 0: off (the paper's stage 3 preset: 900)
    top_p: Optional[float] = None             # <= 0 or >= 1: off (the paper's stage 3 preset: 0.96)
    grid_scale: int = 0        # generate.png enlargement; 0: the smallest making each image >= 144 px (data.grid_png)


@torch.no_grad()
def generate(cfg):
    """Captions -> MLLM image codes (CFG, temperature, top-k, top-p, seed) -> tokenizer decode of the PIXEL codes
    only (design §5): a PNG grid with the captions written under the rows and the sampling settings in a
    JSON file beside it."""
    device = _device(cfg)
    if cfg.num_per_caption < 1:
        raise UserError(f"--num_per_caption={cfg.num_per_caption}: need at least 1 image per caption")
    items = text_or_file(cfg.captions, "captions")  # before loading models: a mistake costs no time
    check_texts(cfg.mllm, items)
    caps = [t for _, t in items]
    model, text_tok, image_tok, info = load_pair(cfg, device)
    flat = [c for c in caps for _ in range(cfg.num_per_caption)]
    sampling = sampling_settings(cfg, info)
    settings = dict(sampling, seed=cfg.seed, num_per_caption=cfg.num_per_caption)
    with tu.autocast_ctx(device, cfg.dtype):
        imgs, _ = generate_images(model, image_tok, text_tok, flat, _generator(device, cfg.seed), cfg.batch_size,
                                  compile_decode=cfg.compile, **sampling)
    arr = data.to_image(imgs)  # (B, H, W, 3) uint8
    files = []
    for i, a in enumerate(arr):
        files.append(os.path.join(cfg.out_dir, "images", f"{i // cfg.num_per_caption:03d}_{i % cfg.num_per_caption:02d}.png"))
        data.save_png(a, files[-1])
    n = cfg.num_per_caption
    grid = data.grid_png([list(arr[i * n:(i + 1) * n]) for i in range(len(caps))],
                         os.path.join(cfg.out_dir, "generate.png"), labels=caps, scale=cfg.grid_scale)
    info = dict(job="generate", grid=grid, captions=caps, images=files, sampling=settings,
                mllm=cfg.mllm, tokenizer=cfg.tokenizer, device=device, config=config_dict(cfg))
    tu.write_json(info, os.path.join(cfg.out_dir, "generate.json"))
    print(f"{len(files)} images for {len(caps)} caption(s), sampling {settings}: {grid}")
    return info

# -----------------------------------------------------------------------------
# answer


@dataclass
class AnswerConfig(Common):
    mllm: str = ""             # out_dir of train_mllm.py
    check_hash: bool = True    # refuse a tokenizer whose hash differs from the one the MLLM recorded
    image: str = ""            # the image file asked about
    question: str = ""         # one question, as text
    max_new_tokens: int = 32   # the answer's length limit in text tokens
    temperature: float = 0.0   # 0: greedy
    top_k: int = 0             # <= 0: off
    top_p: float = 0.0         # <= 0 or >= 1: off


@torch.no_grad()
def answer(cfg):
    """An image and a question -> the MLLM's text answer (greedy by default), printed and kept in answer.json."""
    device = _device(cfg)
    if not cfg.image or not os.path.isfile(cfg.image):
        raise UserError(f"--image={cfg.image!r}: need an existing image file")
    if not cfg.question:
        raise UserError("--question is required")
    if looks_like_path(cfg.question) and not cfg.question.endswith("?"):
        # one question, as text; a file name here is a mistake (a question may hold a '/', and ends in '?')
        raise UserError(f"--question={cfg.question!r} looks like a file path: --question takes one question as text")
    check_texts(cfg.mllm, [("--question", cfg.question)])
    model, text_tok, image_tok, _ = load_pair(cfg, device)
    R = image_tok.config.siglip.vision.image_size
    x = data.read_image(cfg.image, R)[None].to(device)  # (1, 3, R, R)
    with tu.autocast_ctx(device, cfg.dtype):
        ids = model.generate_text([qa_prompt(text_tok, cfg.question)], images=image_codes(image_tok, x),
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=_opt(cfg.top_k),
                                  top_p=cfg.top_p if 0 < cfg.top_p < 1 else None,
                                  generator=_generator(device, cfg.seed))[0]
    text = text_tok.decode(ids).strip()
    info = dict(job="answer", image=cfg.image, question=cfg.question, answer=text, config=config_dict(cfg))
    os.makedirs(cfg.out_dir, exist_ok=True)
    tu.write_json(info, os.path.join(cfg.out_dir, "answer.json"))
    print(f"Q: {cfg.question}\nA: {text}")
    return info


JOBS = {"reconstruct": (ReconstructConfig, reconstruct), "generate": (GenerateConfig, generate),
        "answer": (AnswerConfig, answer)}


def main(argv):
    commands = {name: fn for name, (_, fn) in JOBS.items()}
    name, argv = command(argv, commands)
    klass, fn = JOBS[name]
    cfg = parse_config(klass(), argv, name, commands)
    check_outputs(path_fields(cfg, skip=("out_dir",)), dirs=[("--out_dir", cfg.out_dir)])
    tu.check_values(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    with hold_folder(cfg.out_dir):
        return fn(cfg)


if __name__ == "__main__":
    run_main(main)
