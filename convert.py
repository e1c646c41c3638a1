"""
The authors' released DualToken checkpoint: their config.json and state_dict names -> ours.

    python convert.py CKPT OUT_DIR     # CKPT: their folder, .pt or .safetensors -> our safetensors folder

Their release (design §1) keeps SigLIP under `siglip_model.` in Hugging
Face names (q/k/v separate, fused here by name), one codebook per depth with a padding row, and a config.json
whose SigLIP path is absolute on their machine. Everything else already has our names (tokenizer.py mirrors
their modules). `load_dualtoken` takes either checkpoint, which is what the scripts' --tokenizer accepts.
"""
import json
import os

import torch

from configurator import UserError, positional_help, run_main
from folders import MODEL_MARKERS, check_outputs, hold_folder
from siglip import SigLIPConfig
from tokenizer import (DecoderConfig, DualToken, DualTokenConfig, QuantizerConfig, checkpoint_files,
                       default_config, read_weights)

# -----------------------------------------------------------------------------
# config


# authors' config.json keys read below in their own way (pretrained_model, bottleneck_type, hidden_size,
# latent_shape, code_shape are cross-checked) or that do not change the model: HF bookkeeping, the
# gradient-checkpointing switch, init-from-checkpoint paths, and taming encoder settings (no encoder here).
_AUTHOR_IGNORED = {"architectures", "model_type", "torch_dtype", "transformers_version", "_name_or_path",
                   "checkpointing", "ignore_keys", "ckpt_path", "latent_shape", "code_shape", "hidden_size",
                   "double_z", "in_channels", "pretrained_model", "bottleneck_type"}


def _check_author_keys(d, known, where):
    unknown = sorted(set(d) - set(known) - _AUTHOR_IGNORED)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}, "
                         f"ignored bookkeeping: {sorted(_AUTHOR_IGNORED)}")


def config_from_authors(raw, siglip_config):
    """DualTokenConfig from the authors' config.json (dict, outer wrapper or the "rqvaesiglip" entry)."""
    c = raw.get("rqvaesiglip", raw)
    if c is not raw:
        _check_author_keys({k: v for k, v in raw.items() if k != "rqvaesiglip"}, [], "config.json (outer)")
    _check_author_keys(c, ["layer_recon", "layer_sem", "layer_shortcut", "weight_shortcut", "ddconfig",
                           "decoder_latent_shape", "vq_sem", "vq_pix"], "config.json rqvaesiglip")
    v = siglip_config.vision
    grid = v.image_size // v.patch_size
    if c.get("hidden_size", v.hidden_size) != v.hidden_size:
        raise ValueError(f"config.json hidden_size {c['hidden_size']} != SigLIP width {v.hidden_size}")

    def vq(q, name):
        _check_author_keys(q, ["n_embed", "embed_dim", "decay", "shared_codebook", "restart_unused_codes"],
                           f"config.json {name}")
        *hw, depth = q["code_shape"]
        if tuple(hw) != (grid, grid) or tuple(q.get("latent_shape", [grid, grid, q["embed_dim"]])) != \
                (grid, grid, q["embed_dim"]):
            raise ValueError(f"config.json {name}: code_shape {q['code_shape']} / latent_shape "
                             f"{q.get('latent_shape')} do not match the SigLIP grid {grid}x{grid}")
        kind = {"rq": "per_depth", "rq_ema": "deferred"}.get(q.get("bottleneck_type", "rq"))
        if kind is None:
            raise ValueError(f"config.json {name}: unknown bottleneck_type {q['bottleneck_type']!r}")
        return QuantizerConfig(codebook_size=q["n_embed"], code_dim=q["embed_dim"], depth=depth,
                               shared_codebook=q.get("shared_codebook", True), decay=q.get("decay", 0.99),
                               restart_unused=q.get("restart_unused_codes", True), ema_update=kind)

    dd = c["ddconfig"]
    _check_author_keys(dd, ["ch", "ch_mult", "num_res_blocks", "attn_resolutions", "decoder_in_channels",
                            "out_ch", "resolution", "dropout"], "config.json ddconfig")
    dec = DecoderConfig(ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                        attn_resolutions=tuple(dd["attn_resolutions"]), latent_channels=dd["decoder_in_channels"],
                        out_ch=dd.get("out_ch", 3), resolution=dd["resolution"], dropout=dd.get("dropout", 0.0))
    lat = c.get("decoder_latent_shape")
    return DualTokenConfig(siglip=siglip_config, layer_recon=c["layer_recon"], layer_sem=c["layer_sem"],
                           layer_shortcut=c.get("layer_shortcut"), weight_shortcut=c.get("weight_shortcut", 0.6),
                           vq_pix=vq(c["vq_pix"], "vq_pix"), vq_sem=vq(c["vq_sem"], "vq_sem"),
                           decoder_latent_shape=tuple(lat) if lat is not None else None, decoder=dec)


def _so400m(image_size, patch_size):
    from siglip import SigLIPTextConfig, SigLIPVisionConfig
    v = SigLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=1152,
                           intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
    t = SigLIPTextConfig(vocab_size=256000, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                         num_attention_heads=16, max_position_embeddings=64, projection_size=1152)
    return SigLIPConfig(vision=v, text=t)


def released_config(size):
    """The two releases. 384: SigLIP2-So400m/14, 27x27 grid, depth 8, grid resized to 24x24 for the decoder.
    256: SigLIP2-So400m/16-256, 16x16 grid, depth 4, no resize. Codebooks 16384 x 32, shared by depths."""
    image_size, patch_size, depth = {384: (384, 14, 8), 256: (256, 16, 4)}[int(size)]
    return default_config(_so400m(image_size, patch_size), vq_pix=QuantizerConfig(depth=depth),
                          vq_sem=QuantizerConfig(depth=depth, ema_update="deferred"))

# -----------------------------------------------------------------------------
# weights


def authors_name_table(model):
    """[(our state_dict name, [authors' names])] for every tensor of `model` except the quantizer buffers,
    which change layout (see state_dict_from_authors). Several authors' names are concatenated on dim 0
    (fused q/k/v)."""
    t = [("siglip." + ours, ["siglip_model." + h for h in hfs]) for ours, hfs in model.siglip.hf_name_table()]
    t += [(k, [k]) for k in model.state_dict() if not k.startswith(("siglip.", "quantizer_"))]
    return t


def state_dict_from_authors(model, sd):
    """Authors' names -> ours for `model` (strict: every checkpoint key must be used; DualToken.load_weights
    checks the rest)."""
    sd = dict(sd)
    out, missing = {}, []
    for ours, theirs in authors_name_table(model):
        if all(k in sd for k in theirs):
            xs = [sd.pop(k) for k in theirs]
            out[ours] = xs[0] if len(xs) == 1 else torch.cat(xs, 0)
        else:
            missing += [k for k in theirs if k not in sd]
    for name in ("prequant_pix", "prequant_shortcut", "prequant_sem", "postquant_pix", "postquant_sem"):
        z = sd.pop(f"{name}.attn.zero_k_bias", None)  # a constant zero buffer in their code
        if z is not None and z.count_nonzero():
            raise ValueError(f"{name}.attn.zero_k_bias is not zero; this model has no k bias")
    sd = {k: x for k, x in sd.items() if not k.endswith("embeddings.position_ids")}  # old HF constant buffer
    fields = ("weight", "cluster_size_ema", "embed_ema")
    for q in ("quantizer_pix", "quantizer_sem"):
        rvq = getattr(model, q)
        found = [d for d in range(rvq.depth) if all(f"{q}.codebooks.{d}.{n}" in sd for n in fields)]
        # every depth, or for a shared book depth 0 alone (any de-duplicated form)
        if found != list(range(rvq.depth)) and not (rvq.shared_codebook and found[:1] == [0]):
            raise ValueError(f"missing quantizer weights: {q}.codebooks.{{0..{rvq.depth - 1}}}."
                             f"{{{','.join(fields)}}}, found complete depths {found}")
        books = [[sd.pop(f"{q}.codebooks.{d}.{n}") for n in fields] for d in found]
        for d, book in zip(found, books):
            if book[0].shape[0] != rvq.codebook_size + 1:  # the last row is padding, never searched
                raise ValueError(f"{q}.codebooks.{d}.weight: expected {rvq.codebook_size + 1} rows "
                                 f"({rvq.codebook_size} codes + 1 padding), got {tuple(book[0].shape)}")
            if rvq.shared_codebook:
                for n, x, x0 in zip(fields, book, books[0]):
                    if not torch.equal(x, x0):
                        raise ValueError(f"{q}.codebooks.{d}.{n} differs from codebooks.0 but the config "
                                         f"says shared_codebook=True")
        books = books[:1] if rvq.shared_codebook else books
        for n, xs in zip(("codebook", "cluster_size_ema", "embed_ema"), zip(*books)):
            out[f"{q}.{n}"] = torch.stack(xs) if len(xs) > 1 else xs[0].unsqueeze(0)  # (n_books, ...)
        out[f"{q}.codebook"] = out[f"{q}.codebook"][:, :-1]  # drop the padding row (a view)
    if sd or missing:
        raise UserError(f"the authors' checkpoint does not match the model: missing {missing}, "
                        f"unexpected {sorted(sd)}")
    return out


def is_authors(path):
    """True when the config.json of the checkpoint at `path` (folder or weights file) is the authors'."""
    folder, _ = checkpoint_files(path)
    with open(os.path.join(folder, "config.json")) as f:
        return "rqvaesiglip" in json.load(f)


def from_authors(path, siglip_config=None, dtype=torch.float32):
    """Load the authors' checkpoint (folder with config.json + model.pt or model.safetensors, or the weights
    file with config.json beside it) as a DualToken. siglip_config: a SigLIP folder or config.json when their
    `pretrained_model` path (absolute, on their machine) is not here. Memory as DualToken.from_pretrained:
    built on meta, `.pt` opened with mmap, every tensor assigned (fused q/k/v and dtype casts are the one
    new tensor built from the file's)."""
    folder, weights = checkpoint_files(path)
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    if "rqvaesiglip" not in raw:
        raise UserError(f"{folder}/config.json is not the authors' (no 'rqvaesiglip'): use DualToken.from_pretrained")
    sp = siglip_config or raw["rqvaesiglip"].get("pretrained_model")
    if sp is None:
        raise UserError(f"{folder}/config.json names no pretrained_model; pass siglip_config=")
    sp = sp if os.path.isabs(sp) else os.path.join(folder, sp)
    sp = os.path.join(sp, "config.json") if os.path.isdir(sp) else sp
    if not os.path.isfile(sp):
        raise UserError(f"SigLIP config {sp!r} (pretrained_model in {folder}/config.json) not found; "
                        f"pass siglip_config= a SigLIP folder or config.json")
    with open(sp) as f:
        cfg = config_from_authors(raw, SigLIPConfig.from_hf(json.load(f), where=sp))
    sd = read_weights(weights)
    if not any(k.startswith("siglip_model.text_model.") for k in sd):
        cfg.siglip = SigLIPConfig(vision=cfg.siglip.vision, text=None)  # vision-only release
    with torch.device("meta"):
        model = DualToken(cfg)
    model.load_weights(state_dict_from_authors(model, sd), dtype)
    return model.eval()


def load_dualtoken(path, siglip_config=None, dtype=torch.float32):
    """Either checkpoint: the authors' release (converted in memory, see from_authors) or our folder
    (DualToken.from_pretrained). siglip_config is used by the authors' release only."""
    if is_authors(path):
        return from_authors(path, siglip_config, dtype)
    return DualToken.from_pretrained(path, dtype)

# -----------------------------------------------------------------------------
# command line: python convert.py CKPT OUT_DIR


def main(argv):
    positional_help(argv, __name__, {"CKPT OUT_DIR": "the authors' checkpoint CKPT (their folder, .pt or .safetensors) "
                                     "-> our folder OUT_DIR (config.json + model.safetensors); an OUT_DIR that "
                                     "holds a model already is refused"})
    if len(argv) != 2:
        raise UserError("usage: python convert.py CKPT OUT_DIR   (CKPT: the authors' folder, .pt or .safetensors)")
    check_outputs([("CKPT", argv[0])], dirs=[("OUT_DIR", argv[1])])
    with hold_folder(argv[1]):
        found = [f for f in MODEL_MARKERS if os.path.exists(os.path.join(argv[1], f))]
        if found:
            raise UserError(f"OUT_DIR {argv[1]!r} already holds a model ({', '.join(found)}): choose another folder "
                            f"(or delete it yourself)")
        model = from_authors(argv[0])
        model.save_pretrained(argv[1])
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {argv[1]}/config.json and model.safetensors ({n / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    run_main(main)
