"""The shipped shapes models (pretrained/shapes/): they load from the repository alone and answer and draw as
their recorded small evaluation says, so a change that breaks loading, prompting, sampling or decoding fails here
even when every unit test passes. The record, pretrained/shapes/regression.json, is eval.py mllm's output at the
settings below, made when the models were copied in (pretrained/shapes/README.md)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import checker
import data
import eval as ev
import sample
from conftest import ROOT

SHIP = os.path.join(ROOT, "pretrained", "shapes")
MLLM = os.path.join(SHIP, "mllm")
# the record's command: python eval.py mllm --mllm=pretrained/shapes/mllm <ARGS> --out=pretrained/shapes/regression.json
ARGS = {"qa_images": 20, "gen_captions": 20, "train_images": 0, "blind_samples": 200, "seed": 0}
# Greedy answers move only where two answers are within float noise of each other, and a sampled drawing only
# where a draw sits on a probability boundary: on another CPU (another BLAS, other last digits) a few of the ~200
# answers or of the 20 drawings may flip. The margins allow that and no more: a broken loader, prompt, sampler
# or decoder lands near the blind baseline (QA about 0.4) and near no drawing right.
QA_TOL, DRAW_TOL, CEIL_TOL = 0.03, 0.15, 0.05


def test_shipped_mllm_scores_as_recorded(tmp_path):
    with open(os.path.join(SHIP, "regression.json")) as f:
        was = json.load(f)
    assert {k: was["config"][k] for k in ARGS} == ARGS  # the record was made with the settings checked here
    got = ev.main(["mllm", f"--mllm={MLLM}", *[f"--{k}={v}" for k, v in ARGS.items()], f"--out={tmp_path / 'e.json'}"])
    got, was = got["val"], was["val"]
    assert (got["qa"]["n"], got["gen_cfg"]["n"]) == (was["qa"]["n"], was["gen_cfg"]["n"])
    assert got["qa"]["accuracy"] == pytest.approx(was["qa"]["accuracy"], abs=QA_TOL)
    assert got["qa_shuffled"]["accuracy"] == pytest.approx(was["qa_shuffled"]["accuracy"], abs=QA_TOL)
    for k in ("gen_cfg", "gen_no_cfg"):
        assert got[k]["all_correct"] == pytest.approx(was[k]["all_correct"], abs=DRAW_TOL), k
    assert got["tokenizer_ceiling"]["all_correct"] == pytest.approx(was["tokenizer_ceiling"]["all_correct"],
                                                                    abs=CEIL_TOL)


def test_readme_commands_answer_and_draw(tmp_path):
    """The README's first two commands: a question about the shipped held-out image, and a caption drawn."""
    s = data.ShapesWorld(data.ShapesConfig(image_size=48)).sample("val", 0)  # what `data.py export` writes first
    img = os.path.join(ROOT, "assets", "val_0000.png")
    assert np.array_equal(np.asarray(Image.open(img).convert("RGB")), np.asarray(s["image"]))
    assert ("what color is the circle?", "blue") in [tuple(qa) for qa in s["qa"]]
    a = sample.main(["answer", f"--mllm={MLLM}", f"--image={img}", "--question=what color is the circle?",
                     f"--out_dir={tmp_path / 'a'}", "--device=cpu"])
    assert a["answer"] == "blue"
    g = sample.main(["generate", f"--mllm={MLLM}", "--captions=a large red circle in the center", "--seed=0",
                     f"--out_dir={tmp_path / 'g'}", "--device=cpu"])
    pics = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in g["images"]])
    want = [[dict(color="red", shape="circle", size="large", cell="center")]] * len(pics)
    assert len(pics) == 4 and checker.score_images(pics, want)["all_correct"] >= 0.5
