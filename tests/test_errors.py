"""A user's mistake never loses a model, and every command answers it with one line.

One row per case: the command (script + arguments, with {placeholders} filled from the `world` fixture),
the exit code, a pattern the message must match (on stderr for errors: one `error: ...` line naming what
and where; on stdout for runs that must succeed), and the folder whose files must keep their md5. Rows
marked `sub` run as a real `python script.py ...` subprocess (the overwrite and resume guards, and each
script's `__main__` wiring); the others call the script's `main` under configurator.run_main in-process,
which is the same code path without the ~2 s of starting torch again.
"""
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from configurator import run_main
from conftest import ROOT

# tiny pipeline: a 32 px SigLIP, a tokenizer on it, an MLLM on that; a few steps each
PRESET = '''
siglip_config = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=3, vision_heads=2, text_width=32,
    text_layers=1, text_heads=2, max_len=48, batch_size=8, micro_batch=8, max_steps=2, warmup=1, lr=3e-3,
    eval_size=6, log_interval=1, eval_interval=1000, ckpt_interval=1000, device="cpu", compile=False,
    train_size=100)
tokenizer_config = dict(max_objects=1, train_size=16, eval_size=6, layer_recon=1, layer_shortcut=None, layer_sem=2,
    vq_pix=dict(codebook_size=32, code_dim=16, depth=2), vq_sem=dict(codebook_size=32, code_dim=16, depth=2),
    decoder=dict(ch=32, ch_mult=(1, 1, 1), num_res_blocks=0, attn_resolutions=(), latent_channels=32), batch_size=4, micro_batch=4, max_steps=1, warmup=1,
    log_interval=1, image_interval=0, eval_interval=1000, eval_batch=8, ckpt_interval=1000, device="cpu",
    compile=False)
mllm_config = dict(train_size=12, eval_size=4, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, intermediate_size=64,
    head_n_layer=1, head_n_embd=16, head_n_head=2, batch_size=4, micro_batch=4, max_steps=1, warmup=1,
    eval_qa=2, eval_gen=1, eval_batch=4, log_interval=1, sample_interval=0, ckpt_interval=1000, device="cpu",
    compile=False)
'''


def run(script, argv, sub=False, env=None):
    """-> (exit code, stdout, stderr) of `python script.py argv`."""
    if sub:
        e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        p = subprocess.run([sys.executable, f"{script}.py", *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=e)
        return p.returncode, p.stdout, p.stderr
    mod = importlib.import_module(script)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(getattr(mod, "main_cli", mod.main), argv)  # ablation.py's command line is main_cli
            rc = 0
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def md5s(folder):
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.md5(fh.read()).hexdigest()
    return out


def _png(path, size=32, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _jsonl(path, lines):
    with open(path, "w") as f:
        f.write("".join(l + "\n" for l in lines))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Trained tiny siglip / tokenizer / mllm out_dirs, and the broken inputs the rows point at."""
    t = tmp_path_factory.mktemp("errors")
    w = {"tmp": str(t), "preset": str(t / "tiny.py")}
    (t / "tiny.py").write_text(PRESET)
    w["siglip"], w["tok"], w["mllm"] = str(t / "siglip"), str(t / "tok"), str(t / "mllm")
    for script, argv in (("train_siglip", [f"--out_dir={w['siglip']}"]),
                         ("train_tokenizer", [f"--out_dir={w['tok']}", f"--init_from={w['siglip']}"]),
                         ("train_mllm", [f"--out_dir={w['mllm']}", f"--tokenizer={w['tok']}"]),
                         ("train_mllm", [f"--out_dir={t / 'mllm_words'}", f"--tokenizer={w['tok']}",
                                         "--text_tokenizer=words"])):
        rc, out, err = run(script, [w["preset"], *argv])
        assert rc == 0, (script, err[-2000:])
    # images: good, empty, text saved as .png
    imgs = t / "imgs"
    imgs.mkdir()
    for i in range(2):
        _png(imgs / f"good{i}.png", seed=i)
    from PIL import Image
    for mode in ("L", "RGBA", "P"):  # odd modes: converted to RGB, not refused
        Image.open(imgs / "good0.png").convert(mode).save(imgs / f"good_{mode}.png")
    (imgs / "empty.png").write_bytes(b"")
    (imgs / "text.png").write_text("not an image at all\n")
    w["imgs"], w["bad_png"], w["good_png"] = str(imgs), str(imgs / "text.png"), str(imgs / "good0.png")
    # JSONL files, one mistake each (image paths relative to the file)
    j = lambda name, *lines: _jsonl(t / name, lines)
    w["j_null_cap"] = j("null_cap.jsonl", '{"image": "imgs/good0.png", "caption": "ok"}',
                        '{"image": "imgs/good1.png", "caption": null}')
    w["j_int_cap"] = j("int_cap.jsonl", '{"image": "imgs/good0.png", "caption": 123}')
    w["j_int_image"] = j("int_image.jsonl", '{"image": 5, "caption": "five"}')
    w["j_not_json"] = j("not_json.jsonl", '{"image": "imgs/good0.png", "caption": "ok"}', '{"image": "imgs/go')
    w["j_empty"] = j("empty.jsonl")
    w["j_bad_qa"] = j("bad_qa.jsonl", '{"image": "imgs/good0.png", "qa": [["what?", 3]]}')
    w["j_no_text"] = j("no_text.jsonl", '{"image": "imgs/good0.png"}')
    w["j_bad_images"] = j("bad_images.jsonl", *[json.dumps({"image": f"imgs/{n}.png", "caption": f"c {n}",
                                                            "qa": [["what is it?", n]]})
                                                for n in ("good0", "empty", "text", "good1", "missing")])
    w["j_modes"] = j("modes.jsonl", *[json.dumps({"image": f"imgs/{n}.png", "caption": f"a red circle {n}"})
                                      for n in ("good0", "good_L", "good_RGBA", "good_P", "empty", "text", "missing")])
    # a tokenizer folder whose weights are cut short; a siglip run whose train_state.pt is cut short
    w["tok_cut"] = str(t / "tok_cut")
    os.makedirs(w["tok_cut"])
    shutil.copy(os.path.join(w["tok"], "config.json"), w["tok_cut"])
    with open(os.path.join(w["tok"], "model.safetensors"), "rb") as f:
        open(os.path.join(w["tok_cut"], "model.safetensors"), "wb").write(f.read()[:5000])
    w["siglip_cut"] = str(t / "siglip_cut")
    shutil.copytree(w["siglip"], w["siglip_cut"])
    st = os.path.join(w["siglip_cut"], "train_state.pt")
    with open(st, "rb") as f:
        b = f.read()
    open(st, "wb").write(b[:len(b) // 2])
    for name in ("siglip_again", "siglip_more"):  # copies that rows may change (--overwrite, --max_steps)
        shutil.copytree(w["siglip"], str(t / name))
        w[name] = str(t / name)
    # copies that the rows aiming outputs at inputs and models point at: code without the output check would
    # replace them, and the shared folders must stay whole for the other rows
    for name, src in (("siglip_teacher", "siglip"), ("tok_copy", "tok"), ("mllm_copy", "mllm")):
        shutil.copytree(w[src], str(t / name))
        w[name] = str(t / name)
    os.makedirs(t / "abl_done")  # an ablation whose run (a) has finished
    shutil.copytree(w["tok"], str(t / "abl_done" / "a"))
    w["abl_done"] = str(t / "abl_done")
    # a siglip run whose train_state.pt has 16 bytes flipped inside its largest tensor (still a valid zip)
    w["siglip_flip"] = str(t / "siglip_flip")
    shutil.copytree(w["siglip"], w["siglip_flip"])
    st = os.path.join(w["siglip_flip"], "train_state.pt")
    big = max(torch.load(st, weights_only=True)["model"].values(), key=lambda v: v.numel())
    b = bytearray(open(st, "rb").read())
    at = b.find(big.contiguous().numpy().tobytes()) + big.numel() * big.element_size() // 2
    assert at > 0
    b[at:at + 16] = bytes(x ^ 0xFF for x in b[at:at + 16])
    open(st, "wb").write(bytes(b))
    (t / "empty_caps.txt").write_text("\n  \n")
    # text for an MLLM with the closed shapes vocabulary (text_tokenizer=words): line 2 of each has a word outside it;
    # and files that are not UTF-8
    w["mllm_words"] = str(t / "mllm_words")
    (t / "caps_words.txt").write_text("a small green triangle in the center\na zebra in the center\n")
    w["caps_words"] = str(t / "caps_words.txt")
    w["qa_words"] = j("qa_words.jsonl", '{"image": "imgs/good0.png", "question": "what color is the triangle?", '
                      '"answer": "green"}', '{"image": "imgs/good0.png", "question": "what color is the zebra!", '
                      '"answer": "green"}')
    (t / "latin1.txt").write_bytes("a red circle\na caf\u00e9 in the center\n".encode("latin-1"))
    w["latin1_txt"] = str(t / "latin1.txt")
    (t / "latin1.jsonl").write_bytes('{"image": "imgs/good0.png", "question": "caf\u00e9?", "answer": "x"}\n'
                                     .encode("latin-1"))
    w["latin1_jsonl"] = str(t / "latin1.jsonl")
    # presets with a mistake each: Python that does not parse, a name that does not exist, a value of the wrong type
    (t / "bad_syntax.py").write_text("lr = 1e-3\nmax_steps = (\n")
    (t / "bad_name.py").write_text("lr = 1e-3\nmax_steps = steps_per_epoch * 2\n")
    (t / "bad_type.py").write_text("siglip_config = dict(max_steps='abc')\n")
    w["empty_caps"] = str(t / "empty_caps.txt")
    return w


# (id, script, argv, exit code, pattern, folder whose md5s must not change, subprocess)
S, T, M = "train_siglip", "train_tokenizer", "train_mllm"
NEW = "--out_dir={tmp}/new_{id}"  # a fresh out_dir per row
ROWS = [
    # never destroy a finished artefact
    ("siglip_overwrite", S, ["{preset}", "--out_dir={siglip}"], 2,
     r"out_dir .*siglip' already holds a model \(train_state.pt, model.safetensors\): pass --resume=True", "siglip", True),
    ("siglip_resume_changed", S, ["{preset}", "--out_dir={siglip}", "--resume=True", "--vision_width=64",
                                  "--data=shapes", "--max_steps=3"], 2,
     r"--resume=True with a config that changes .*vision_width: 32 -> 64.*train_state.pt", "siglip", True),
    ("tokenizer_resume_depth", T, ["{preset}", "--out_dir={tok}", "--init_from={siglip}", "--resume=True",
                                   "--vq_sem.depth=4"], 2, r"changes the model or the data stream \(vq_sem.depth: 2 -> 4;", "tok", True),
    ("tokenizer_overwrite", T, ["{preset}", "--out_dir={tok}", "--init_from={siglip}"], 2,
     r"already holds a model", "tok", False),
    ("mllm_overwrite", M, ["{preset}", "--out_dir={mllm}", "--tokenizer={tok}"], 2, r"already holds a model", "mllm",
     False),
    ("mllm_resume_changed", M, ["{preset}", "--out_dir={mllm}", "--tokenizer={tok}", "--resume=True", "--n_layer=2",
                                "--data={j_bad_images}"], 2,
     r"changes .*data: 'shapes' -> '.*bad_images.jsonl'.*n_layer: 1 -> 2", "mllm", False),
    ("siglip_resume_cut_state", S, ["{preset}", "--out_dir={siglip_cut}", "--resume=True"], 2,
     r"cannot read .*siglip_cut/train_state.pt", "siglip_cut", False),
    ("siglip_resume_nothing", S, ["{preset}", NEW, "--resume=True"], 2, r"no .*new_siglip_resume_nothing/train_state.pt",
     None, False),
    ("siglip_overwrite_ok", S, ["{preset}", "--out_dir={siglip_again}", "--overwrite=True"], 0, r"zero-shot", None, False),
    ("siglip_resume_more_steps", S, ["{preset}", "--out_dir={siglip_more}", "--resume=True", "--max_steps=3"], 0,
     r"from step 2", None, False),
    # config checked before any work
    ("max_steps_0", S, ["{preset}", NEW, "--max_steps=0"], 2, r"--max_steps=0: need at least 1 step", None, False),
    ("max_steps_negative", T, ["{preset}", NEW, "--init_from={siglip}", "--max_steps=-3"], 2, r"--max_steps=-3", None,
     False),
    ("stop_after_max", S, ["{preset}", NEW, "--stop_step=5"], 2, r"--stop_step=5: need 0 .*max_steps=2", None, False),
    ("lr_cycles_not_max_steps", M, ["{preset}", NEW, "--tokenizer={tok}", "--lr_cycles=((1, 1.0), (1, 0.5))"], 2,
     r"--lr_cycles=\(\(1, 1.0\), \(1, 0.5\)\): its steps sum to 2, --max_steps=1: they must be equal", None, False),
    ("interval_negative", M, ["{preset}", NEW, "--tokenizer={tok}", "--log_interval=-1"], 2, r"--log_interval=-1",
     None, False),
    ("intervals_0_mean_off", S, ["{preset}", NEW, "--log_interval=0", "--eval_interval=0", "--ckpt_interval=0"], 0,
     r"step 2: zero-shot", None, False),
    ("image_size_not_patches", S, ["{preset}", NEW, "--image_size=50"], 2,
     r"--image_size=50 is not a multiple of --patch_size=8", None, False),
    ("unknown_key", S, ["{preset}", NEW, "--dept=4"], 2,
     r"unknown config key 'dept' \(no key is close\) on the command line; `python train_siglip.py --help`", None,
     False),
    ("bad_int", T, ["{preset}", NEW, "--vq_pix.depth=four"], 2, r"--vq_pix.depth: expected int, got 'four'", None, False),
    ("preset_missing", S, ["{tmp}/nope.py"], 2, r"preset file '.*nope.py' does not exist", None, False),
    ("siglip_data_missing", S, ["{preset}", NEW, "--data={tmp}/nope"], 2, r"--data='.*nope' does not exist", None, False),
    ("tokenizer_init_missing", T, ["{preset}", NEW, "--init_from={tmp}/nope"], 2,
     r"--init_from='.*nope' does not exist: need a folder", None, False),
    ("lpips_missing", T, ["{preset}", NEW, "--init_from={siglip}", "--lpips_vgg_path={tmp}/vgg.pth",
                          "--lpips_lin_path={tmp}/lin.pth"], 2, r"--lpips_vgg_path='.*vgg.pth' does not exist", None,
     False),
    ("eval_lpips_one_file", "eval", ["tokenizer", "--tokenizer={tok}", "--lpips_vgg_path={tmp}/vgg.pth",
                                     "--device=cpu"], 2, r"LPIPS needs both files", "tok", False),
    ("mllm_tokenizer_missing", M, ["{preset}", NEW, "--tokenizer="], 2, r"--tokenizer='' is empty", None, False),
    # one JSONL reader: every record checked up front, naming file and line
    ("jsonl_caption_null", S, ["{preset}", NEW, "--data={j_null_cap}"], 2, r"null_cap.jsonl:2: 'caption' must be a string, got None",
     None, False),
    ("tok_layers_out_of_order", T, ["{preset}", NEW, "--init_from={siglip}", "--layer_sem=2", "--layer_recon=3"], 2,
     r"--layer_recon=3: need 0 \.\. --layer_sem=2", None, False),
    ("tok_decoder_not_groupable", T, ["{preset}", NEW, "--init_from={siglip}", "--decoder.ch=20"], 2,
     r"--decoder.ch=20: every decoder width .* multiple of 32", None, False),
    ("jsonl_caption_int", T, ["{preset}", NEW, "--init_from={siglip}", "--data={j_int_cap}"], 2,
     r"int_cap.jsonl:1: 'caption' must be a string, got 123", None, False),
    ("jsonl_image_int", S, ["{preset}", NEW, "--data={j_int_image}"], 2, r"int_image.jsonl:1: 'image' must be a file path",
     None, False),
    ("mllm_jsonl_not_json", M, ["{preset}", NEW, "--tokenizer={tok}", "--data={j_not_json}"], 2,
     r"not_json.jsonl:2 is not JSON", None, True),
    ("mllm_jsonl_empty", M, ["{preset}", NEW, "--tokenizer={tok}", "--data={j_empty}"], 2, r"empty.jsonl holds no records",
     None, False),
    ("mllm_jsonl_bad_qa", M, ["{preset}", NEW, "--tokenizer={tok}", "--data={j_bad_qa}"], 2,
     r"bad_qa.jsonl:1: 'qa' must be a list of \[question, answer\] string pairs", None, False),
    ("mllm_jsonl_word_outside_words", M, ["{preset}", NEW, "--tokenizer={tok}", "--data={j_modes}",
                                          "--text_tokenizer=words"], 2,
     r"modes.jsonl:1: '0', 'good' not in the vocabulary \(text_tokenizer 'words'", None, False),
    ("mllm_jsonl_no_text", M, ["{preset}", NEW, "--tokenizer={tok}", "--data={j_no_text}"], 2,
     r"no_text.jsonl:1 needs 'image' and a 'caption' and/or 'qa' list", None, False),
    ("mllm_jsonl_bad_images_skipped", M, ["{preset}", NEW, "--tokenizer={tok}", "--data={j_bad_images}",
                                          "--prepare=True"], 0,
     r"skipped 3 of 5 files under .*bad_images.jsonl \(2 do not decode.*\(1 without caption or file\)", None, False),
    ("siglip_jsonl_modes_and_bad_images", S, ["{preset}", NEW, "--data={j_modes}"], 0,
     r"skipped 3 of 7 files under .*modes.jsonl \(2 do not decode.*\(1 without caption or file\)", None, False),
    ("tokenizer_jsonl_modes_and_bad_images", T, ["{preset}", NEW, "--init_from={siglip}", "--data={j_modes}"], 0,
     r"skipped 3 of 7 files under .*modes.jsonl \(2 do not decode.*\(1 without caption or file\)", None, False),
    ("mllm_jsonl_trains", M, ["{preset}", NEW, "--tokenizer={tok}", "--data={j_bad_images}"], 0,
     r"2 cached images", None, False),
    # models and images that do not load
    ("tokenizer_is_config_json", "sample", ["reconstruct", "--tokenizer={tok}/config.json", "--images={imgs}",
                                            "--out_dir={tmp}/out_{id}"], 2,
     r"tokenizer '.*config.json': expected its folder or the weights file", "tok", False),
    ("tokenizer_weights_cut", "sample", ["reconstruct", "--tokenizer={tok_cut}", "--images={imgs}",
                                         "--out_dir={tmp}/out_{id}"], 2, r"cannot read .*tok_cut/model.safetensors", None,
     False),
    ("reconstruct_skips_bad", "sample", ["reconstruct", "--tokenizer={tok}", "--images={imgs}", "--device=cpu",
                                         "--out_dir={tmp}/out_{id}"], 0,
     r"skipped 2 of 7 files under .*imgs that do not decode", None, False),
    ("reconstruct_one_bad", "sample", ["reconstruct", "--tokenizer={tok}", "--images={bad_png}", "--device=cpu",
                                       "--out_dir={tmp}/out_{id}"], 2, r"cannot decode the image .*text.png", None, False),
    ("answer_bad_image", "sample", ["answer", "--mllm={mllm}", "--image={bad_png}", "--question=what?",
                                    "--device=cpu", "--out_dir={tmp}/out_{id}"], 2, r"cannot decode the image .*text.png",
     "mllm", False),
    ("convert_config_json", "convert", ["{tok}/config.json", "{tmp}/out_{id}"], 2,
     r"expected its folder or the weights file .*not config.json", "tok", True),
    ("convert_onto_model", "convert", ["{tok}", "{mllm}"], 2, r"already holds a model \(.*model.safetensors", "mllm",
     False),
    # paths-or-text arguments and empty selections
    ("captions_mistyped_path", "sample", ["generate", "--mllm={mllm}", "--captions=caps.txt", "--device=cpu",
                                          "--out_dir={tmp}/out_{id}"], 2,
     r"--captions='caps.txt' looks like a file path but there is no such file", "mllm", True),
    ("captions_empty_file", "sample", ["generate", "--mllm={mllm}", "--captions={empty_caps}", "--device=cpu",
                                       "--out_dir={tmp}/out_{id}"], 2, r"empty_caps.txt': the file has no non-empty line",
     None, False),
    ("num_per_caption_0", "sample", ["generate", "--mllm={mllm}", "--captions=a red circle", "--num_per_caption=0",
                                     "--out_dir={tmp}/out_{id}"], 2, r"--num_per_caption=0: need at least 1", None, False),
    ("captions_as_text", "sample", ["generate", "--mllm={mllm}", "--captions=a red circle", "--num_per_caption=1",
                                    "--device=cpu", "--out_dir={tmp}/out_{id}"], 0,
     r"--captions: taken as text \('a red circle'\)", None, False),
    ("question_is_a_path", "sample", ["answer", "--mllm={mllm}", "--image={good_png}", "--question=qs/q.txt",
                                      "--out_dir={tmp}/out_{id}"], 2, r"--question='qs/q.txt' looks like a file path", None,
     False),
    ("eval_mllm_nothing", "eval", ["mllm", "--mllm={mllm}", "--qa_images=0", "--gen_captions=0", "--train_images=0",
                                   "--device=cpu"], 2,
     r"--qa_images=0, --gen_captions=0 and --train_images=0: nothing to evaluate", "mllm", True),
    ("eval_mllm_train_images_negative", "eval", ["mllm", "--mllm={mllm}", "--train_images=-1", "--device=cpu"], 2,
     r"--train_images=-1: need >= 0", "mllm", False),
    ("eval_tokenizer_all_shapes", "eval", ["tokenizer", "--tokenizer={tok}", "--num_images=0", "--device=cpu"], 2,
     r"--num_images=0 means every image of a folder, and the shapes world has no end", "tok", False),
    ("sample_unknown_job", "sample", ["draw"], 2, r"usage: python sample.py \{reconstruct\|generate\|answer\}", None,
     False),
    ("data_n_not_int", "data", ["abc"], 2, r"N must be an integer, got 'abc'", None, True),
    ("data_export_n_not_int", "data", ["export", "{tmp}/out_{id}", "abc"], 2, r"N must be an integer, got 'abc'", None,
     False),
    ("checker_n_not_int", "checker", ["abc"], 2, r"N must be an integer, got 'abc'", None, False),
    ("bench_unknown", "bench", ["nothing"], 2, r"usage: python bench.py", None, False),
    # outputs never land on an input or on a model's files, with --overwrite=True or without
    ("tokenizer_out_is_teacher", T, ["{preset}", "--out_dir={siglip_teacher}", "--init_from={siglip_teacher}",
                                     "--overwrite=True"], 2,
     r"--out_dir='.*siglip_teacher' is --init_from, which this command reads", "siglip_teacher", False),
    ("tokenizer_out_inside_teacher", T, ["{preset}", "--out_dir={siglip_teacher}/tok", "--init_from={siglip_teacher}"],
     2, r"--out_dir='.*siglip_teacher/tok' is inside --init_from='.*siglip_teacher'", "siglip_teacher", False),
    ("mllm_out_is_tokenizer", M, ["{preset}", "--out_dir={tok_copy}", "--tokenizer={tok_copy}", "--overwrite=True"], 2,
     r"--out_dir='.*tok_copy' is --tokenizer, which this command reads", "tok_copy", False),
    ("mllm_cache_inside_tokenizer", M, ["{preset}", NEW, "--tokenizer={tok_copy}", "--cache_dir={tok_copy}/cache"], 2,
     r"--cache_dir='.*tok_copy/cache' is inside --tokenizer='.*tok_copy'", "tok_copy", False),
    ("eval_out_is_model_weights", "eval", ["mllm", "--mllm={mllm_copy}", "--out={mllm_copy}/model.safetensors",
                                           "--qa_images=1", "--gen_captions=0", "--train_images=0", "--device=cpu"], 2,
     r"--out='.*mllm_copy/model.safetensors' would replace a file of the model in .*mllm_copy", "mllm_copy", False),
    ("eval_out_is_tokenizer_config", "eval", ["tokenizer", "--tokenizer={tok_copy}", "--out={tok_copy}/config.json",
                                              "--num_images=2", "--zero_shot=False", "--device=cpu"], 2,
     r"--out='.*tok_copy/config.json' would replace a file of the model in .*tok_copy", "tok_copy", False),
    ("eval_out_folder_is_a_file", "eval", ["mllm", "--mllm={mllm}", "--out={preset}/eval.json", "--qa_images=1",
                                           "--gen_captions=0", "--train_images=0", "--device=cpu"], 2,
     r"cannot write into '.*tiny.py' \(.*\): give --out=FILE somewhere this user may write", "mllm", False),
    ("eval_out_is_a_folder", "eval", ["probes", "--tokenizer={tok}", "--out={tmp}", "--images=8", "--device=cpu"], 2,
     r"--out='.*' is a folder: need a file path", "tok", False),
    ("sample_out_is_tokenizer", "sample", ["reconstruct", "--tokenizer={tok_copy}", "--images={good_png}",
                                           "--device=cpu", "--out_dir={tok_copy}"], 2,
     r"--out_dir='.*tok_copy' is --tokenizer, which this command reads", "tok_copy", False),
    ("convert_out_is_ckpt", "convert", ["{tok_copy}", "{tok_copy}"], 2, r"OUT_DIR='.*tok_copy' is CKPT", "tok_copy",
     False),
    ("out_dir_is_a_file", S, ["{preset}", "--out_dir={preset}"], 2, r"--out_dir='.*tiny.py' is a file: need a folder",
     None, False),
    ("ablation_dir_inside_teacher", "ablation", ["{preset}", "--init_from={siglip_teacher}",
                                                 "--ablation_dir={siglip_teacher}/abl", "--runs=a", "--steps=1"], 2,
     r"--ablation_dir='.*siglip_teacher/abl' is inside --init_from", "siglip_teacher", False),
    ("ablation_keeps_finished_run", "ablation", ["{preset}", "--init_from={siglip}", "--ablation_dir={abl_done}",
                                                 "--runs=a", "--steps=1"], 2,
     r"abl_done/a already holds a finished run \(train_state.pt, model.safetensors\): --reuse=True", "abl_done", True),
    ("ablation_runs_empty", "ablation", ["{preset}", "--init_from={siglip}", "--ablation_dir={tmp}/out_{id}",
                                         "--runs="], 2, r"--runs='': nothing to train", None, False),
    # every value checked before any work: ranges, relations, devices, dtypes, presets
    ("lr_nan", S, ["{preset}", NEW, "--lr=nan"], 2, r"--lr=nan: need a finite number > 0", None, False),
    ("lr_negative", T, ["{preset}", NEW, "--init_from={siglip}", "--lr=-1"], 2, r"--lr=-1.0: need a finite number > 0",
     None, False),
    ("heads_not_dividing_width", S, ["{preset}", NEW, "--vision_heads=3"], 2,
     r"--vision_width=32: need a multiple of --vision_heads=3", None, False),
    ("kv_heads_over_heads", M, ["{preset}", NEW, "--tokenizer={tok}", "--n_kv_head=4"], 2,
     r"--n_kv_head=4: need a divisor of --n_head=2", None, False),
    ("mllm_cfg_scale_nan", M, ["{preset}", NEW, "--tokenizer={tok}", "--cfg_scale=nan"], 2,
     r"--cfg_scale=nan: need a finite", None, False),
    ("sample_negative_temperature", "sample", ["generate", "--mllm={mllm}", "--captions=a red circle",
                                               "--temperature=-1", "--num_per_caption=1", "--device=cpu",
                                               "--out_dir={tmp}/out_{id}"], 2,
     r"--temperature=-1.0: need a finite number >= 0 \(0: greedy\)", "mllm", False),
    ("sample_batch_size_0", "sample", ["generate", "--mllm={mllm}", "--captions=a red circle", "--batch_size=0",
                                       "--num_per_caption=1", "--device=cpu", "--out_dir={tmp}/out_{id}"], 2,
     r"--batch_size=0: need an integer >= 1", None, False),
    ("eval_max_new_tokens_0", "eval", ["mllm", "--mllm={mllm}", "--max_new_tokens=0", "--qa_images=1",
                                       "--gen_captions=0", "--train_images=0", "--device=cpu"], 2,
     r"--max_new_tokens=0: need an integer >= 1", "mllm", False),
    ("device_absent", S, ["{preset}", NEW, "--device=cuda:99"], 2, r"--device='cuda:99': this machine has", None,
     False),
    ("device_unknown", "sample", ["reconstruct", "--tokenizer={tok}", "--images={good_png}", "--device=tpu",
                                  "--out_dir={tmp}/out_{id}"], 2, r"--device='tpu': expected cpu, cuda, cuda:N or mps",
     None, False),
    ("dtype_unknown", T, ["{preset}", NEW, "--init_from={siglip}", "--dtype=float8"], 2,
     r"--dtype='float8': expected bfloat16, float16 or float32", None, False),
    ("tuple_field_given_text", S, ["{preset}", NEW, "--templates='a {{}}'"], 2, r"--templates: expected a tuple", None,
     False),
    ("preset_syntax_error", S, ["{tmp}/bad_syntax.py", NEW], 2, r"preset .*bad_syntax.py:2: ", None, False),
    ("preset_undefined_name", S, ["{tmp}/bad_name.py", NEW], 2,
     r"preset .*bad_name.py:2: NameError: name 'steps_per_epoch' is not defined", None, False),
    ("preset_wrong_type", S, ["{tmp}/bad_type.py", NEW], 2, r"bad_type.py: max_steps = 'abc': expected int, got str",
     None, False),
    # text checked against the MLLM's text tokenizer before any work, naming the word and where it came from
    ("generate_word_outside_vocabulary", "sample", ["generate", "--mllm={mllm_words}", "--captions=a red dodecahedron!",
                                                    "--device=cpu", "--out_dir={tmp}/out_{id}"], 2,
     r"--captions: '!', 'dodecahedron' not in the vocabulary of .*mllm_words \(text_tokenizer 'words'.*the words "
     r"are: .*circle", "mllm_words", False),
    ("generate_file_word_outside_vocabulary", "sample", ["generate", "--mllm={mllm_words}", "--captions={caps_words}",
                                                         "--device=cpu", "--out_dir={tmp}/out_{id}"], 2,
     r"caps_words.txt:2: 'zebra' not in the vocabulary", None, False),
    ("answer_word_outside_vocabulary", "sample", ["answer", "--mllm={mllm_words}", "--image={good_png}",
                                                  "--question=what colour is the circle?", "--device=cpu",
                                                  "--out_dir={tmp}/out_{id}"], 2,
     r"--question: 'colour' not in the vocabulary", None, False),
    ("eval_qa_word_outside_vocabulary", "eval", ["mllm", "--mllm={mllm_words}", "--data={qa_words}", "--device=cpu",
                                                 "--out={tmp}/out_{id}.json"], 2,
     r"qa_words.jsonl:2: '!', 'zebra' not in the vocabulary", "mllm_words", False),
    ("eval_t2i_word_outside_vocabulary", "eval", ["t2i", "--mllm={mllm_words}", "--captions={caps_words}",
                                                  "--siglip={siglip}", "--device=cpu", "--out={tmp}/out_{id}.json"], 2,
     r"caps_words.txt:2: 'zebra' not in the vocabulary", None, False),
    ("captions_not_utf8", "sample", ["generate", "--mllm={mllm}", "--captions={latin1_txt}", "--device=cpu",
                                     "--out_dir={tmp}/out_{id}"], 2,
     r"latin1.txt:2 is not UTF-8 text \(byte 0xe9 at column 6\)", None, False),
    ("qa_file_not_utf8", "eval", ["mllm", "--mllm={mllm}", "--data={latin1_jsonl}", "--device=cpu",
                                  "--out={tmp}/out_{id}.json"], 2, r"latin1.jsonl:1 is not UTF-8 text", None, False),
    # a folder holding another kind of model is named as what it is
    ("tokenizer_is_siglip", "sample", ["reconstruct", "--tokenizer={siglip}", "--images={good_png}", "--device=cpu",
                                       "--out_dir={tmp}/out_{id}"], 2,
     r"'.*siglip' is a SigLIP folder .*: a DualToken tokenizer folder is needed here", "siglip", False),
    ("init_from_is_tokenizer", T, ["{preset}", NEW, "--init_from={tok}"], 2,
     r"'.*tok' is a DualToken tokenizer folder .*: a SigLIP folder is needed here", "tok", False),
    ("teacher_is_mllm", "eval", ["tokenizer", "--tokenizer={tok}", "--teacher={mllm}", "--num_images=2", "--device=cpu",
                                 "--out={tmp}/out_{id}.json"], 2,
     r"'.*mllm' is an MLLM folder .*: a SigLIP folder is needed here", "mllm", False),
    ("mllm_is_tokenizer", "sample", ["generate", "--mllm={tok}", "--captions=a red circle", "--device=cpu",
                                     "--out_dir={tmp}/out_{id}"], 2,
     r"'.*tok' is a DualToken tokenizer folder .*: an MLLM folder .* is needed here", "tok", False),
    ("ablation_teacher_is_tokenizer", "ablation", ["{preset}", "--init_from={tok}", "--ablation_dir={tmp}/out_{id}"], 2,
     r"'.*tok' is a DualToken tokenizer folder .*: a SigLIP folder is needed here", "tok", False),
    # checkpoints are verified
    ("siglip_resume_damaged", S, ["{preset}", "--out_dir={siglip_flip}", "--resume=True"], 2,
     r"siglip_flip/train_state.pt is damaged: its contents do not match the sha256 recorded when it was saved "
     r"\(step 2\); no earlier checkpoint is kept", "siglip_flip", False),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_row(world, row):
    rid, script, argv, code, pattern, guard, sub = row
    argv = [a.format(id=rid, **world) for a in argv]
    before = md5s(world[guard]) if guard else None
    rc, out, err = run(script, argv, sub=sub)
    assert rc == code, (rc, out[-3000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    if code == 2:
        lines = [l for l in err.splitlines() if l.startswith("error: ")]
        assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-3000:]
        assert re.search(pattern, lines[0]), lines[0]
    else:
        assert re.search(pattern, out), out[-3000:]
    if guard:
        assert md5s(world[guard]) == before, f"{rid} changed files in {guard}"


def test_debug_shows_the_traceback(world):
    """NANO_DEBUG=1 (or --debug=True) re-raises the UserError with its traceback: exit 1, not 2."""
    rc, _, err = run("data", ["abc"], sub=True, env={"NANO_DEBUG": "1"})
    assert rc == 1 and "Traceback" in err and "UserError: N must be an integer" in err
    from configurator import UserError
    with pytest.raises(UserError, match="N must be an integer"):  # run_main takes --debug=True out of argv
        run_main(importlib.import_module("data").main, ["abc", "--debug=True"])


def test_resume_may_change_list_is_the_sampler_and_schedule():
    """RESUME_MAY_CHANGE holds every sampler key (codec.SAMPLING_KEYS) and no key that shapes a model."""
    import codec
    import train_utils as tu
    assert set(codec.SAMPLING_KEYS) <= tu.RESUME_MAY_CHANGE
    assert not {"depth", "data", "seed", "batch_size", "lr", "n_layer", "image_size"} & tu.RESUME_MAY_CHANGE
