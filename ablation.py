"""
The paper's core ablation ("objective and layer", design §9): where do pixel codes and semantic
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
(design §7; SSIM is eval.py's) on eval_size images with 1..max_objects objects, zero-shot top-1
through the quantized semantic path on eval_size single-object images next to the teacher's (n/a
without a semantic branch: no number is made up from another path), and codebook usage.
Outputs: <ablation_dir>/<run>/ (a train_tokenizer out_dir each) and <ablation_dir>/ablation.json.

`python ablation.py mllm config/shapes.py`: why two vocabularies (design §10), the MLLM side. One teacher,
one tokenizer of each kind (the released two-vocabulary layout and a one-vocabulary tied one, the run (a) above)
and, for every variant x seed, an MLLM trained at one fixed budget and evaluated by eval.py mllm:
    dual          reads both stacks, draws both (gen_sem=True): the paper's model
    pix_gen       reads both, draws pixel codes only (gen_sem=False)
    sem_input     reads semantic codes only (draws both: what it reads back must be drawn)
    pix_input     reads pixel codes only, draws pixel codes only
    single_vocab  the tied tokenizer's one stack, read and drawn
Every stage is a subprocess of the project's own scripts with the preset(s) given here plus a few keys (the
command is in <stage>/ablation_<script>.json); a stage with its result is skipped, an interrupted one resumes
(--resume=True), so the command can be stopped and run again. Outputs: <ablation_dir>/ablation_mllm.json (one
entry per run) and ablation_mllm.md (mean and standard deviation over seeds, the paper's numbers beside).
"""
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

import train_tokenizer as tt
import train_utils as tu
import configurator
from configurator import PROGRESS, UserError, config_dict, parse_config, run_main
from folders import check_outputs, hold_folder, path_fields

# the paper's numbers (design §9, SigLIP-So/14-384 on ImageNet val; "-" = not reported)
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
    keys = configurator.keys(tt.TrainTokenizerConfig())
    kw = {k: v for k, v in config_dict(base).items() if k in keys}
    steps = base.steps or base.max_steps
    # the trainers' rule: a run folder that holds a model is replaced only with --overwrite=True (main refuses
    # before the first run trains; --reuse=True keeps a result written with the same config and teacher)
    kw.update(out_dir=os.path.join(base.ablation_dir, run), max_steps=steps, stop_step=0, resume=False,
              overwrite=base.overwrite, eval_interval=steps, ckpt_interval=steps, image_interval=steps,
              layer_sem=layer_sem)
    kw.update({"a": dict(layer_recon=layer_sem, tie_branches=True),
               "b": dict(layer_recon=layer_sem, semantic_branch=False),
               "c": dict(semantic_branch=False),
               "d": dict()}[run])
    return configurator.make(tt.TrainTokenizerConfig, **kw)


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


def reusable(cfg, digest):
    """The run's result.json when it was written with this config and teacher, else None."""
    path = os.path.join(cfg.out_dir, "result.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        old = json.load(f)
    same = old.get("config") == json.loads(json.dumps(config_dict(cfg))) and old.get("teacher_sha256") == digest
    return old if same else None


def run_one(base, run, layer_sem, digest):
    cfg = run_config(base, run, layer_sem)
    path = os.path.join(cfg.out_dir, "result.json")
    old = reusable(cfg, digest) if base.reuse else None
    if old is not None:
        print(f"run {run}: reusing {path}")
        return old
    if base.reuse and os.path.isfile(path):
        print(f"run {run}: {path} was written with another config or teacher; training again")
    PROGRESS["doing"] = f"training run {run} ({cfg.out_dir})"
    m = cfg.model
    print(f"\n=== run {run}: {RUNS[run]} (layer_recon {m.layer_recon}, layer_sem {m.layer_sem}, "
          f"semantic_branch {m.semantic_branch}, tie_branches {m.tie_branches}), {cfg.max_steps} steps")
    t0 = time.time()
    raw, res = tt.train(cfg)
    if res is None:
        raise UserError(f"run {run}: train_tokenizer returned no evaluation (data={cfg.data!r} needs eval_data)")
    out = {"run": run, "name": RUNS[run], "layer_recon": m.layer_recon, "layer_sem": m.layer_sem,
           "semantic_branch": m.semantic_branch, "tie_branches": m.tie_branches, "steps": cfg.max_steps,
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


@tu.holds("ablation_dir", unused=("out_dir",))  # out_dir: the preset's, each run gets its own
def main(cfg):
    """The tokenizer ablation: runs (a) to (d) trained from one teacher with one recipe and evaluated on the same
    held-out images, in a table beside the paper's numbers."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    if not os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        raise UserError(f"init_from={cfg.init_from!r}: need the SigLIP teacher folder with config.json "
                        f"(python train_siglip.py config/shapes.py)")
    layer_sem = cfg.model.layer_sem
    if cfg.data != "shapes" and not cfg.eval_data:  # found now, not after the first run has trained
        raise UserError(f"--data={cfg.data!r} needs --eval_data (an ImageFolder root): every run is evaluated")
    if not cfg.model.layer_recon < layer_sem:
        raise UserError(f"the ablation needs a shallow layer_recon ({cfg.model.layer_recon}) below "
                        f"layer_sem ({layer_sem})")
    if not cfg.runs:
        raise UserError(f"--runs='': nothing to train; give run letters from {sorted(RUNS)}, e.g. --runs=ad")
    if cfg.resume:
        raise UserError("--resume=True: ablation.py trains every run from its start; --reuse=True keeps the runs "
                        "already finished with this config")
    digest = teacher_digest(cfg.init_from)
    reads = path_fields(cfg, skip=("ablation_dir", "out_dir"))
    for r in cfg.runs:  # every run folder checked before the first run trains
        rc = run_config(cfg, r, layer_sem)
        tu.check_train_config(rc)
        check_outputs(reads, dirs=[(f"run {r}'s folder", rc.out_dir)])
        found = [f for f in tu.MODEL_FILES if os.path.isfile(os.path.join(rc.out_dir, f))]
        if found and not cfg.overwrite and (not cfg.reuse or reusable(rc, digest) is None):
            raise UserError(f"{rc.out_dir} already holds a finished run ({', '.join(found)}): --reuse=True keeps it "
                            f"when its result.json has this config and teacher, --overwrite=True trains it again; or "
                            f"choose another --ablation_dir")
    rows = [run_one(cfg, r, layer_sem, digest) for r in cfg.runs]
    text = table(rows)
    print("\n" + text)
    summary = {"rows": rows, "table": text, "paper": PAPER, "wall_s": time.time() - t0, "threads": cfg.threads,
               "teacher": cfg.init_from, "teacher_sha256": digest, "config": config_dict(cfg)}
    tu.write_json(summary, os.path.join(cfg.ablation_dir, "ablation.json"))
    print(f"\n{len(rows)} runs in {summary['wall_s']:.0f} s; wrote {cfg.ablation_dir}/ablation.json")
    return summary


# -----------------------------------------------------------------------------
# python ablation.py mllm: why two vocabularies

HERE = os.path.dirname(os.path.abspath(__file__))
# variant: (tokenizer kind, train_mllm keys)
VARIANTS = {
    "dual": ("dual", dict(input_codes="both", gen_sem=True)),
    "pix_gen": ("dual", dict(input_codes="both", gen_sem=False)),
    "sem_input": ("dual", dict(input_codes="sem", gen_sem=True)),
    "pix_input": ("dual", dict(input_codes="pix", gen_sem=False)),
    "single_vocab": ("single", dict(input_codes="pix", gen_sem=False)),
}
# the paper's figures for the nearest rows (DualToken, ICLR 2026): understanding = the average of ten benchmarks
# in its controlled LLaVA-1.5 study; generation = GenAI-Bench, advanced prompts, 3B models
PAPER_MLLM = {"dual": {"understanding": 53.9, "generation": 0.68}, "pix_gen": {"generation": 0.55},
              "single_vocab": {"understanding": 48.1, "generation": 0.60}}


@dataclass
class AblationMLLMConfig:
    ablation_dir: str = "out/ablation_mllm"
    variants: str = "dual,pix_gen,sem_input,pix_input,single_vocab"  # comma-separated names of VARIANTS
    seeds: tuple = (0, 1, 2)           # each variant trains once per seed (MLLM init, data order and images)
    steps: int = 8000                  # MLLM optimizer steps of every run (the fixed budget)
    train_size: int = 10000            # cached train images per seed
    tokenizer_steps: int = 2000        # both tokenizers (the preset's recipe, this many steps)
    detail_qa: bool = True             # train and ask the background question (data.ShapesConfig.detail_qa)
    cfg_scale: float = 1.2             # the sampler every run records and is evaluated with
    temperature: float = 0.6
    qa_images: int = 100               # eval.py mllm: val images (every question of each) ...
    gen_captions: int = 100            # ... and val captions drawn, the same for every run
    threads: int = 0                   # every stage's OMP_NUM_THREADS; 0: torch's default
    results: str = ""                  # '' -> <ablation_dir>/ablation_mllm.json (the .md beside it)
    collect: bool = False              # only rebuild the results from the runs already finished; train nothing


def run_stage(cmd, folder, done_file, resumable=True):
    """Run one project script unless `folder`/`done_file` exists. The arguments are recorded in
    `folder`/ablation_<script>.json; a folder made with other arguments is refused, not mixed. An interrupted
    trainer (train_state.pt, no result) resumes. Output goes to `folder`/ablation.log."""
    args_path = os.path.join(folder, f"ablation_{os.path.splitext(cmd[0])[0]}.json")
    if os.path.isfile(args_path):
        with open(args_path) as f:
            old = json.load(f)
        if old != cmd:
            raise UserError(f"{folder} was made by another command ({' '.join(old)}); remove it or choose another "
                            f"--ablation_dir")
    if os.path.isfile(os.path.join(folder, done_file)):
        return False
    resume = resumable and os.path.isfile(os.path.join(folder, "train_state.pt"))
    with hold_folder(folder):  # refused here, naming the holder, while another process writes the run
        tu.write_json(cmd, args_path)
    # the stage's script holds the folder itself while it runs (this process holds only ablation_dir)
    full = [sys.executable] + cmd + (["--resume=True"] if resume else [])
    print(("resuming: " if resume else "running: ") + " ".join(cmd), flush=True)
    log_path = os.path.join(folder, "ablation.log")
    PROGRESS["doing"] = f"running {' '.join(cmd)} (its output: {log_path})"
    with open(log_path, "a") as log:
        rc = subprocess.run(full, cwd=HERE, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not os.path.isfile(os.path.join(folder, done_file)):
        raise UserError(f"{' '.join(cmd)} failed (exit {rc}); see {os.path.join(folder, 'ablation.log')}")
    return True


def variant_list(cfg):
    names = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise UserError(f"--variants={cfg.variants!r}: unknown {bad}; expected comma-separated names from "
                        f"{list(VARIANTS)}")
    if not cfg.seeds or not all(isinstance(x, int) and x >= 0 for x in cfg.seeds):
        raise UserError(f"--seeds={cfg.seeds!r}: expected a tuple of non-negative ints, e.g. '(0, 1, 2)'")
    for k in ("steps", "train_size", "tokenizer_steps"):
        if getattr(cfg, k) <= 0:
            raise UserError(f"--{k}={getattr(cfg, k)}: need > 0")
    return names


def train_wall(log_path):
    """-> (seconds the trainer ran, summed over its processes, steps redone after a resume included; the
    number of processes): from log.jsonl, where each process starts with a "start" event and logs its own
    elapsed_s."""
    total, last, procs = 0.0, 0.0, 0
    with open(log_path) as f:
        for line in f:
            ev = json.loads(line)
            if ev.get("event") == "start":
                total, last, procs = total + last, 0.0, procs + 1
            last = max(last, ev.get("elapsed_s", 0.0))
    return total + last, procs


def mllm_entry(variant, seed, folder, cfg):
    """One run's row of ablation_mllm.json from its trainer's eval.json and eval.py's eval_ablation.json."""
    with open(os.path.join(folder, "eval.json")) as f:
        tr = json.load(f)
    with open(os.path.join(folder, "eval_ablation.json")) as f:
        ev = json.load(f)["val"]
    gen = ev.get("gen_cfg")
    wall, procs = train_wall(os.path.join(folder, "log.jsonl"))
    e = dict(variant=variant, seed=seed, steps=tr["step"], wall_s=wall, processes=procs, eval_wall_s=None,
             qa_accuracy=ev["qa"]["accuracy"], n_qa=ev["qa"]["n"],
             qa_by_type={t: v["accuracy"] for t, v in ev["qa"]["by_type"].items()},
             qa_shuffled=ev["qa_shuffled"]["accuracy"], qa_blind=ev["qa_blind"]["accuracy"],
             qa_blind_by_type={t: v["accuracy"] for t, v in ev["qa_blind"]["by_type"].items()},
             gen_all_correct=None if gen is None else gen["all_correct"],
             gen_by_attribute=None if gen is None else {k: gen[k] for k in ("count", "color", "shape", "size", "cell")},
             gen_false_objects=None if gen is None else gen["false_objects"],
             gen_unguided=None if ev.get("gen_no_cfg") is None else ev["gen_no_cfg"]["all_correct"],
             tokenizer_ceiling=ev["tokenizer_ceiling"]["all_correct"] if "tokenizer_ceiling" in ev else None)
    for k in ("qa_pix_swapped", "qa_sem_swapped"):
        if k in ev:
            e[k] = ev[k]["accuracy"]
            e[k + "_by_type"] = {t: v["accuracy"] for t, v in ev[k]["by_type"].items()}
    with open(os.path.join(folder, "eval_ablation.json")) as f:
        e["eval_wall_s"] = json.load(f)["wall_s"]
    with open(os.path.join(folder, "config.json")) as f:  # which tokenizer: a retrained one differs
        e["tokenizer_hash"] = json.load(f).get("tokenizer_hash")
    return e


def _ms(xs):
    """'mean +- sd (n)' of the non-None values; sd over seeds (n - 1 denominator), '-' when none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else None
    return f"{m:.3f}" + ("" if sd is None else f" ± {sd:.3f}") + f" ({len(xs)})"


def mllm_table(runs, variants):
    """Markdown: one row per variant, mean ± sd over its seeds (the count in brackets)."""
    types = sorted({t for r in runs for t in r["qa_by_type"]})
    attrs = ("count", "color", "shape", "size", "cell")
    head = ["variant", "seeds", "QA", *types, "pix swapped", "sem swapped", "drawn all-correct", *attrs,
            "paper und. (avg 10)", "paper GenAI-Bench adv."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    blind = {t: _ms([r["qa_blind_by_type"].get(t) for r in runs]) for t in types}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        p = PAPER_MLLM.get(v, {})
        row = [f"`{v}`", ",".join(str(r["seed"]) for r in rs), _ms([r["qa_accuracy"] for r in rs]),
               *[_ms([r["qa_by_type"].get(t) for r in rs]) for t in types],
               _ms([r.get("qa_pix_swapped") for r in rs]), _ms([r.get("qa_sem_swapped") for r in rs]),
               _ms([r["gen_all_correct"] for r in rs]),
               *[_ms([(r["gen_by_attribute"] or {}).get(a) for r in rs]) for a in attrs],
               str(p.get("understanding", "-")), str(p.get("generation", "-"))]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| blind baseline | | " + _ms([r["qa_blind"] for r in runs]) + " | "
                 + " | ".join(blind[t] for t in types) + " |" + " |" * (len(head) - 3 - len(types)))
    return "\n".join(lines)


def tokenizer_layer_sem(presets):
    """The deep layer the presets' tokenizer takes semantic codes from: where the one-vocabulary tokenizer puts
    its single quantizer (run (a))."""
    cfg = tt.TrainTokenizerConfig()
    for p in presets:
        configurator.apply_preset(cfg, p)
    return cfg.model.layer_sem


def main_mllm(argv):
    """The MLLM ablation: each variant (what an image position reads, what is drawn, one vocabulary or two) trained
    once per seed at one budget and evaluated by eval.py mllm, in a table beside the paper's numbers."""
    presets = [a for a in argv if not a.startswith("-")]
    cfg = parse_config(AblationMLLMConfig(), argv, "mllm", COMMANDS)
    variants = variant_list(cfg)
    tu.check_values(cfg)
    if not presets:
        raise UserError("python ablation.py mllm needs the pipeline preset, e.g. config/shapes.py")
    D, t0 = cfg.ablation_dir, time.time()
    results = cfg.results or os.path.join(D, "ablation_mllm.json")
    check_outputs([("preset", p) for p in presets], dirs=[("--ablation_dir", D)], files=[("--results", results)])
    # --collect=True trains nothing and only writes the results: it holds their folder, so a --results outside
    # ablation_dir can be rebuilt while the ablation itself still runs
    with hold_folder(os.path.dirname(os.path.abspath(results)) if cfg.collect else D):
        return _ablation_mllm(cfg, presets, variants, results, t0)


def _ablation_mllm(cfg, presets, variants, results, t0):
    """main_mllm's stages, run while this process holds ablation_dir."""
    D = cfg.ablation_dir
    if cfg.threads:  # as the environment: every stage's torch reads it, not every script has a threads key
        os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
    teacher, toks = os.path.join(D, "siglip"), {"dual": os.path.join(D, "tok_dual"), "single": os.path.join(D, "tok_single")}
    stage = (lambda *a, **k: None) if cfg.collect else run_stage
    kept = recorded_runs(results, cfg, variants)
    stage(["train_siglip.py", *presets, f"--out_dir={teacher}"], teacher, "eval.json")
    kinds = sorted({VARIANTS[v][0] for v in variants})
    for kind in kinds:
        extra = [f"--layer_recon={tokenizer_layer_sem(presets)}", "--tie_branches=True"] if kind == "single" else []
        stage(["train_tokenizer.py", *presets, f"--init_from={teacher}", f"--out_dir={toks[kind]}",
               f"--max_steps={cfg.tokenizer_steps}", f"--eval_interval={cfg.tokenizer_steps}",
               f"--image_interval={cfg.tokenizer_steps}", f"--ckpt_interval={min(1000, cfg.tokenizer_steps)}",
               *extra], toks[kind], "eval.json")
    runs = []
    for seed in cfg.seeds:  # seed-major: a stopped command has every variant of the first seeds
        for v in variants:
            kind, keys = VARIANTS[v]
            run = os.path.join(D, f"{v}_s{seed}")
            stage(["train_mllm.py", *presets, f"--tokenizer={toks[kind]}", f"--out_dir={run}", f"--seed={seed}",
                   f"--max_steps={cfg.steps}", f"--train_size={cfg.train_size}", f"--detail_qa={cfg.detail_qa}",
                   f"--cache_dir={os.path.join(D, f'cache_{kind}_s{seed}')}", f"--cfg_scale={cfg.cfg_scale}",
                   f"--temperature={cfg.temperature}", "--eval_qa=0", "--eval_gen=0", "--eval_interval=0",
                   "--sample_interval=0", f"--ckpt_interval={min(1000, cfg.steps)}",
                   *[f"--{k}={val}" for k, val in keys.items()]], run, "eval.json")
            stage(["eval.py", "mllm", f"--mllm={run}", f"--out={os.path.join(run, 'eval_ablation.json')}",
                   f"--qa_images={cfg.qa_images}", f"--gen_captions={cfg.gen_captions}", "--train_images=0",
                   ], run, "eval_ablation.json", resumable=False)
            if os.path.isfile(os.path.join(run, "eval_ablation.json")):  # (collect: only the finished ones)
                runs.append(mllm_entry(v, seed, run, cfg))
                write_results(cfg, runs, variants, results, t0)
            elif (v, seed) in kept:
                runs.append(kept[v, seed])
                print(f"kept {v} seed {seed} from {results} (its folder {run} is not here)")
    pic = os.path.splitext(results)[0] + ".png"
    if comparison_picture(D, cfg.seeds[0], pic) is not None:
        print(f"wrote {pic}")
    return write_results(cfg, runs, variants, results, t0, final=True)


PICTURE_VARIANTS = ("dual", "pix_gen", "single_vocab")


@torch.no_grad()
def comparison_picture(D, seed, path, n=8):
    """The same n held-out captions (the val split eval.py draws from) drawn by the seed's dual, pix_gen and
    single_vocab models, each with its recorded sampler and one generator seeded alike: one row per caption,
    the true image first. Skipped (None) until those three runs exist."""
    from types import SimpleNamespace
    import codec
    import data
    from loaders import load_pair
    folders = [os.path.join(D, f"{v}_s{seed}") for v in PICTURE_VARIANTS]
    if not all(os.path.isfile(os.path.join(f, "eval.json")) for f in folders):
        return None
    cols, samples = [], None
    for f in folders:
        model, text_tok, image_tok, info = load_pair(
            SimpleNamespace(mllm=f, tokenizer="", siglip_config="", check_hash=True), "cpu")
        if samples is None:
            R = image_tok.config.siglip.vision.image_size
            world = data.ShapesWorld(data.ShapesConfig(image_size=R, max_objects=2, seed=0))
            samples = [world.sample("val", i) for i in range(n)]
            cols.append([s["image"] for s in samples])
        g = torch.Generator().manual_seed(0)
        ims, _ = codec.generate_images(model, image_tok, text_tok, [s["caption"] for s in samples], g, n,
                                       **codec.sampling_settings(SimpleNamespace(**dict.fromkeys(
                                           codec.SAMPLING_KEYS)), info))
        cols.append(list(data.to_image(ims)))
    rows = [list(r) for r in zip(*cols)]
    labels = [f"{s['caption']}  (true | " + " | ".join(PICTURE_VARIANTS) + ")" for s in samples]
    return data.grid_png(rows, path, labels=labels)


def recorded_runs(path, cfg, variants):
    """{(variant, seed): entry} of the runs an existing results file holds, for the variants and seeds of this
    command: a run whose folder is gone (another machine, a cleaned out/) stays in the results, and a run whose
    folder is here replaces its entry. A file made at another budget or sampler is refused, not mixed."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    keys = ("steps", "train_size", "tokenizer_steps", "detail_qa", "cfg_scale", "temperature", "qa_images",
            "gen_captions")
    mine, theirs = config_dict(cfg), old.get("config", {})
    diff = [f"{k} {theirs.get(k)!r} here {mine[k]!r}" for k in keys if theirs.get(k) != mine[k]]
    if diff:
        raise UserError(f"--results={path} holds runs made with other settings ({'; '.join(diff)}); choose another "
                        f"--results")
    return {(e["variant"], e["seed"]): e for e in old.get("runs", [])
            if e["variant"] in variants and e["seed"] in cfg.seeds}


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_results(cfg, runs, variants, path, t0, final=False):
    """The JSON (every finished run) and the markdown table beside it, rewritten after each run."""
    text = mllm_table(runs, variants)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    argv = [a for a in sys.argv[2:] if not a.startswith("--collect")]  # the command that trains these runs
    out = dict(command="python ablation.py mllm " + " ".join(argv), date=time.strftime("%Y-%m-%d"),
               commit=git_commit(), machine=f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}",
               budget=dict(steps=cfg.steps, train_size=cfg.train_size, tokenizer_steps=cfg.tokenizer_steps),
               paper=PAPER_MLLM, config=config_dict(cfg), runs=runs, table=text)
    tu.write_json(out, path)
    configurator.atomic_write(os.path.splitext(path)[0] + ".md", lambda f: f.write((text + "\n").encode()))
    if final:
        print("\n" + text + f"\n\n{len(runs)} runs; wrote {path} ({time.time() - t0:.0f} s)")
    return out


COMMANDS = {"tokenizer": main, "mllm": main_mllm}


def main_cli(argv):
    name, argv = configurator.command(argv, COMMANDS, optional=True)  # no command: the tokenizer ablation
    if name == "mllm":
        return main_mllm(argv)
    return main(parse_config(AblationConfig(), argv, name, COMMANDS))


if __name__ == "__main__":
    run_main(main_cli)
