"""
Train the tiny pipeline through every trainer path and record what it computed, to show that a change which
must not change results (a refactor) did not: run it on the code before and after, compare the two files.

    python tests/identity_runs.py OUT.json [CODE_ROOT]       # CODE_ROOT: the checkout to run (default: this one)
    python tests/identity_runs.py --compare BEFORE.json AFTER.json

Each run is a real `python script.py ...` subprocess on one CPU thread, fp32: a SigLIP teacher, the tokenizer
in the paper's layout (GAN on) and with the shapes preset's switches (its resume from a mid-run checkpoint
too), the tokenizer ablation's tied and recon-only runs, and MLLMs in the paper's layout, with the shapes
preset's switches (and their resume), on the tied tokenizer, and a next stage from an export. Recorded: every
logged loss term and evaluation number (timings left out) and a sha256 of every exported weight tensor.
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

TIMING = {"samples_per_s", "img_per_s", "elapsed_s", "eval_s", "wall_s", "config"}

SIGLIP = '''siglip_config = dict(image_size=48, patch_size=8, vision_width=32, vision_layers=3, vision_heads=2,
    text_width=32, text_layers=1, text_heads=2, max_len=48, batch_size=8, micro_batch=8, max_steps=2, warmup=1,
    lr=3e-3, eval_size=6, log_interval=1, eval_interval=1000, ckpt_interval=1000, device="cpu", compile=False,
    train_size=100)
'''
TOK_COMMON = '''max_objects=2, train_size=16, eval_size=6, batch_size=4, micro_batch=2, max_steps=3, warmup=1,
    log_interval=1, image_interval=3, eval_interval=1000, eval_batch=8, ckpt_interval=2, device="cpu", compile=False'''
# the tokenizer keys in the layout each version of the code reads: flat (codebook_size for both books, dec_*)
# or the model config's own (vq_pix / vq_sem / decoder groups)
TOK_FLAT = {
    "paper": "layer_recon=1, layer_shortcut=1, layer_sem=2, codebook_size=32, code_dim=16, depth=2, dec_ch=32, "
             "dec_ch_mult=(1, 1, 2, 2), dec_num_res_blocks=1, dec_attn_resolutions=(6,), dec_latent_channels=32, "
             "gan_start=1, disc_width=16",
    "demo": "layer_recon=0, layer_shortcut=None, pix_attn=False, layer_sem=2, codebook_size=32, code_dim=16, depth=2, "
            "pix_depth=3, shared_codebook=False, dec_ch=32, dec_ch_mult=(1, 1, 2, 2), dec_num_res_blocks=0, "
            "dec_attn_resolutions=(), dec_latent_channels=32, dec_patch_skip=16, trainable='after_sem', w_edge=0.5",
}
TOK_NESTED = {
    "paper": "layer_recon=1, layer_shortcut=1, layer_sem=2, vq_pix=dict(codebook_size=32, code_dim=16, depth=2), "
             "vq_sem=dict(codebook_size=32, code_dim=16, depth=2), decoder=dict(ch=32, ch_mult=(1, 1, 2, 2), "
             "num_res_blocks=1, attn_resolutions=(6,), latent_channels=32), gan_start=1, disc_width=16",
    "demo": "layer_recon=0, layer_shortcut=None, pix_attn=False, layer_sem=2, "
            "vq_pix=dict(codebook_size=32, code_dim=16, depth=3, shared_codebook=False), "
            "vq_sem=dict(codebook_size=32, code_dim=16, depth=2, shared_codebook=False), decoder=dict(ch=32, "
            "ch_mult=(1, 1, 2, 2), num_res_blocks=0, attn_resolutions=(), latent_channels=32, patch_skip=16), "
            "trainable='after_sem', w_edge=0.5",
}
MLLM_COMMON = '''train_size=12, eval_size=4, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, intermediate_size=64,
    head_n_layer=1, head_n_embd=16, head_n_head=2, batch_size=8, micro_batch=4, max_steps=3, warmup=1, eval_qa=2,
    eval_gen=2, eval_batch=4, eval_interval=2, log_interval=1, sample_interval=3, ckpt_interval=2, device="cpu",
    compile=False'''
MLLM_DEMO = ('text_tokenizer="words", vis_norm=True, image_pos=36, gen_sem=False, head_code_logits=True, '
             'gen_caption_loss=1.0, gen_ground_loss=1.0, cfg_scale=1.5, fine_temperature=0.0, mix=(0.35, 0.1, 0.55), '
             'qa_per_image=2, pix_loss_weight=1 / 6, sem_loss_weight=1 / 6')


def nested(root):
    """Whether the checkout's tokenizer trainer reads the model config's own keys (vq_pix, decoder, ...)."""
    with open(os.path.join(root, "train_tokenizer.py")) as f:
        return "model: DualTokenConfig" in f.read()


def preset(root, tmp):
    tok = TOK_NESTED if nested(root) else TOK_FLAT
    files = {}
    for name, keys in tok.items():
        p = os.path.join(tmp, f"tok_{name}.py")
        with open(p, "w") as f:
            f.write(SIGLIP + f"tokenizer_config = dict({TOK_COMMON},\n    {keys})\n"
                    f"mllm_config = dict({MLLM_COMMON})\n")
        files[name] = p
    return files


def run(root, tmp, script, *argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    p = subprocess.run([sys.executable, os.path.join(root, script), *argv], cwd=tmp, capture_output=True, text=True,
                       env=env)
    if p.returncode:
        raise SystemExit(f"{script} {' '.join(argv)} failed:\n{p.stderr[-3000:]}")


def record(folder):
    """What a run computed: its logged losses and evaluations (no timings), its eval.json, its weights' digests."""
    import torch
    from safetensors.torch import load_file
    out = {"log": []}
    with open(os.path.join(folder, "log.jsonl")) as f:
        for line in f:
            ev = json.loads(line)
            if ev.get("event") in ("train", "eval", "samples"):
                out["log"].append({k: v for k, v in ev.items() if k not in TIMING})
    p = os.path.join(folder, "eval.json")
    if os.path.isfile(p):
        with open(p) as f:
            out["eval"] = {k: v for k, v in json.load(f).items() if k not in TIMING}
    sd = load_file(os.path.join(folder, "model.safetensors"))
    out["weights"] = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
                      for k, v in sorted(sd.items())}
    return out


def main(out_path, root):
    root = os.path.abspath(root)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        P = preset(root, tmp)
        d = lambda n: os.path.join(tmp, n)
        run(root, tmp, "train_siglip.py", P["paper"], f"--out_dir={d('siglip')}")
        for name in ("paper", "demo"):
            run(root, tmp, "train_tokenizer.py", P[name], f"--init_from={d('siglip')}", f"--out_dir={d('tok_' + name)}")
            res[f"tokenizer_{name}"] = record(d("tok_" + name))
        run(root, tmp, "train_tokenizer.py", P["demo"], f"--init_from={d('siglip')}", f"--out_dir={d('tok_r')}",
            "--stop_step=2")
        run(root, tmp, "train_tokenizer.py", P["demo"], f"--init_from={d('siglip')}", f"--out_dir={d('tok_r')}",
            "--resume=True")
        res["tokenizer_demo_resumed"] = record(d("tok_r"))
        run(root, tmp, "ablation.py", P["demo"], f"--init_from={d('siglip')}", f"--ablation_dir={d('abl')}",
            "--runs=ac", "--steps=2")
        for r in "ac":
            res[f"ablation_{r}"] = record(os.path.join(d("abl"), r))
        runs = {"mllm_paper": (P["paper"], "tok_paper", []), "mllm_demo": (P["demo"], "tok_demo", [MLLM_DEMO]),
                "mllm_single_vocab": (P["paper"], os.path.join("abl", "a"), ["input_codes='pix', gen_sem=False"]),
                "mllm_sem_input": (P["paper"], "tok_paper", ["input_codes='sem', vis_norm=True"])}
        for name, (p, tok, extra) in runs.items():
            argv = [p, f"--tokenizer={d(tok)}", f"--out_dir={d(name)}", f"--cache_dir={d('cache_' + tok)}"]
            if extra:
                q = os.path.join(tmp, name + ".py")
                with open(q, "w") as f:
                    f.write(f"mllm_config = dict({extra[0]})\n")
                argv.insert(1, q)
            run(root, tmp, "train_mllm.py", *argv)
            res[name] = record(d(name))
            if name == "mllm_demo":
                run(root, tmp, "train_mllm.py", *argv[:-2], f"--out_dir={d('mllm_r')}",
                    f"--cache_dir={d('cache_' + tok)}", "--stop_step=2")
                run(root, tmp, "train_mllm.py", *argv[:-2], f"--out_dir={d('mllm_r')}",
                    f"--cache_dir={d('cache_' + tok)}", "--resume=True")
                res["mllm_demo_resumed"] = record(d("mllm_r"))
        run(root, tmp, "train_mllm.py", P["paper"], f"--tokenizer={d('tok_paper')}", f"--init_from={d('mllm_paper')}",
            f"--out_dir={d('mllm_stage')}", f"--cache_dir={d('cache_tok_paper')}", "--trainable=output",
            "--text_loss_weight=2.0", "--max_steps=2")
        res["mllm_next_stage"] = record(d("mllm_stage"))
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    print(f"{len(res)} runs recorded in {out_path}")


def compare(a, b):
    with open(a) as f:
        A = json.load(f)
    with open(b) as f:
        B = json.load(f)
    bad = [k for k in sorted(set(A) | set(B)) if A.get(k) != B.get(k)]
    for k in bad:
        print(f"DIFFERS: {k}")
    print(f"{len(set(A) & set(B)) - len(bad)} of {len(set(A) | set(B))} runs identical (losses, evaluations, weights)")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
