"""
Data for every stage: the built-in shapes world (our shakespeare_char for images + text), real-data
loaders, the image transforms and the grid writer. The world's checker, which reads an image back, is
checker.py.

Shapes world: procedurally rendered RGB images of 1..N flat-coloured objects on a light background.
Every sample carries its attributes, a caption and question/answer pairs, so each stage has an
objective score: reconstruction (PSNR), zero-shot semantics (18 "colour shape" classes), question
answering (exact-match answers), generation from a caption (`checker.describe` reads the generated
image back and `checker.objects_match` compares it with the caption's objects).

Why it is built the way it is:
- No anti-aliasing and no pixel noise: a tokenizer must be able to reconstruct it exactly, and the
  checker can read it back with plain array code.
- Every object stays inside its own 3x3 grid cell (jitter is limited so the bounding box never leaves
  the cell), so objects never touch and the cell is well defined.
- Splits are disjoint by construction, not by luck: a sample is fully determined by a discrete "key"
  (objects in cell order, integer jitters, background), and a hash of that key decides whether the key
  belongs to train or val. The same image can therefore never be in both. `holdout_pairs` never
  enter train or val at all; the "holdout" split always contains at least one of them.
- Images are in [-1, 1] everywhere (SigLIP convention: mean = std = 0.5).
"""
import hashlib
import json
import os
import textwrap
from dataclasses import dataclass

import numpy as np
import torch

from configurator import UserError, atomic_write, positional_help, read_jsonl_records, read_lines, run_main
from folders import hold_folder

# -----------------------------------------------------------------------------
# the shapes world

# Saturated object colours, far from each other and from every (light, near-grey) background.
# The checker separates them by hue: red ~358, orange ~27, yellow ~53, green ~129, blue ~230,
# purple ~281 degrees; blending with a near-grey background (blur) keeps the hue.
COLORS = {
    "red": (215, 30, 35),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 50, 180),
    "orange": (240, 120, 20),
}
SHAPES = ("circle", "square", "triangle")
ALL_SHAPES = SHAPES + ("diamond",)  # the optional 4th shape: ShapesConfig(shapes=ALL_SHAPES)
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CELL_PHRASES = ("in the top left", "at the top", "in the top right", "on the left", "in the center",
                "on the right", "in the bottom left", "at the bottom", "in the bottom right")
# light backgrounds with chroma <= 25, so no blend of them can look like an object colour
BACKGROUNDS = ((245, 245, 245), (225, 225, 225), (245, 238, 220), (220, 232, 245), (225, 240, 225))
BACKGROUND_NAMES = ("white", "gray", "cream", "sky", "mint")  # the detail question's answers (detail_qa)
GRADIENT_DIRS = ((1, 0), (1, 1), (0, 1), (-1, 1))  # half-circle only: (a->b, d) == (b->a, -d)
# half-extent of an object as a fraction of the image side; a cell is 1/3 of the side
RADIUS = {"small": 0.075, "large": 0.13}
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}  # area / bbox area
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "holdout")


@dataclass
class ShapesConfig:
    image_size: int = 64       # any size >= 24; the checker needs >= 48 (at 32 a small circle is 4x4 px)
    min_objects: int = 1
    max_objects: int = 2
    seed: int = 0
    holdout_pairs: tuple = ()  # ((colour, shape), ...) never in train/val; only in the "holdout" split
    shapes: tuple = SHAPES     # ALL_SHAPES adds "diamond"
    val_fraction: float = 0.1  # share of the key space (by hash) that belongs to val
    # True: a solid background is also asked about, "what color is the background?": no caption names it,
    # and probes read it from the pixel codes, barely from the semantic ones (design §10)
    detail_qa: bool = False


def _shape_mask(shape, X, Y, cx, cy, rx, ry):
    """Boolean mask of `shape` with centre (cx, cy) and half-extents (rx, ry), sampled at the pixel
    centres X, Y. The same function renders and, in `describe`, fits templates to bounding boxes."""
    u, v = (X - cx) / rx, (Y - cy) / ry
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # apex up, base on the bottom edge of the box
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape {shape!r}; expected one of {ALL_SHAPES}")


def _cell_center(cell, S):
    r, c = divmod(cell, 3)
    return (c + 0.5) * S / 3.0, (r + 0.5) * S / 3.0


def _max_jitter(size, S):
    """Largest integer shift that keeps the object's box inside its cell with a 1-pixel margin."""
    return max(0, int(np.floor(S / 6.0 - RADIUS[size] * S - 1.0)))


class ShapesWorld:
    def __init__(self, cfg: ShapesConfig):
        if not 1 <= cfg.min_objects <= cfg.max_objects <= 9:
            raise UserError(f"ShapesConfig: need 1 <= min_objects <= max_objects <= 9 (one object per "
                            f"cell), got min_objects={cfg.min_objects}, max_objects={cfg.max_objects}")
        if cfg.image_size < 24:
            raise UserError(f"ShapesConfig.image_size={cfg.image_size}: need >= 24 pixels")
        bad = [s for s in cfg.shapes if s not in ALL_SHAPES]
        if bad or not cfg.shapes:
            raise UserError(f"ShapesConfig.shapes: unknown {bad}; choose from {ALL_SHAPES}")
        pairs = [(c, s) for c in COLORS for s in cfg.shapes]
        holdout = [tuple(p) for p in cfg.holdout_pairs]
        bad = [p for p in holdout if p not in pairs]
        if bad:
            raise UserError(f"ShapesConfig.holdout_pairs: {bad} are not (colour, shape) pairs of this world")
        if not 0.0 < cfg.val_fraction < 1.0:
            raise UserError(f"ShapesConfig.val_fraction={cfg.val_fraction}: need 0 < val_fraction < 1")
        self.cfg, self.holdout, self.pairs = cfg, holdout, pairs
        self.allowed = [p for p in pairs if p not in holdout]
        if not self.allowed:
            raise UserError("ShapesConfig.holdout_pairs: every pair is held out, train would be empty")
        S = cfg.image_size
        ys, xs = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5  # pixel centres, (S, S) each
        self._X, self._Y, self._bg_cache = xs, ys, {}

    def class_names(self):
        """The zero-shot classes, "colour shape", colour-major: 18 with the default 3 shapes."""
        return [f"{c} {s}" for c in COLORS for s in self.cfg.shapes]

    # -- keys: the discrete description that fully determines an image -------------------------------

    def _key_bucket(self, key):
        """Deterministic (process-independent, unlike hash()) bucket in [0, 1) of a sample key."""
        h = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2.0 ** 64

    def _draw_key(self, rng, split, n):
        """One candidate key: objects in distinct cells sorted by cell, integer jitter, background.
        All randomness comes from one vector of uniforms (one numpy call instead of ~15 per draw, which
        matters because val rejects ~90 % of the draws)."""
        u = iter(rng.random(9 + 4 * n + 5).tolist())
        pick = lambda m: min(int(next(u) * m), m - 1)  # uniform integer in [0, m)
        cells = sorted(sorted(range(9), key=lambda c: next(u))[:n])  # a random n-subset of the cells
        forced = pick(n) if split == "holdout" else -1  # which object carries a held-out pair
        objs = []
        for i, cell in enumerate(cells):
            src = self.holdout if i == forced else (self.allowed if split != "holdout" else self.pairs)
            color, shape = src[pick(len(src))]
            size = SIZES[pick(2)]
            j = _max_jitter(size, self.cfg.image_size)
            dx, dy = pick(2 * j + 1) - j, pick(2 * j + 1) - j
            objs.append((color, shape, size, CELLS[cell], dx, dy))
        if next(u) < 0.5:
            bg = ("solid", pick(len(BACKGROUNDS)))
        else:
            a = pick(len(BACKGROUNDS))
            b = (a + 1 + pick(len(BACKGROUNDS) - 1)) % len(BACKGROUNDS)  # any other background
            bg = ("gradient", a, b, pick(len(GRADIENT_DIRS)))
        return tuple(objs), bg

    def sample(self, split, index, num_objects=None):
        """Sample `index` of `split`, a pure function of (seed, split, index, num_objects)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {SPLITS}")
        if split == "holdout" and not self.holdout:
            raise ValueError("split 'holdout' needs ShapesConfig.holdout_pairs (it is empty)")
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        cfg = self.cfg
        n_fixed = num_objects is not None
        if n_fixed and not 1 <= num_objects <= 9:
            raise ValueError(f"num_objects={num_objects}: need 1..9")
        rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index, num_objects or 0])
        while True:  # rejection on the key hash: train and val own disjoint parts of the key space
            n = num_objects if n_fixed else int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
            objs, bg = self._draw_key(rng, split, n)
            if split == "holdout":
                break
            in_val = self._key_bucket((objs, bg)) < cfg.val_fraction
            if in_val == (split == "val"):
                break
        objects = [dict(color=o[0], shape=o[1], size=o[2], cell=o[3]) for o in objs]
        jitter = [(o[4], o[5]) for o in objs]
        image = self.render(objects, jitter=jitter, background=bg)
        return dict(image=image, objects=objects, caption=caption(objects), qa=self.questions(objects, rng, bg),
                    jitter=jitter, background=bg)

    # -- rendering ------------------------------------------------------------------------------------

    def _background(self, bg):
        bg = tuple(bg)
        if bg not in self._bg_cache:  # 5 solid + 80 gradient backgrounds; each is computed once
            self._bg_cache[bg] = self._make_background(bg)
        return self._bg_cache[bg].copy()

    def _make_background(self, bg):
        S = self.cfg.image_size
        if bg[0] == "solid":
            return np.broadcast_to(np.array(BACKGROUNDS[bg[1]], np.uint8), (S, S, 3))
        _, a, b, d = bg
        dx, dy = GRADIENT_DIRS[d]
        t = dx * self._X + dy * self._Y  # (S, S) projection on the gradient direction
        t = (t - t.min()) / (t.max() - t.min())
        ca, cb = np.array(BACKGROUNDS[a], np.float32), np.array(BACKGROUNDS[b], np.float32)
        img = ca + t[..., None] * (cb - ca)  # (S, S, 3)
        return np.rint(img).astype(np.uint8)

    def render(self, objects, rng=None, jitter=None, background=None):
        """Render objects (dicts with color, shape, size, cell) to uint8 (H, W, 3).
        jitter: list of integer (dx, dy) per object; background: ("solid", i) or ("gradient", a, b, d).
        Whatever is not given is drawn from `rng` when there is one, else no jitter / plain white."""
        S = self.cfg.image_size
        if background is None:
            background = ("solid", int(rng.integers(len(BACKGROUNDS)))) if rng is not None else ("solid", 0)
        img = self._background(background)
        for i, o in enumerate(objects):
            for k, names in (("color", tuple(COLORS)), ("shape", ALL_SHAPES), ("size", SIZES), ("cell", CELLS)):
                if o.get(k) not in names:
                    raise ValueError(f"render: object {i} has {k}={o.get(k)!r}; expected one of {names}")
            if jitter is not None:
                dx, dy = jitter[i]
            elif rng is not None:
                j = _max_jitter(o["size"], S)
                dx, dy = rng.integers(-j, j + 1, size=2).tolist()
            else:
                dx, dy = 0, 0
            cx, cy = _cell_center(CELLS.index(o["cell"]), S)
            r = RADIUS[o["size"]] * S
            cx, cy = cx + dx, cy + dy
            y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, S)  # window around the object
            x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, S)
            mask = _shape_mask(o["shape"], self._X[y0:y1, x0:x1], self._Y[y0:y1, x0:x1], cx, cy, r, r)
            img[y0:y1, x0:x1][mask] = COLORS[o["color"]]
        return img

    # -- language -------------------------------------------------------------------------------------

    def questions(self, objects, rng, background=None):
        """Question/answer pairs with single-word or short answers. A question is asked only when its
        answer is unique (e.g. "what color is the circle?" only with exactly one circle). With detail_qa and
        a solid background key, the background question comes last (it draws nothing from rng)."""
        qa = [("how many objects are there?", NUMBERS[len(objects)])]
        n_shape = {s: sum(o["shape"] == s for o in objects) for s in self.cfg.shapes}
        n_color = {c: sum(o["color"] == c for o in objects) for c in COLORS}
        n_pair = {}
        for o in objects:
            n_pair[o["color"], o["shape"]] = n_pair.get((o["color"], o["shape"]), 0) + 1
        for o in objects:
            c, s = o["color"], o["shape"]
            if n_shape[s] == 1:
                qa.append((f"what color is the {s}?", c))
            if n_color[c] == 1:
                qa.append((f"what shape is the {c} object?", s))
            if n_pair[c, s] == 1:
                qa.append((f"where is the {c} {s}?", o["cell"]))
                qa.append((f"what size is the {c} {s}?", o["size"]))
                qa.append((f"is there {_a(c)} {c} {s}?", "yes"))
        # one "no" question about an absent pair; never a held-out pair, so train text says nothing
        # about the pairs it never sees
        absent = [p for p in self.allowed if p not in n_pair]
        if absent:
            c, s = absent[rng.integers(len(absent))]
            qa.append((f"is there {_a(c)} {c} {s}?", "no"))
        s = self.cfg.shapes[rng.integers(len(self.cfg.shapes))]
        qa.append((f"how many {s}s are there?", NUMBERS[n_shape[s]]))
        if self.cfg.detail_qa and background is not None and background[0] == "solid":
            qa.append(("what color is the background?", BACKGROUND_NAMES[background[1]]))
        return qa


def vocabulary(shapes=ALL_SHAPES):
    """Every word the world's captions, questions, answers and the MLLM's caption prompt use (a closed
    vocabulary for text.WordTokenizer); tests/test_text.py checks it covers what the world writes."""
    words = ["a", "an", "and", "the", "is", "are", "there", "what", "where", "how", "many", "color", "shape",
             "size", "object", "objects", "yes", "no", "in", "at", "on", "describe", "image", "?", ".", ","]
    words += list(COLORS) + list(shapes) + [s + "s" for s in shapes] + list(SIZES) + list(NUMBERS)
    words += [w for p in CELLS + CELL_PHRASES for w in p.split()] + ["background", *BACKGROUND_NAMES]
    return tuple(dict.fromkeys(words))  # first occurrence order, no duplicates


def _a(word):
    return "an" if word[0] in "aeiou" else "a"


def caption(objects, drop=0.0, rng=None):
    """"a large red circle in the top left and a small blue square at the bottom". drop > 0: each object's
    size and position phrase is left out with that probability (rng.random(), size then position), giving
    "a red circle" and the like, as train_siglip's caption dropout uses."""
    keep = lambda: drop <= 0 or rng.random() >= drop
    parts = []
    for o in objects:
        size = o["size"] + " " if keep() else ""
        where = " " + CELL_PHRASES[CELLS.index(o["cell"])] if keep() else ""
        parts.append(f"a {size}{o['color']} {o['shape']}{where}")
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# -----------------------------------------------------------------------------
# torch datasets

def to_tensor(img):
    """uint8 (H, W, 3) array or PIL RGB image -> FloatTensor (3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # (H, W, 3)
    return x.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


def to_image(x):
    """The inverse of to_tensor: FloatTensor (3, H, W) or (B, 3, H, W) in [-1, 1] -> uint8 numpy
    (H, W, 3) or (B, H, W, 3), clamped and rounded; e.g. a reconstruction or a generation for describe."""
    x = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()  # (..., H, W, 3)


def save_png(img, path):
    """uint8 (H, W, 3) array or PIL image -> PNG at path, atomically (configurator.atomic_write): the one
    PNG writer, so no picture a user keeps is ever left half-written."""
    from PIL import Image
    im = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    atomic_write(path, lambda f: im.save(f, format="PNG"))
    return path


READABLE_PX = 144  # grid_png's default enlargement makes each image at least this wide (48 px -> x3)


def grid_png(rows, path, labels=None, pad=2, scale=0):
    """rows: list of lists of uint8 (H, W, 3) arrays -> one PNG, white padding; labels: one caption per row
    written under it with PIL's default font (long captions are wrapped). scale: each image enlarged by that
    integer factor, nearest neighbour (every pixel stays a crisp square a person can check); 0: the smallest
    factor making each image READABLE_PX wide or more. The one grid writer: sample.py's reconstruct.png and
    generate.png, and the trainers' samples/step_*.png."""
    from PIL import Image, ImageDraw
    scale = scale or max(1, -(-READABLE_PX // rows[0][0].shape[1]))
    rows = [[np.repeat(np.repeat(im, scale, 0), scale, 1) for im in r] for r in rows]
    H, W = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    width = ncol * (W + pad) + pad
    line_h, chars = 12, max(8, width // 6)
    wrapped = [[]] * len(rows) if labels is None else \
        [textwrap.wrap(lab, chars, break_long_words=True) or [""] for lab in labels]  # at word boundaries
    heights = [H + pad + len(w) * line_h for w in wrapped]
    canvas = Image.new("RGB", (width, sum(heights) + pad), (255, 255, 255))
    draw, y = ImageDraw.Draw(canvas), pad
    for row, text, h in zip(rows, wrapped, heights):
        for j, img in enumerate(row):
            canvas.paste(Image.fromarray(img), (pad + j * (W + pad), y))
        for k, line in enumerate(text):
            draw.text((pad, y + H + 1 + k * line_h), line, fill=(0, 0, 0))
        y += h
    return save_png(canvas, path)


class ShapesDataset(torch.utils.data.Dataset):
    """Item i is world.sample(split, i): the image as a [-1, 1] tensor plus caption, qa and objects.
    transform, when given, receives a PIL image (as for real data) and returns the tensor."""

    def __init__(self, world, split, length, transform=None, num_objects=None):
        if split not in SPLITS:
            raise ValueError(f"ShapesDataset: split {split!r}, expected one of {SPLITS}")
        self.world, self.split, self.length = world, split, int(length)
        self.transform, self.num_objects = transform, num_objects

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(f"ShapesDataset index {i} out of range (length {self.length})")
        s = self.world.sample(self.split, i, num_objects=self.num_objects)
        if self.transform is None:
            image = to_tensor(s["image"])
        else:
            from PIL import Image
            image = self.transform(Image.fromarray(s["image"]))
        return dict(image=image, caption=s["caption"], index=i, qa=s["qa"], objects=s["objects"])


def collate(items):
    """List of item dicts -> batch dict: tensors stacked (image (B, 3, H, W)), ints (index, label)
    to a LongTensor, everything else (caption, qa, objects) kept as a list."""
    if not items:
        raise ValueError("collate: empty list of items")
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) != 1:
                raise ValueError(f"collate: '{k}' tensors have different shapes {sorted(shapes)}")
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], int) and not isinstance(vals[0], bool):
            out[k] = torch.tensor(vals, dtype=torch.long)
        else:
            out[k] = vals
    return out


# -----------------------------------------------------------------------------
# transforms: PIL image -> FloatTensor (3, size, size) in [-1, 1]. Plain PIL, so nothing imports
# torchvision (3 s); randomness from torch's generator, which DataLoader seeds per worker.

class train_transform:
    """RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(3/4, 4/3)), no flip (DualToken's tokenizer
    recipe: a flip would change what a caption's "left"/"right" means). Same sampling rule as
    torchvision's RandomResizedCrop; the crop is resized with bicubic (PIL anti-aliases downscaling)."""

    def __init__(self, size, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = int(size), scale, ratio

    def crop_box(self, W, H):
        lr = (np.log(self.ratio[0]), np.log(self.ratio[1]))
        for _ in range(10):
            area = W * H * float(torch.empty(1).uniform_(*self.scale))
            aspect = float(np.exp(float(torch.empty(1).uniform_(*lr))))
            w, h = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if 0 < w <= W and 0 < h <= H:
                i = int(torch.randint(0, H - h + 1, (1,)))
                j = int(torch.randint(0, W - w + 1, (1,)))
                return j, i, j + w, i + h
        # fallback: the largest centred crop whose aspect is inside `ratio`
        if W / H < self.ratio[0]:
            w, h = W, int(round(W / self.ratio[0]))
        elif W / H > self.ratio[1]:
            w, h = int(round(H * self.ratio[1])), H
        else:
            w, h = W, H
        i, j = (H - h) // 2, (W - w) // 2
        return j, i, j + w, i + h

    def __call__(self, img):
        from PIL import Image
        img = to_rgb(img)
        box = self.crop_box(*img.size)
        return to_tensor(img.resize((self.size, self.size), Image.BICUBIC, box=box))


class eval_transform:
    """Shortest side -> size (bicubic), then centre crop size x size: the reconstruction protocol."""

    def __init__(self, size):
        self.size = int(size)

    def __call__(self, img):
        from PIL import Image
        img = to_rgb(img)
        (W, H), s = img.size, self.size
        w, h = (s, max(s, int(s * H / W))) if W <= H else (max(s, int(s * W / H)), s)
        img = img.resize((w, h), Image.BICUBIC)
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        return to_tensor(img.crop((left, top, left + s, top + s)))


# -----------------------------------------------------------------------------
# real data

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def to_rgb(img):
    """Any PIL mode -> RGB. Transparency is composited on white (a plain convert would show whatever
    colour hides under alpha = 0); 16/32-bit and float grayscale are rescaled, not clipped."""
    from PIL import Image
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 255.0)
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("P", "PA", "RGBA", "LA", "RGBa", "La"):  # convert("RGBA") applies a palette's transparency
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path):
    """Decode fully (so truncated files fail here, not later), apply EXIF rotation, convert to RGB."""
    from PIL import Image, ImageOps
    with Image.open(path) as im:
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


def read_image(path, size, where=""):
    """One image for a model: decoded, shortest side to size, centre crop (eval_transform); an unreadable
    file is a UserError naming it and `where` (e.g. the file:line that asked for it)."""
    try:
        return eval_transform(size)(load_image(path))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on broken files
        at = f"{where}: " if where else ""
        raise UserError(f"{at}cannot decode the image {path} ({type(e).__name__}: {e})") from None


def _list_images(root):
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out += [os.path.join(d, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS)]
    return out


class _ImageFiles(torch.utils.data.Dataset):
    """Shared logic: a list of (path, caption, label), a header check at construction (or a full
    decode with verify=True), and at load time a file that still fails is replaced by the next good
    one. Every skip is counted; the first is printed with the count, not one line per file."""

    def _check(self, items, where, verify, dropped):
        from PIL import Image
        good, bad = [], []
        for it in items:
            try:
                if verify:
                    load_image(it[0])
                else:
                    Image.open(it[0]).close()  # the header only
                good.append(it)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on broken files
                bad.append((it[0], e))
        name = type(self).__name__
        if bad or dropped:
            p, e = bad[0] if bad else (None, None)
            print(f"{name}: skipped {len(bad) + dropped} of {len(items) + dropped} files under {where}"
                  + (f" ({len(bad)} do not decode, e.g. {p}: {e})" if bad else "")
                  + (f" ({dropped} without caption or file)" if dropped else ""))
        if not good:
            raise UserError(f"{name}: no usable images found in {where} (looked for files ending in "
                            f"{', '.join(IMAGE_EXTS)}{self._looked_for}); {len(bad)} failed to decode")
        self.items, self.n_skipped, self.where = good, len(bad) + dropped, where
        self._bad = set()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if not 0 <= i < len(self.items):
            raise IndexError(f"{type(self).__name__} index {i} out of range (length {len(self.items)})")
        for k in range(len(self.items)):
            j = (i + k) % len(self.items)
            if j in self._bad:
                continue
            path, cap, label = self.items[j][:3]
            try:
                img = load_image(path)
            except Exception as e:
                self._bad.add(j)
                if len(self._bad) == 1:
                    print(f"{type(self).__name__}: {path} failed to decode ({e}); replaced by the next "
                          f"image, later failures only counted in .n_failed")
                continue
            x = self.transform(img) if self.transform is not None else to_tensor(img)
            qa = self.items[j][3] if len(self.items[j]) > 3 else []
            item = dict(image=x, caption=cap, index=i, qa=qa, objects=[], path=path)
            if label is not None:
                item["label"] = label
            return item
        raise UserError(f"{type(self).__name__}: no image under {self.where} decodes")

    @property
    def n_failed(self):
        return len(self._bad)


class ImageFolderDataset(_ImageFiles):
    """root/<class>/**/<image>: label = index of the class folder in sorted order (like torchvision's
    ImageFolder), caption = the class name with '_' as spaces. transform: PIL -> tensor; without one
    the image is returned at its own size."""
    _looked_for = " in class subfolders"

    def __init__(self, root, transform=None, verify=False):
        if not os.path.isdir(root):
            raise UserError(f"ImageFolderDataset: {root!r} is not a directory")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        items = []
        for label, c in enumerate(classes):
            items += [(p, c.replace("_", " "), label) for p in _list_images(os.path.join(root, c))]
        self.classes, self.transform, self.root = classes, transform, root
        self._check(items, root, verify, 0)

    def class_names(self, path=""):
        """Zero-shot names, one per class folder: the lines of `path`, ImageNet's (data/imagenet_classes.txt,
        OpenAI's order = the sorted synset folders n01440764 ...) for 1000 folders, else the folder names."""
        imagenet = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "imagenet_classes.txt")
        names = read_lines(path or imagenet, "classnames") if path or len(self.classes) == 1000 else \
            [c.replace("_", " ") for c in self.classes]
        if len(names) != len(self.classes):
            raise UserError(f"classnames: {len(names)} names for {len(self.classes)} class folders in {self.root}")
        return names


def read_jsonl(path, with_qa=False):
    """The JSONL reader of every trainer: one {"image": path, "caption": text} per line (with_qa: also
    "qa": [[question, answer], ...], and a caption OR questions suffice), image paths relative to the
    file. Every record is checked here, before any work, and a wrong one is a UserError naming file:line
    (a null caption must not train as the text "None"). -> list of dicts: image (absolute path), caption
    (str, stripped; "" when absent), qa (list of [q, a]), where (file:line). Whether the image file exists
    and decodes is the caller's skip-and-count (_ImageFiles), as for folders."""
    need = "'image' and a 'caption' and/or 'qa' list" if with_qa else "keys 'image' and 'caption'"
    base, out = os.path.dirname(os.path.abspath(path)), []
    for where, rec in read_jsonl_records(path, need):
        if "image" not in rec or not ("caption" in rec or with_qa and "qa" in rec):
            raise UserError(f"{where} needs {need}, got {json.dumps(rec)[:80]}")
        if not isinstance(rec["image"], str) or not rec["image"]:
            raise UserError(f"{where}: 'image' must be a file path (a string), got {rec['image']!r}")
        cap = rec.get("caption", "")
        if not isinstance(cap, str):
            raise UserError(f"{where}: 'caption' must be a string, got {cap!r}")
        qa = rec.get("qa", []) if with_qa else []
        if not isinstance(qa, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 and
                                               all(isinstance(t, str) for t in p) for p in qa):
            raise UserError(f"{where}: 'qa' must be a list of [question, answer] string pairs, got "
                            f"{json.dumps(qa)[:80]}")
        out.append(dict(image=os.path.join(base, rec["image"]), caption=cap.strip(), qa=[list(p) for p in qa],
                        where=where))
    return out


class ImageCaptionDataset(_ImageFiles):
    """Image-caption pairs from a folder (every image with a same-name .txt caption next to it,
    searched recursively) or from a JSONL file (read_jsonl: checked record by record, naming file and
    line). Pairs without a caption or image file are skipped and counted, as are images that do not
    decode. with_qa (train_mllm): JSONL records may carry "qa" and need a caption or questions; items
    carry "qa"."""
    _looked_for = " with same-name .txt captions, or a .jsonl of {image, caption}"

    def __init__(self, source, transform=None, verify=False, with_qa=False):
        self.transform = transform
        items, dropped = [], 0
        if os.path.isdir(source):
            for p in _list_images(source):
                txt = os.path.splitext(p)[0] + ".txt"
                cap = open(txt, encoding="utf-8", errors="replace").read().strip() if os.path.isfile(txt) else ""
                if cap and "\ufffd" not in cap:  # a caption that is not UTF-8 is skipped and counted, like a bad image
                    items.append((p, cap, None, []))
                else:
                    dropped += 1
        elif os.path.isfile(source) and source.endswith(".jsonl"):
            for r in read_jsonl(source, with_qa):
                if os.path.isfile(r["image"]) and (r["caption"] or r["qa"]):
                    items.append((r["image"], r["caption"], None, r["qa"]))
                else:
                    dropped += 1
        else:
            raise UserError(f"ImageCaptionDataset: {source!r} is neither a directory nor a .jsonl file")
        self._check(items, source, verify, dropped)


def _int_arg(argv, i, name, default):
    """Command-line integer i (>= 1) of `python data.py ...`, named in the error when it is not one."""
    try:
        n = int(argv[i]) if len(argv) > i else default
    except ValueError:
        raise UserError(f"{name} must be an integer, got {argv[i]!r} (python data.py [N] | export DIR [N] [SIZE])") from None
    if n < 1:
        raise UserError(f"{name}={n}: need at least 1")
    return n


def main(argv):
    import time
    positional_help(argv, __name__, {
        "[N]": "three train samples of the shapes world and its sampling speed on N val renders (default 1000)",
        "export DIR [N] [SIZE]": f"N (default 16) held-out val PNGs of SIZE px (default {ShapesConfig.image_size}; the "
        "tokenizer's image_size: nothing is resampled), same-name .txt captions, captions.txt, questions.jsonl"})
    if argv and argv[0] == "export":
        if len(argv) < 2:
            raise UserError("usage: python data.py export DIR [N] [SIZE]")
        out, n, size = argv[1], _int_arg(argv, 2, "N", 16), _int_arg(argv, 3, "SIZE", ShapesConfig.image_size)
        world, caps, qs = ShapesWorld(ShapesConfig(image_size=size)), [], []
        with hold_folder(out):
            for i in range(n):
                s = world.sample("val", i)
                caps.append(s["caption"] + "\n")
                save_png(s["image"], os.path.join(out, f"val_{i:04d}.png"))
                atomic_write(os.path.join(out, f"val_{i:04d}.txt"), lambda f: f.write(caps[-1].encode()))
                qs += [json.dumps({"image": f"val_{i:04d}.png", "question": q, "answer": a}) + "\n" for q, a in s["qa"]]
            atomic_write(os.path.join(out, "captions.txt"), lambda f: f.write("".join(caps).encode()))
            atomic_write(os.path.join(out, "questions.jsonl"), lambda f: f.write("".join(qs).encode()))
        print(f"wrote {n} held-out val images, captions and questions to {out}")
        return
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]} (python data.py [N] | export DIR [N] [SIZE])")
    n = _int_arg(argv, 0, "N", 1000)
    world = ShapesWorld(ShapesConfig())
    for i in range(3):
        s = world.sample("train", i)
        print(f"{s['caption']!r}\n  " + "; ".join(f"{q} {a}" for q, a in s["qa"]))
    t0 = time.perf_counter()
    for i in range(n):
        world.sample("val", i)
    print(f"sample(): {n / (time.perf_counter() - t0):.0f} samples/s (render + caption + qa)")


if __name__ == "__main__":
    run_main(main)
