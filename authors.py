"""
The authors' released DualToken checkpoint read into this project's layout (design §1): their config.json
-> our DualToken config fields, their state_dict names -> ours. `DualToken.from_pretrained` calls it when a
folder's config.json is theirs; `python convert.py CKPT OUT_DIR` writes our folder once.

Their release keeps SigLIP under `siglip_model.` in Hugging Face names (q/k/v separate, fused here by name),
one codebook per depth with a padding row, and a config.json whose SigLIP path is absolute on their machine.
Everything else already has our names (tokenizer.py mirrors their modules). The functions here read plain
dicts and a model's names, so this file does not import tokenizer.py.
"""
import json
import os

import torch

from configurator import UserError
from siglip import SigLIPConfig

# authors' config.json keys read below in their own way (pretrained_model, bottleneck_type, hidden_size,
# latent_shape, code_shape are cross-checked) or that do not change the model: HF bookkeeping, the
# gradient-checkpointing switch, init-from-checkpoint paths, and taming encoder settings (no encoder here).
_IGNORED = {"architectures", "model_type", "torch_dtype", "transformers_version", "_name_or_path",
            "checkpointing", "ignore_keys", "ckpt_path", "latent_shape", "code_shape", "hidden_size",
            "double_z", "in_channels", "pretrained_model", "bottleneck_type"}


def is_theirs(raw):
    """True for the authors' config.json (as a dict)."""
    return "rqvaesiglip" in raw


def _check_their_keys(d, known, where):
    unknown = sorted(set(d) - set(known) - _IGNORED)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}, "
                         f"ignored bookkeeping: {sorted(_IGNORED)}")


def config_fields(raw, siglip_config):
    """The DualToken config fields (plain dicts, as our config.json holds them) of the authors' config.json
    (dict: the outer wrapper or its "rqvaesiglip" entry), checked against the SigLIP they name."""
    c = raw.get("rqvaesiglip", raw)
    if c is not raw:
        _check_their_keys({k: v for k, v in raw.items() if k != "rqvaesiglip"}, [], "config.json (outer)")
    _check_their_keys(c, ["layer_recon", "layer_sem", "layer_shortcut", "weight_shortcut", "ddconfig",
                    "decoder_latent_shape", "vq_sem", "vq_pix"], "config.json rqvaesiglip")
    v = siglip_config.vision
    grid = v.image_size // v.patch_size
    if c.get("hidden_size", v.hidden_size) != v.hidden_size:
        raise ValueError(f"config.json hidden_size {c['hidden_size']} != SigLIP width {v.hidden_size}")

    def vq(q, name):
        _check_their_keys(q, ["n_embed", "embed_dim", "decay", "shared_codebook", "restart_unused_codes"],
                    f"config.json {name}")
        *hw, depth = q["code_shape"]
        if tuple(hw) != (grid, grid) or tuple(q.get("latent_shape", [grid, grid, q["embed_dim"]])) != \
                (grid, grid, q["embed_dim"]):
            raise ValueError(f"config.json {name}: code_shape {q['code_shape']} / latent_shape "
                             f"{q.get('latent_shape')} do not match the SigLIP grid {grid}x{grid}")
        kind = {"rq": "per_depth", "rq_ema": "deferred"}.get(q.get("bottleneck_type", "rq"))
        if kind is None:
            raise ValueError(f"config.json {name}: unknown bottleneck_type {q['bottleneck_type']!r}")
        return dict(codebook_size=q["n_embed"], code_dim=q["embed_dim"], depth=depth,
                    shared_codebook=q.get("shared_codebook", True), decay=q.get("decay", 0.99),
                    restart_unused=q.get("restart_unused_codes", True), ema_update=kind)

    dd = c["ddconfig"]
    _check_their_keys(dd, ["ch", "ch_mult", "num_res_blocks", "attn_resolutions", "decoder_in_channels",
                     "out_ch", "resolution", "dropout"], "config.json ddconfig")
    dec = dict(ch=dd["ch"], ch_mult=dd["ch_mult"], num_res_blocks=dd["num_res_blocks"],
               attn_resolutions=dd["attn_resolutions"], latent_channels=dd["decoder_in_channels"],
               out_ch=dd.get("out_ch", 3), resolution=dd["resolution"], dropout=dd.get("dropout", 0.0))
    return dict(layer_recon=c["layer_recon"], layer_sem=c["layer_sem"], layer_shortcut=c.get("layer_shortcut"),
                weight_shortcut=c.get("weight_shortcut", 0.6), vq_pix=vq(c["vq_pix"], "vq_pix"),
                vq_sem=vq(c["vq_sem"], "vq_sem"), decoder_latent_shape=c.get("decoder_latent_shape"), decoder=dec)


def siglip_config(raw, folder, given=None, with_text=True):
    """The SigLIPConfig of the tower their checkpoint fine-tunes: `given` (a SigLIP folder or config.json) or
    the `pretrained_model` their config.json records (relative paths from `folder`). with_text=False: the
    vision tower only (a release without text weights)."""
    path = given or raw.get("rqvaesiglip", {}).get("pretrained_model")
    if path is None:
        raise UserError(f"{folder}/config.json names no pretrained_model; pass siglip_config=")
    path = path if os.path.isabs(path) else os.path.join(folder, path)
    path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise UserError(f"SigLIP config {path!r} (pretrained_model in {folder}/config.json) not found; "
                        f"pass siglip_config= a SigLIP folder or config.json")
    with open(path) as f:
        cfg = SigLIPConfig.from_hf(json.load(f), where=path)
    return cfg if with_text else SigLIPConfig(vision=cfg.vision, text=None)


def has_text(sd):
    """True when their state_dict holds the SigLIP text tower."""
    return any(k.startswith("siglip_model.text_model.") for k in sd)


def authors_name_table(model):
    """[(our state_dict name, [authors' names])] for every tensor of a DualToken `model` except the quantizer
    buffers, which change layout (see state_dict_from_authors). Several authors' names are concatenated on
    dim 0 (fused q/k/v)."""
    t = [("siglip." + ours, ["siglip_model." + h for h in hfs]) for ours, hfs in model.siglip.hf_name_table()]
    t += [(k, [k]) for k in model.state_dict() if not k.startswith(("siglip.", "quantizer_"))]
    return t


def state_dict_from_authors(model, sd):
    """Authors' names -> ours for a DualToken `model` (strict: every checkpoint key must be used;
    DualToken.load_weights checks the rest)."""
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
