"""
The code cache train_mllm.py trains on: the frozen image tokenizer runs once over the data (prepare_cache,
every rank its shard under torchrun), and training reads the codes memory-mapped (CodeCache), stamped with the
tokenizer's hash and the data's settings (cache_meta) so a cache from another tokenizer or data is refused.
"""
import json
import os

import numpy as np
import torch

from codec import image_codes, two_vocabularies
from configurator import UserError


def source_split(cfg, split, R):
    """-> (n, item(i) -> (record dict with caption / qa (/ objects for shapes), image (3, R, R) tensor)).
    cfg: train_mllm's config (data, eval_data, max_objects, seed, holdout_pairs, detail_qa, train_size, eval_size)."""
    import data
    if cfg.data == "shapes":
        world = data.ShapesWorld(data.ShapesConfig(image_size=R, max_objects=cfg.max_objects, seed=cfg.seed,
                                                   detail_qa=cfg.detail_qa,
                                                   holdout_pairs=tuple(tuple(p) for p in cfg.holdout_pairs)))

        def item(i):
            s = world.sample(split, i)
            rec = dict(caption=s["caption"], qa=[list(p) for p in s["qa"]], objects=s["objects"])
            return rec, data.to_tensor(s["image"])
        return (cfg.train_size if split == "train" else cfg.eval_size), item
    path = cfg.data if split == "train" else cfg.eval_data
    if not path or not path.endswith(".jsonl") or not os.path.isfile(path):
        raise UserError(f"{'data' if split == 'train' else 'eval_data'}={path!r}: expected 'shapes' or a .jsonl")
    # the trainers' one JSONL reader: every record checked up front (file:line), missing / undecodable
    # images skipped and counted; one that fails later is replaced by the next good record, with its text
    ds = data.ImageCaptionDataset(path, data.eval_transform(R), with_qa=True)

    def item(i):
        it = ds[i]
        return dict(image=it["path"], caption=it["caption"], qa=it["qa"]), it["image"]
    return len(ds), item


def cache_meta(cfg, image_tok, thash):
    q, two = image_tok.config, two_vocabularies(image_tok)
    return dict(tokenizer_hash=thash, grid=q.grid, pix_depth=q.vq_pix.depth, sem_depth=q.vq_sem.depth if two else None,
                pix_vocab=q.vq_pix.codebook_size, sem_vocab=q.vq_sem.codebook_size if two else None,
                data=dict(data=cfg.data, eval_data=cfg.eval_data, max_objects=cfg.max_objects, seed=cfg.seed,
                          **({"detail_qa": True} if cfg.detail_qa else {}),  # absent when off: older caches stay valid
                          holdout_pairs=[list(p) for p in cfg.holdout_pairs],
                          train_size=cfg.train_size if cfg.data == "shapes" else None,
                          eval_size=cfg.eval_size if cfg.data == "shapes" else None))


def _codes_file(path, dt, shape):
    return np.lib.format.open_memmap(path, "w+", dt, shape)


@torch.no_grad()
def prepare_cache(cfg, image_tok, thash, folder, device, ctx=None, verbose=True):
    """Encode every image once -> the cache in `folder` (train_mllm.py's cache_dir); every rank calls it.
    Under torchrun (ctx.ddp) rank r encodes the contiguous shard [n*r/W, n*(r+1)/W) of each split into
    its own files and rank 0 merges them in rank order, so the build takes 1/W of the time and no rank
    waits in a barrier for the whole encode (a real-size build exceeds the NCCL timeout). The cache is
    built in `folder`/.building and moved in when complete: the old meta.json removed, the files renamed
    (same filesystem: atomic each), the new meta.json last. A reader (CodeCache needs meta.json) sees a
    finished cache or none, never a half-written one: a crash during a --prepare=True rebuild leaves the old
    cache whole, not the old meta.json beside new zero-filled code arrays (which would pass every check). Only cache files are touched, so cache_dir may be any folder. -> meta (sizes on rank 0)."""
    import shutil
    import time
    import train_utils as tu
    ddp = ctx is not None and ctx.ddp
    rank, world = (ctx.rank, ctx.world) if ddp else (0, 1)
    barrier = torch.distributed.barrier if ddp else (lambda: None)
    tmp = os.path.join(folder, ".building")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a build that crashed before
        os.makedirs(tmp)
    barrier()
    meta = cache_meta(cfg, image_tok, thash)
    R, P = image_tok.config.siglip.vision.image_size, meta["grid"] ** 2
    big = max(meta["pix_vocab"], meta["sem_vocab"] or 0) > np.iinfo(np.int16).max
    dt = np.int32 if big else np.int16
    depth = dict(pix=meta["pix_depth"], **({"sem": meta["sem_depth"]} if meta["sem_depth"] else {}))
    splits = ("train", "val") if cfg.data == "shapes" or cfg.eval_data else ("train",)
    t0 = time.time()
    sizes = {}
    for split in splits:
        n, item = source_split(cfg, split, R)
        lo, hi = n * rank // world, n * (rank + 1) // world
        part = os.path.join(tmp, f"{split}.rank{rank}")
        out = {k: _codes_file(f"{part}_{k}.npy", dt, (hi - lo, P, d)) for k, d in depth.items()}
        recs = []
        for s in range(lo, hi, cfg.prepare_batch):
            idx = range(s, min(s + cfg.prepare_batch, hi))
            got = [item(i) for i in idx]
            recs += [r for r, _ in got]
            x = torch.stack([im for _, im in got]).to(device)
            codes = dict(zip(("pix", "sem"), image_codes(image_tok, x)))  # (B, P, D) each, raster order, fp32
            for k, a in out.items():
                a[s - lo:s - lo + len(idx)] = codes[k].cpu().numpy().astype(dt)
        for a in out.values():
            a.flush()
        del out
        with open(f"{part}_index.json", "w") as f:
            json.dump(recs, f)
        sizes[split] = n
    barrier()  # every shard written
    if rank == 0:
        for split, n in sizes.items():
            recs = []
            for k, d in depth.items():
                full, off = _codes_file(os.path.join(tmp, f"{split}_{k}.npy"), dt, (n, P, d)), 0
                for r in range(world):
                    a = np.load(os.path.join(tmp, f"{split}.rank{r}_{k}.npy"), mmap_mode="r")
                    full[off:off + len(a)] = a
                    off += len(a)
                full.flush()
                del full
            for r in range(world):
                with open(os.path.join(tmp, f"{split}.rank{r}_index.json")) as f:
                    recs += json.load(f)
                for k in (*depth, "index"):
                    ext = "json" if k == "index" else "npy"
                    os.remove(os.path.join(tmp, f"{split}.rank{r}_{k}.{ext}"))
            if len(recs) != n:
                raise RuntimeError(f"code cache {split}: {len(recs)} records merged, expected {n}")
            with open(os.path.join(tmp, f"{split}_index.json"), "w") as f:
                json.dump(recs, f)
            meta[f"{split}_size"] = n
            if verbose:
                print(f"cache: {split} {n} images encoded on {world} process(es) ({time.time() - t0:.0f} s)")
        tu.write_json(meta, os.path.join(tmp, "meta.json"))
        if os.path.exists(os.path.join(folder, "meta.json")):
            os.remove(os.path.join(folder, "meta.json"))  # from here until the last replace: no cache
        for name in sorted(os.listdir(tmp), key=lambda f: f == "meta.json"):  # meta.json last
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        os.rmdir(tmp)
    barrier()  # the cache is in place for every rank
    return meta


class CodeCache:
    """Read side of the cache: pix / sem memory-mapped (N, P, D) arrays and the records of one split (sem is
    None for a one-vocabulary tokenizer)."""

    def __init__(self, folder, split, expect):
        path = os.path.join(folder, "meta.json")
        if not os.path.isfile(path):
            raise UserError(f"no code cache in {folder} (no meta.json): run with --prepare=True")
        with open(path) as f:
            meta = json.load(f)
        if meta["tokenizer_hash"] != expect["tokenizer_hash"]:
            raise UserError(f"code cache {folder} was made by tokenizer {meta['tokenizer_hash']}, the configured "
                            f"tokenizer is {expect['tokenizer_hash']}: delete the cache or run --prepare=True")
        diff = {k: (meta.get(k), v) for k, v in expect.items() if meta.get(k) != v}
        if diff:
            raise UserError(f"code cache {folder} does not match this run (cache, run): {diff}; "
                            f"run --prepare=True to rebuild it")
        if f"{split}_size" not in meta:
            raise UserError(f"code cache {folder} has no {split!r} split")
        self.pix = np.load(os.path.join(folder, f"{split}_pix.npy"), mmap_mode="r")
        self.sem = np.load(os.path.join(folder, f"{split}_sem.npy"), mmap_mode="r") if meta["sem_depth"] else None
        with open(os.path.join(folder, f"{split}_index.json")) as f:
            self.records = json.load(f)
        n = meta[f"{split}_size"]
        n_sem = len(self.pix) if self.sem is None else len(self.sem)
        if not (len(self.pix) == n_sem == len(self.records) == n):
            raise UserError(f"code cache {folder}/{split}: {len(self.pix)} pix, {n_sem} sem, "
                            f"{len(self.records)} records, meta says {n}")
        if split == "train" and n == 0:
            raise UserError(f"code cache {folder}: the train split has no images")

    def __len__(self):
        return len(self.records)
