"""
The authors' released DualToken checkpoint -> our folder, once:

    python convert.py CKPT OUT_DIR     # CKPT: their folder, .pt or .safetensors -> our safetensors folder

`DualToken.from_pretrained` reads their release directly (authors.py translates their config.json and names,
design §1); this file writes it in our layout. Also here: shorthands for loading (`from_authors`: their release
only; `load_dualtoken`: either) and the two released recipes (`released_config`).
"""
import json
import os

import torch

from authors import authors_name_table, state_dict_from_authors  # noqa: F401  (convert.state_dict_from_authors)
from authors import config_fields, is_theirs
from configurator import UserError, positional_help, run_main
from folders import MODEL_MARKERS, check_outputs, hold_folder
from siglip import SigLIPConfig
from tokenizer import DualToken, QuantizerConfig, checkpoint_files, config_from_fields, default_config

# -----------------------------------------------------------------------------
# the authors' release


def config_from_authors(raw, siglip_config):
    """DualTokenConfig from the authors' config.json (dict, outer wrapper or the "rqvaesiglip" entry)."""
    return config_from_fields(config_fields(raw, siglip_config), siglip_config)


def is_authors(path):
    """True when the config.json of the checkpoint at `path` (folder or weights file) is the authors'."""
    folder, _ = checkpoint_files(path)
    with open(os.path.join(folder, "config.json")) as f:
        return is_theirs(json.load(f))


def from_authors(path, siglip_config=None, dtype=torch.float32):
    """The authors' checkpoint (folder with config.json + model.pt or model.safetensors, or the weights file
    with config.json beside it) as a DualToken; refuses our own folders. See DualToken.from_pretrained."""
    if not is_authors(path):
        raise UserError(f"{path!r}: its config.json is not the authors' (no 'rqvaesiglip'): use "
                        f"DualToken.from_pretrained")
    return DualToken.from_pretrained(path, dtype, siglip_config)


def load_dualtoken(path, siglip_config=None, dtype=torch.float32):
    """Either checkpoint, ours or the authors' (DualToken.from_pretrained detects which)."""
    return DualToken.from_pretrained(path, dtype, siglip_config)

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
