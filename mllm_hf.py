"""
Hugging Face Qwen2 / Qwen2.5 / LLaMA checkpoints -> our MLLM: their config.json (v4 and v5 layouts) read into
an MLLMConfig, one explicit name table for the trunk (`model.layers.i.self_attn.q_proj.weight` ->
`layers.i.attn.q_proj.weight`), a strict load (every key used, every shape checked, a short documented
ignore list), and the released Qwen2.5 shapes as presets. The visual side (projector, depth heads) is new
and stays at its initialisation.

    model = mllm_hf.from_pretrained(DIR, new_tokens=text.IMAGE_TOKENS, pix_vocab=..., ...)
"""
import json
import os
from dataclasses import fields

import torch
import torch.nn as nn

from configurator import UserError, preset_values
from folders import model_kind
from llm import Linear
from mllm import MLLM, MLLMConfig
from text import IMAGE_TOKENS
from tokenizer import QuantizerConfig

# Presets naming the released shapes (hub config.json of Qwen/Qwen2.5-*). Qwen2.5 has no bos token and
# no image tokens: from_pretrained(new_tokens=...) appends them.
_QWEN = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_word_embeddings=True,
             max_seq_len=32768, pad_id=None, bos_id=None, eos_id=151643, im_start_id=None, im_end_id=None,
             image_gen_start_id=None, image_gen_end_id=None, pix_vocab=16384, sem_vocab=16384)
PRESETS = {
    "qwen2.5-0.5b": dict(_QWEN, n_layer=24, n_embd=896, n_head=14, n_kv_head=2, intermediate_size=4864),
    "qwen2.5-3b": dict(_QWEN, n_layer=36, n_embd=2048, n_head=16, n_kv_head=2, intermediate_size=11008),
}


def preset_config(name, **kw):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return MLLMConfig(**{**PRESETS[name], **kw})


_HF_DEFAULTS = {  # what transformers assumes when config.json omits a field
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  max_position_embeddings=32768, hidden_act="silu"),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  max_position_embeddings=2048, hidden_act="silu", attention_bias=False, mlp_bias=False,
                  bos_token_id=1, eos_token_id=2),
}


def hf_bos_id(hf, tokenizer_config=None):
    """Does a sequence start with a bos token, and which? config.json's bos_token_id only says which
    token the tokenizer would use, not whether it adds one: Qwen2.5's config.json names <|endoftext|>,
    while its tokenizer never adds a bos and its chat format starts with <|im_start|>. The rule, with the
    folder's tokenizer_config.json (`tokenizer_config`, a dict) when it has one:
      - "add_bos_token" present: it decides (LLaMA-2's: true);
      - absent: a bos iff "bos_token" is not null (Qwen2 / Qwen2.5: null -> none; LLaMA-3:
        "<|begin_of_text|>", added by its tokenizer.json post-processor -> one);
      - the id: the "added_tokens_decoder" entry whose content is bos_token, else config.json's bos_token_id.
    Without a tokenizer_config.json, config.json's bos_token_id (the transformers default)."""
    if tokenizer_config is None:
        return hf.get("bos_token_id")
    tc = tokenizer_config
    tok = tc.get("bos_token")
    tok = tok.get("content") if isinstance(tok, dict) else tok  # an AddedToken dict or a string
    add = tc["add_bos_token"] if tc.get("add_bos_token") is not None else tok is not None
    if not add:
        return None
    ids = [int(i) for i, t in (tc.get("added_tokens_decoder") or {}).items() if t.get("content") == tok]
    bos = ids[0] if ids else hf.get("bos_token_id")
    if bos is None:
        raise ValueError(f"tokenizer_config.json adds a bos token ({tok!r}) but neither it nor config.json "
                         f"gives its id")
    return bos


def config_from_hf(hf, tokenizer_config=None, **overrides):
    """HF config.json dict (+ the folder's tokenizer_config.json dict, for the bos rule: hf_bos_id) ->
    MLLMConfig. Reads both the v4 (rope_theta + rope_scaling) and the v5 (rope_parameters) layouts.
    Special image tokens start as None (from_pretrained appends them)."""
    mt = hf.get("model_type")
    if mt not in _HF_DEFAULTS:
        raise ValueError(f"config.json: model_type {mt!r} is not supported (qwen2, llama)")
    c = {**_HF_DEFAULTS[mt], **{k: v for k, v in hf.items() if v is not None}}
    if c["hidden_act"] != "silu":
        raise ValueError(f"config.json: hidden_act {c['hidden_act']!r} is not supported (silu)")
    if c.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=true is not supported")
    rope = dict(c.get("rope_parameters") or {})
    if not rope:
        rope = dict(c.get("rope_scaling") or {})
        rope.setdefault("rope_theta", c["rope_theta"])
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"config.json: rope type {kind!r} is not supported (default, llama3)")
    eos = c.get("eos_token_id")
    bias = True if mt == "qwen2" else c["attention_bias"]
    kw = dict(vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_embd=c["hidden_size"],
              n_head=c["num_attention_heads"], n_kv_head=c.get("num_key_value_heads") or c["num_attention_heads"],
              head_dim=c.get("head_dim"), intermediate_size=c["intermediate_size"], rms_norm_eps=c["rms_norm_eps"],
              rope_theta=float(rope.get("rope_theta", c["rope_theta"])),
              rope_scaling=None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
              qkv_bias=bias, o_bias=bias and mt == "llama", mlp_bias=c.get("mlp_bias", False),
              tie_word_embeddings=c["tie_word_embeddings"], max_seq_len=c["max_position_embeddings"],
              pad_id=c.get("pad_token_id"), bos_id=hf_bos_id(c, tokenizer_config),
              eos_id=eos[0] if isinstance(eos, list) else eos,
              im_start_id=None, im_end_id=None, image_gen_start_id=None, image_gen_end_id=None)
    kw.update(overrides)
    return MLLMConfig(**kw)

# ----------------------------------------------------------------------------------------------------
# weights


def hf_name_table(model):
    """HF checkpoint name -> our parameter name, for the LLM trunk only."""
    cfg, t = model.config, {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layer):
        hf, us = f"model.layers.{i}.", f"layers.{i}."
        t[hf + "input_layernorm.weight"] = us + "ln1.weight"
        t[hf + "post_attention_layernorm.weight"] = us + "ln2.weight"
        for p, bias in (("q", cfg.qkv_bias), ("k", cfg.qkv_bias), ("v", cfg.qkv_bias), ("o", cfg.o_bias)):
            for kind in ("weight", "bias") if bias else ("weight",):
                t[hf + f"self_attn.{p}_proj.{kind}"] = us + f"attn.{p}_proj.{kind}"
        for p in ("gate", "up", "down"):
            for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                t[hf + f"mlp.{p}_proj.{kind}"] = us + f"mlp.{p}_proj.{kind}"
    return t


def load_hf_state_dict(model, sd, where="state_dict", assign=False):
    """Strict load of a HF state_dict (trunk names) into `model` (an MLLM): every key, every shape. Copied
    into the model's tensors, or with assign=True the checkpoint's tensors become the parameters (a trunk
    built on the meta device: no second copy; the caller re-ties a tied head)."""
    table, ours = hf_name_table(model), dict(model.named_parameters())
    # documented ignore list: a tied head saved anyway, and old checkpoints' RoPE buffers
    ignorable = lambda k: (k == "lm_head.weight" and model.config.tie_word_embeddings) or \
        k.endswith("rotary_emb.inv_freq")
    missing = [k for k in table if k not in sd]
    unexpected = [k for k in sd if k not in table and not ignorable(k)]
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(ours[v].shape)}" for k, v in table.items()
           if sd[k].shape != ours[v].shape]
    if bad:
        raise ValueError(f"{where}: shape mismatch (checkpoint vs model): {bad}")
    if assign:  # keys already checked: each trunk parameter becomes the checkpoint's tensor, by name (the
        # visual side and a tied lm_head are not in the table, so a whole-model load_state_dict cannot be used here)
        for k, v in table.items():
            mod, _, name = v.rpartition(".")
            m = model.get_submodule(mod)
            setattr(m, name, torch.nn.Parameter(sd[k], requires_grad=getattr(m, name).requires_grad))
        return
    with torch.no_grad():
        for k, v in table.items():
            ours[v].copy_(sd[k])


def from_pretrained(folder, new_tokens=(), dtype=torch.float32, **overrides):
    """Load a HF Qwen2 / LLaMA folder (config.json + model.safetensors or a sharded index), strictly.
    new_tokens: names appended to the vocabulary in order, e.g. ("<im_start>", "<im_end>",
    "<image_gen_start>", "<image_gen_end>"); a name matching a config id field (im_start_id, ...)
    sets it. overrides: MLLMConfig fields (the visual side). The visual modules are new, untrained.
    bos: see hf_bos_id (decided by the folder's tokenizer_config.json when it has one).
    Memory: the trunk is built on the meta device (no allocation, no random init) and the checkpoint's
    tensors are assigned to it, so a 3B model costs one copy of its weights; only the new visual side is
    allocated and initialised."""
    from safetensors.torch import load_file
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"from_pretrained: no config.json in {folder}")
    with open(path) as f:
        hf = json.load(f)
    if not isinstance(hf, dict) or hf.get("model_type") not in ("qwen2", "llama"):
        raise UserError(f"{folder!r} is {model_kind(hf)}: a Hugging Face Qwen2 / LLaMA folder (or a train_mllm.py "
                        f"out_dir) is needed here")
    tc, tc_path = None, os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(tc_path):
        with open(tc_path) as f:
            tc = json.load(f)
    cfg = config_from_hf(hf, tokenizer_config=tc, **overrides)
    model = MLLM(cfg, trunk_device="meta")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"from_pretrained: neither model.safetensors nor its index in {folder}")
    sd = {}
    for fn in files:
        part = load_file(os.path.join(folder, fn))
        sd.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in part.items()})
    load_hf_state_dict(model, sd, where=folder, assign=True)
    del sd
    if cfg.tie_word_embeddings:  # assign replaced embed.weight: the head must point at the new tensor
        model.lm_head.weight = model.embed.weight
    model.to(dtype)  # the new visual side; the trunk already is (inv_freq stays fp32: not a buffer)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"from_pretrained: tensors not materialised by {folder}: {left}")
    for i, name in enumerate(new_tokens):
        field = name.strip("<>|") + "_id"
        if field in {f.name for f in fields(cfg)}:
            setattr(cfg, field, cfg.vocab_size + i)
    if new_tokens:
        grow_vocab(model, len(new_tokens))
    return model


def grow_vocab(model, n):
    """Append n rows (new special tokens) initialised to the mean of the old rows (VILA-U); the
    output head grows the same way and a tie stays a tie."""
    cfg, old = model.config, model.embed.weight.data
    # new modules on meta, their weights assigned: no random init of a (vocab, C) matrix to throw away
    emb = nn.Embedding(cfg.vocab_size + n, cfg.n_embd, device="meta", dtype=old.dtype)
    emb.weight = nn.Parameter(torch.cat([old, old.mean(0, keepdim=True).expand(n, -1)]))
    head = Linear(cfg.n_embd, cfg.vocab_size + n, bias=False, device="meta", dtype=old.dtype)
    if cfg.tie_word_embeddings:
        head.weight = emb.weight
    else:
        w = model.lm_head.weight.data
        head.weight = nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(n, -1)]))
    model.embed, model.lm_head = emb, head
    cfg.vocab_size += n


def stage_model(preset, llm="qwen2.5-3b", tokenizer="config/dualtoken_384.py"):
    """The MLLM a train_mllm stage preset trains, built on the meta device (no memory): the released LLM shape
    `llm` (PRESETS) plus the image tokens, the code vocabularies of a train_tokenizer preset, the preset's
    visual-side keys, and its trainable set. -> (model, trainable). What `bench.py memory` counts."""
    st, tk = preset_values(preset, "mllm"), preset_values(tokenizer, "tokenizer")
    if llm not in PRESETS:
        raise UserError(f"--llm={llm!r}: expected one of {sorted(PRESETS)}")
    q = {b: QuantizerConfig(**tk.get(f"vq_{b}", {})) for b in ("pix", "sem")}  # the preset's books
    vis = {f"{b}_{k}": getattr(q[b], f) for b in q for k, f in (("vocab", "codebook_size"), ("dim", "code_dim"),
                                                                  ("depth", "depth"))}
    # the preset's MLLMConfig keys that are not the LLM's (head sizes, gen_sem, ...): what build_model passes on
    own = {f.name for f in fields(MLLMConfig)} - set(PRESETS[llm])
    vis.update({k: v for k, v in st.items() if k in own and k not in vis})
    cfg = preset_config(llm, **vis)
    cfg.vocab_size += len(IMAGE_TOKENS)  # from_pretrained(new_tokens=IMAGE_TOKENS) appends them
    with torch.device("meta"):
        model = MLLM(cfg)
    trainable = st.get("trainable", "all")  # train_mllm's default
    model.set_trainable(trainable)
    return model, trainable
