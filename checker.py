"""
The shapes world's checker: read an image back with plain array code (no model), so that every
generated image gets an objective score. `describe` finds the objects of an image, `objects_match`
compares them with the objects a caption asked for, `score_images` does both for a batch. The same cell
geometry, forward: `patch_objects` / `ground_words` say which object each patch of a render shows.

Why plain array code: a learned judge would share the failure modes of the models it judges. The world
has no anti-aliasing and no noise, so colour (by hue), shape (by template fit in the bounding box),
size and cell are all recoverable from a clean render (tests/test_data.py requires every attribute right
on >= 99 % of clean renders and >= 97 % with blur and noise; `python checker.py 1000` measures each case).
"""
import itertools

import numpy as np

from configurator import UserError, positional_help, run_main
from data import CELLS, COLORS, FILL, RADIUS, SHAPES, ShapesConfig, ShapesWorld, _int_arg, _shape_mask

ATTRS = ("color", "shape", "size", "cell")  # what objects_match compares


def _hue_chroma(rgb):
    """Hue in degrees [0, 360) and chroma (max - min channel) of float RGB (..., 3)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = mx - mn
    cs = np.where(c > 0, c, 1.0)
    h = np.where(mx == r, (g - b) / cs % 6.0, np.where(mx == g, (b - r) / cs + 2.0, (r - g) / cs + 4.0))
    return h * 60.0 % 360.0, c


def _components(cls):
    """4-connected components of equal non-negative values of cls (H, W); returns labels (H, W) where
    each pixel holds the flat index of its component's first pixel, background = H*W. Min-label
    propagation with pointer jumping: plain numpy, a few dozen vectorised steps on a 64x64 image."""
    H, W = cls.shape
    N = H * W
    lab = np.where(cls >= 0, np.arange(N).reshape(H, W), N)
    sh = (cls[:, 1:] == cls[:, :-1]) & (cls[:, 1:] >= 0)  # (H, W-1) horizontal links
    sv = (cls[1:, :] == cls[:-1, :]) & (cls[1:, :] >= 0)  # (H-1, W) vertical links
    while True:
        m = lab.copy()
        m[:, 1:] = np.where(sh, np.minimum(m[:, 1:], lab[:, :-1]), m[:, 1:])
        m[:, :-1] = np.where(sh, np.minimum(m[:, :-1], lab[:, 1:]), m[:, :-1])
        m[1:, :] = np.where(sv, np.minimum(m[1:, :], lab[:-1, :]), m[1:, :])
        m[:-1, :] = np.where(sv, np.minimum(m[:-1, :], lab[1:, :]), m[:-1, :])
        flat = m.reshape(-1)
        fg = flat < N
        flat[fg] = flat[flat[fg]]  # pointer jumping: a label is a pixel of the same component
        if np.array_equal(m, lab):
            return lab
        lab = m


def describe(image, shapes=SHAPES, min_area=0.004, details=False):
    """Read the objects back from an image: list of dict(color, shape, size, cell) in cell order.

    image: uint8 (H, W, 3) (a float array in [0, 255] also works). Steps:
    1. foreground = pixels whose hue is within 20 degrees of a palette colour and whose chroma is at
       least half of that colour's chroma. Hue, not RGB distance, because a blurred edge is a blend
       with a near-grey background: the blend keeps its hue, but in RGB a red/white blend lies closer
       to orange than to red. Half the chroma is the 50 % blend point, so blur does not grow areas.
    2. 4-connected components per colour; components under `min_area` * H * W pixels are dropped
       (noise, stray edge pixels).
    3. shape = the template (circle, square, triangle, ...) fitted to the component's bounding box with
       the highest IoU. For crisp renders this is the bounding-box fill ratio test (circle ~0.785,
       square 1, triangle 0.5) made robust: a blurred triangle's fill drifts towards a circle's, its
       IoU with the triangle template does not (apex erosion is handled by taller clipped triangles).
    4. size from the area: sqrt(area / fill of the shape) is the box side; threshold at the geometric
       mean of the small and large sides.
    5. cell from the centroid on the 3x3 grid.
    details=True adds area, bbox (x0, y0, x1, y1), iou and centroid to each dict."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"describe: image must be (H, W, 3), got shape {img.shape}")
    H, W = img.shape[:2]
    names = list(COLORS)
    pal = np.array([COLORS[c] for c in names], np.float32)  # (6, 3)
    pal_h, pal_c = _hue_chroma(pal)
    h, c = _hue_chroma(img.astype(np.float32))  # (H, W) each
    dh = np.abs(h[..., None] - pal_h)  # (H, W, 6)
    dh = np.minimum(dh, 360.0 - dh)
    k = dh.argmin(-1)  # (H, W) nearest palette hue
    fg = (dh.min(-1) <= 20.0) & (c >= 0.5 * pal_c[k]) & (c >= 40.0)
    cls = np.where(fg, k, -1)
    lab = _components(cls)
    ids, counts = np.unique(lab[lab < H * W], return_counts=True)
    S = float(np.sqrt(H * W))
    thr = 2.0 * S * np.sqrt(RADIUS["small"] * RADIUS["large"])
    out = []
    for i, area in zip(ids.tolist(), counts.tolist()):
        if area < min_area * H * W:
            continue
        ys, xs = np.nonzero(lab == i)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        comp = lab[y0:y1 + 1, x0:x1 + 1] == i  # (h, w) mask in the box
        gy, gx = np.mgrid[y0:y1 + 1, x0:x1 + 1].astype(np.float32) + 0.5
        cx, cy, rx, ry = (x0 + x1 + 1) / 2.0, (y0 + y1 + 1) / 2.0, (x1 - x0 + 1) / 2.0, (y1 - y0 + 1) / 2.0
        ious = []
        for s in shapes:
            best = 0.0
            # blur erodes a triangle's apex first (a small one becomes a trapezoid): also try
            # triangles whose apex lies up to half the box height above the box, clipped to the box
            for e in range(int(ry) + 1) if s == "triangle" else (0,):
                t = _shape_mask(s, gx, gy, cx, cy - e / 2.0, rx, ry + e / 2.0)
                best = max(best, (t & comp).sum() / max((t | comp).sum(), 1))
            ious.append(best)
        shape = shapes[int(np.argmax(ious))]
        side = np.sqrt(area / FILL[shape])
        mx, my = xs.mean() + 0.5, ys.mean() + 0.5
        cell = 3 * min(int(my * 3 / H), 2) + min(int(mx * 3 / W), 2)
        d = dict(color=names[cls[ys[0], xs[0]]], shape=shape, size="large" if side > thr else "small",
                 cell=CELLS[cell])
        if details:
            d.update(area=area, bbox=(int(x0), int(y0), int(x1), int(y1)), iou=float(max(ious)),
                     centroid=(float(mx), float(my)))
        out.append(d)
    out.sort(key=lambda d: (CELLS.index(d["cell"]), d["color"], d["shape"]))
    return out


def score_images(images, objects):
    """The checker over a set: images uint8 (B, H, W, 3) (drawn or decoded), objects: each image's true
    objects. -> share of images with every object right (all_correct), per attribute (count, color, shape,
    size, cell: every true object's matched prediction right), share of true objects fully right, n."""
    ms = [objects_match(describe(im), truth) for im, truth in zip(images, objects)]
    res = {k: sum(bool(m[k]) for m in ms) / len(ms) for k in ("all_correct", "count") + ATTRS}
    res.update(objects_correct=sum(m["n_correct"] for m in ms) / max(sum(len(t) for t in objects), 1), n=len(ms))
    return res


def objects_match(pred, truth):
    """Order-free comparison of predicted and true objects (lists of dicts with ATTRS).
    Truth objects are matched one-to-one to predictions maximising the number of agreeing attributes.
    Returns dict: count (same number of objects), one bool per attribute (every true object's matched
    prediction has it right; an unmatched true object counts as wrong), n_correct (true objects with
    all four attributes right), all_correct (count and every attribute right)."""
    def score(a, b):
        return sum(a[k] == b[k] for k in ATTRS)

    n = min(len(pred), len(truth))
    best, best_perm = -1, ()
    if len(pred) <= 8:
        for perm in itertools.permutations(range(len(pred)), n):  # perm[i] = pred matched to truth i
            s = sum(score(pred[p], truth[i]) for i, p in enumerate(perm))
            if s > best:
                best, best_perm = s, perm
    else:  # many spurious components: greedy, still one-to-one
        used, best_perm = set(), []
        for t in truth[:n]:
            p = max((j for j in range(len(pred)) if j not in used), key=lambda j: score(pred[j], t))
            used.add(p)
            best_perm.append(p)
    pairs = [(truth[i], pred[p]) for i, p in enumerate(best_perm)]
    full = len(pairs) == len(truth)
    res = dict(count=len(pred) == len(truth))
    for k in ATTRS:
        res[k] = full and all(t[k] == p[k] for t, p in pairs)
    res["n_correct"] = sum(all(t[k] == p[k] for k in ATTRS) for t, p in pairs)
    res["all_correct"] = res["count"] and all(res[k] for k in ATTRS)
    return res


# ----------------------------------------------------------------------------------------------------
# where each object lies, per patch: the targets of the MLLM's gen_ground_loss (train_mllm.py)

def patch_objects(objects, grid):
    """(grid * grid,) list: for each patch in raster order, the index of the shapes-world object whose cell
    holds it, or -1 (background). A cell is exactly (grid / 3)^2 patches, so grid must be a multiple of 3
    (the shapes preset: 48 px, patch 8, grid 6); every object stays inside its cell (data.py)."""
    if grid % 3:
        raise ValueError(f"patch_objects: the patch grid {grid} does not split into 3x3 cells")
    where = {CELLS.index(o["cell"]): i for i, o in enumerate(objects)}
    g = grid // 3
    return [where.get(3 * (r // g) + c // g, -1) for r in range(grid) for c in range(grid)]


def ground_words(rec, text_tok, grid):
    """(P, W) int64, -1 padded: each patch's object words ("small red circle"; none for background), the
    targets of gen_ground_loss. Needs the record's objects (the shapes world writes them)."""
    if "objects" not in rec:
        raise UserError("gen_ground_loss needs each record's objects (cell, size, color, shape): the shapes "
                        "world writes them, a JSONL does not")
    words = [text_tok.encode(f"{o['size']} {o['color']} {o['shape']}") for o in rec["objects"]]
    W = max([len(w) for w in words], default=1)
    out = np.full((grid * grid, W), -1, dtype=np.int64)
    for p, i in enumerate(patch_objects(rec["objects"], grid)):
        if i >= 0:
            out[p, :len(words[i])] = words[i]
    return out


def main(argv):
    # here, not in data.py, which must not import this file
    import time
    positional_help(argv, __name__, {"[N]": "describe's accuracy on N val renders (default 1000), clean and mildly "
                                            "degraded: the numbers behind the README's row"})
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]} (python checker.py [N])")
    n = _int_arg(argv, 0, "N", 1000)
    if n < 1:
        raise UserError(f"N={n}: need at least 1 image")
    world = ShapesWorld(ShapesConfig())
    samples = [world.sample("val", i) for i in range(n)]

    def blur(x):  # separable [1, 2, 1] / 4, edge padded
        p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
        H, W, k = x.shape[0], x.shape[1], (0.25, 0.5, 0.25)
        return sum(k[a] * k[b] * p[a:a + H, b:b + W] for a in range(3) for b in range(3))

    rng = np.random.default_rng(0)
    for name, f in (("clean", lambda x: x), ("blur [1,2,1]", blur), ("blur twice", lambda x: blur(blur(x))),
                    ("noise sd 10", lambda x: x + rng.normal(0, 10, x.shape)),
                    ("blur + noise sd 8", lambda x: blur(x) + rng.normal(0, 8, x.shape))):
        t0 = time.perf_counter()
        ok = sum(objects_match(describe(np.clip(f(s["image"].astype(np.float32)), 0, 255)), s["objects"])
                 ["all_correct"] for s in samples)
        print(f"describe, {name:18s}: all attributes right on {ok / n:.3f} of {n} val images "
              f"({n / (time.perf_counter() - t0):.0f} images/s)")


if __name__ == "__main__":
    run_main(main)
