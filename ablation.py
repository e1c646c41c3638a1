"""
The paper's core ablation (spec section 4, "objective and layer"): where do pixel codes and semantic
codes come from, and what happens when one codebook must serve both?

    (a) one codebook at the DEEP layer, both losses (VILA-U-like): a single RVQ at layer_sem whose codes
        are decoded to pixels AND whose post-quant features re-enter the remaining blocks (distilled)
    (b) reconstruction only at the deep layer (layer_sem), no semantic branch
    (c) reconstruction only at the shallow layer (layer_recon), no semantic branch
    (d) DualToken: reconstruction shallow + semantics deep (the normal model)

    python ablation.py config/shapes.py                 # ~5 min on 2 idle CPU cores (see README)
    python ablation.py config/shapes.py --steps=60 --runs=ad --threads=1

Every run starts from the same teacher with the same recipe (the preset's `tokenizer_config` section:
batch, lr schedule, decoder, trainable blocks, seed, hence the same training images in the same order);
only `steps` replaces the preset's max_steps, because the preset budgets one run and this trains four.
All four are evaluated by train_tokenizer.evaluate on the same held-out shapes images: PSNR and SSIM
(spec section 5; SSIM is eval.py's) on eval_size images with 1..max_objects objects, zero-shot top-1
through the quantized semantic path on eval_size single-object images next to the teacher's (n/a
without a semantic branch: no number is made up from another path), and codebook usage.
Outputs: <ablation_dir>/<run>/ (a train_tokenizer out_dir each) and <ablation_dir>/ablation.json.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch

import train_tokenizer as tt
import train_utils as tu
from configurator import UserError, config_dict, parse_config, run_main

# the paper's numbers (spec section 4, SigLIP-So/14-384 on ImageNet val; "-" = not reported)
PAPER = {"a": {"zero_shot": 72.3, "psnr": 12.64}, "b": {"zero_shot": None, "psnr": 27.88},
         "c": {"zero_shot": None, "psnr": 28.12}, "d": {"zero_shot": 82.0, "psnr": 28.69}}
RUNS = {
    "a": "one book @ deep, recon + sem (VILA-U-like)",
    "b": "recon only @ deep",
    "c": "recon only @ shallow",
    "d": "DualToken: recon shallow + sem deep",
}


@dataclass
class AblationConfig(tt.TrainTokenizerConfig):
    # SECTION is inherited ("tokenizer"): a pipeline preset's tokenizer_config is the shared recipe
    ablation_dir: str = "out/ablation"  # run r trains into <ablation_dir>/<r>; the preset's out_dir is unused
    runs: str = "abcd"                  # which runs, in order
    steps: int = 150                    # optimizer steps per run (replaces max_steps; 0 keeps max_steps)
    threads: int = 0                    # torch intra-op threads (CPU); 0 leaves torch's default
    reuse: bool = False                 # skip a run whose result.json was written with this same config


def run_config(base, run, layer_sem):
    """The TrainTokenizerConfig of one run: the shared recipe plus the run's layer / objective switches."""
    if run not in RUNS:
        raise UserError(f"--runs: unknown run {run!r}; expected letters from {sorted(RUNS)}")
    fields = {f.name for f in dataclasses.fields(tt.TrainTokenizerConfig)}
    kw = {k: v for k, v in config_dict(base).items() if k in fields}
    steps = base.steps or base.max_steps
    # overwrite: <ablation_dir>/<run> belongs to the ablation, which decides itself (--reuse) whether a run
    # trains again; a run it trains again replaces the old one
    kw.update(out_dir=os.path.join(base.ablation_dir, run), max_steps=steps, stop_step=0, resume=False, overwrite=True,
              eval_interval=steps, ckpt_interval=steps, image_interval=steps, layer_sem=layer_sem)
    kw.update({"a": dict(layer_recon=layer_sem, tie_branches=True),
               "b": dict(layer_recon=layer_sem, semantic_branch=False),
               "c": dict(semantic_branch=False),
               "d": dict()}[run])
    return tt.TrainTokenizerConfig(**kw)


def teacher_digest(folder):
    """sha256 of the teacher's weights: the same init_from path may hold a retrained teacher."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def run_one(base, run, layer_sem, digest):
    cfg = run_config(base, run, layer_sem)
    path = os.path.join(cfg.out_dir, "result.json")
    if base.reuse and os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("config") == json.loads(json.dumps(config_dict(cfg))) and old.get("teacher_sha256") == digest:
            print(f"run {run}: reusing {path}")
            return old
        print(f"run {run}: {path} was written with another config or teacher; training again")
    print(f"\n=== run {run}: {RUNS[run]} (layer_recon {cfg.layer_recon}, layer_sem {cfg.layer_sem}, "
          f"semantic_branch {cfg.semantic_branch}, tie_branches {cfg.tie_branches}), {cfg.max_steps} steps")
    t0 = time.time()
    raw, res = tt.train(cfg)
    if res is None:
        raise UserError(f"run {run}: train_tokenizer returned no evaluation (data={cfg.data!r} needs eval_data)")
    out = {"run": run, "name": RUNS[run], "layer_recon": cfg.layer_recon, "layer_sem": cfg.layer_sem,
           "semantic_branch": cfg.semantic_branch, "tie_branches": cfg.tie_branches, "steps": cfg.max_steps,
           "psnr": res["psnr"], "ssim": res["ssim"], "psnr_single_object": res.get("psnr_single_object"),
           "zero_shot_top1": res["zero_shot_top1"], "teacher_zero_shot_top1": res["teacher_zero_shot_top1"],
           "codes_pix": res["codes_pix"], "codes_sem": res["codes_sem"],
           "n_images": res["n_images"], "wall_s": time.time() - t0,
           "teacher_sha256": digest, "config": config_dict(cfg)}
    tu.write_json(out, path)
    return out


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def table(rows):
    """Markdown table: measured (shapes) next to the paper (ImageNet, So/14-384)."""
    lines = ["| run | recon @ | sem @ | PSNR dB | SSIM | zero-shot top-1 (teacher) | pix / sem book used | "
             "paper PSNR | paper zero-shot | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = PAPER[r["run"]]
        sem_at = "-" if not r["semantic_branch"] else f"{r['layer_sem']}" + (" (same book)" if r["tie_branches"] else "")
        zs = fmt(None if r["zero_shot_top1"] is None else 100 * r["zero_shot_top1"], ".1f")
        zs = zs + ("" if zs == "n/a" else " %") + f" ({100 * r['teacher_zero_shot_top1']:.1f} %)"
        sem_used = "n/a" if r["codes_sem"] is None else f"{100 * r['codes_sem']['usage_any_depth']:.0f} %"
        used = f"{100 * r['codes_pix']['usage_any_depth']:.0f} % / " + ("same book" if r["tie_branches"] else sem_used)
        paper_zs = "-" if p["zero_shot"] is None else f"{p['zero_shot']:.1f} %"  # not reported for (b), (c)
        lines.append(f"| ({r['run']}) {r['name']} | {r['layer_recon']} | {sem_at} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.3f} | {zs} | {used} | {p['psnr']:.2f} | {paper_zs} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(cfg):
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    from siglip import SigLIPConfig
    path = os.path.join(cfg.init_from, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"init_from={cfg.init_from!r}: need the SigLIP teacher folder with config.json "
                        f"(python train_siglip.py config/shapes.py)")
    with open(path) as f:
        L = SigLIPConfig.from_hf(json.load(f), where=path).vision.num_hidden_layers
    layer_sem = cfg.layer_sem or L - 1
    if cfg.data != "shapes" and not cfg.eval_data:  # found now, not after the first run has trained
        raise UserError(f"--data={cfg.data!r} needs --eval_data (an ImageFolder root): every run is evaluated")
    if not cfg.layer_recon < layer_sem:
        raise UserError(f"the ablation needs a shallow layer_recon ({cfg.layer_recon}) below "
                        f"layer_sem ({layer_sem})")
    os.makedirs(cfg.ablation_dir, exist_ok=True)
    digest = teacher_digest(cfg.init_from)
    rows = [run_one(cfg, r, layer_sem, digest) for r in cfg.runs]
    text = table(rows)
    print("\n" + text)
    summary = {"rows": rows, "table": text, "paper": PAPER, "wall_s": time.time() - t0, "threads": cfg.threads,
               "teacher": cfg.init_from, "teacher_sha256": digest, "config": config_dict(cfg)}
    tu.write_json(summary, os.path.join(cfg.ablation_dir, "ablation.json"))
    print(f"\n{len(rows)} runs in {summary['wall_s']:.0f} s; wrote {cfg.ablation_dir}/ablation.json")
    return summary


if __name__ == "__main__":
    run_main(lambda argv: main(parse_config(AblationConfig(), argv)))
