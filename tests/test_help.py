"""Every script says how to use it: `--help` / `-h` lists what it does and every key with its type, default and
meaning (the comment beside the field), writes nothing and exits 0; a misspelt key or command is answered on one
`error:` line with the closest valid ones.

Most calls run a script's `main` under configurator.run_main in-process (the code path of `python script.py`
without starting torch again); two run the real script as a subprocess. Each runs from an empty folder that
must stay empty, and the checkout's `git status` must not change.
"""
import contextlib
import dataclasses
import importlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

import configurator
from configurator import parse_config, run_main
from conftest import ROOT

SHAPES = os.path.join(ROOT, "config", "shapes.py")


def run(script, argv):
    """-> (exit code, stdout, stderr) of `main(argv)` of `script`.py under run_main, in-process."""
    mod = importlib.import_module(script)
    main = mod.main_cli if script == "ablation" else mod.main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(main, argv)
            rc = 0
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def run_sub(script, argv, cwd):
    p = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), *argv], cwd=cwd, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return p.returncode, p.stdout, p.stderr


def checkout_state():
    """The checkout's `git status` (changed and new files, ignored ones left out), or None outside git."""
    try:
        p = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


@pytest.fixture
def untouched(tmp_path, monkeypatch):
    """Run from an empty folder; afterwards that folder is still empty and the checkout unchanged."""
    before = checkout_state()
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert os.listdir(tmp_path) == [], "--help wrote files"
    assert checkout_state() == before, "--help changed the checkout"


TRAINERS = {"train_siglip": "TrainSigLIPConfig", "train_tokenizer": "TrainTokenizerConfig",
            "train_mllm": "TrainMLLMConfig"}


def config_class(script, cmd):
    """The config class whose keys `python script.py cmd --help` lists, where the script exposes it."""
    mod = importlib.import_module(script)
    if script in TRAINERS:
        return getattr(mod, TRAINERS[script])
    if script in ("sample", "eval") and cmd:
        return mod.JOBS[cmd[0]][0]
    if script == "ablation":
        return mod.AblationMLLMConfig if cmd == ["mllm"] else mod.AblationConfig
    return mod.GPUBench if (script, cmd) == ("bench", ["gpu"]) else None


def flat(text):
    return " ".join(text.split())


def key_line(out, name, value):
    """The help's row of key `name` when it shows `value` as the default."""
    m = re.search(rf"^  {name}: .*? = {re.escape(repr(value))}(  |$).*$", out, re.M)
    return m and m.group(0)


# (script, command words, what the help must show besides the config class's keys)
CASES = [
    ("train_siglip", [], ["usage: python train_siglip.py", "# optimisation"]),
    ("train_tokenizer", [], ["usage: python train_tokenizer.py", "tokenizer_config = dict(...)"]),
    ("train_mllm", [], ["usage: python train_mllm.py", "mllm_config = dict(...)"]),
    ("sample", [], ["commands:", "  reconstruct ", "  generate ", "  answer "]),
    ("sample", ["reconstruct"], ["usage: python sample.py reconstruct", "Common (sample.py)"]),
    ("sample", ["generate"], ["usage: python sample.py generate"]),
    ("sample", ["answer"], ["usage: python sample.py answer"]),
    ("eval", [], ["commands:", "  tokenizer ", "  mllm ", "  t2i ", "  probes "]),
    ("eval", ["tokenizer"], ["usage: python eval.py tokenizer"]),
    ("eval", ["mllm"], ["usage: python eval.py mllm", "EvalMLLMCommon (eval.py): The settings"]),
    ("eval", ["t2i"], ["usage: python eval.py t2i"]),
    ("eval", ["probes"], ["usage: python eval.py probes"]),
    ("ablation", [], ["usage: python ablation.py [tokenizer|mllm]", "commands:",
                      "TrainTokenizerConfig (train_tokenizer.py)"]),
    ("ablation", ["tokenizer"], ["usage: python ablation.py tokenizer"]),
    ("ablation", ["mllm"], ["usage: python ablation.py mllm"]),
    ("bench", [], ["commands:", "  rvq ", "  siglip ", "  llm ", "  gpu ", "  memory "]),
    ("bench", ["rvq"], ["codebook_size: int = 16384", "search_chunk: int = 512"]),
    ("bench", ["siglip"], ["width: int = 1152", "blocks: int = 3"]),
    ("bench", ["llm"], ["n_layer: int = 4", "new_tokens: int = 32"]),
    ("bench", ["gpu"], ["usage: python bench.py gpu"]),
    ("bench", ["memory"], ["llm: str = 'qwen2.5-3b'", "tokenizer: str = 'config/dualtoken_384.py'"]),
    ("convert", [], ["python convert.py CKPT OUT_DIR"]),
    ("data", [], ["python data.py [N]", "python data.py export DIR [N] [SIZE]"]),
    ("checker", [], ["python checker.py [N]"]),
]


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("case", CASES, ids=[" ".join([s] + c) for s, c, _ in CASES])
def test_every_script_and_command_answers_help(case, flag, untouched):
    script, cmd, shows = case
    rc, out, err = run(script, cmd + [flag])
    assert (rc, err) == (0, ""), err
    for s in shows:
        assert s in out, f"{s!r} not in the help of {script} {cmd}:\n{out}"
    cls = config_class(script, cmd)
    if cls is not None:  # every key, with its default (a group, decoder, is the rows of its keys)
        for k, (obj, name, _) in configurator.keys(cls()).items():
            if not dataclasses.is_dataclass(getattr(obj, name)):
                assert key_line(out, re.escape(k), getattr(obj, name)), f"no row for {k} in:\n{out}"


def test_help_shows_the_field_comments():
    """The meaning beside a key is the comment beside its field: on its line, continued on the next ones, or a
    comment block above a group; for an inherited field, the comment in the class that defines it."""
    _, out, _ = run("eval", ["mllm", "--help"])
    assert "val captions drawn, with and without CFG" in key_line(out, "gen_captions", 100)
    assert "accept a tokenizer hash mismatch" in key_line(out, "check_hash", True)  # EvalMLLMCommon's field
    assert "covers them): QA on images it trained on beside val tells memorising from learning" in flat(out)
    assert "\n  # sampler; None: as the MLLM's trainer evaluated it" in out
    _, out, _ = run("train_mllm", ["-h"])
    assert '"words": the shapes world\'s closed word list; else an HF tokenizer.json (needs `tokenizers`)' in flat(out)
    _, out, _ = run("ablation", ["--help"])
    assert "HF-format SigLIP folder: the tokenizer's init AND the frozen teacher" in out  # TrainTokenizerConfig's


def test_help_with_a_preset_shows_what_it_sets(untouched):
    rc, out, _ = run("train_mllm", [SHAPES, "--max_steps=7", "--help"])
    assert rc == 0
    preset = configurator.preset_values(SHAPES, "mllm")
    assert re.search(r"^  max_steps: int = 2000 +7( |$)", out, re.M)
    assert re.search(rf"^  n_embd: int = 256 +{preset['n_embd']!r}( |$)", out, re.M)
    assert f"set: what `{SHAPES} --max_steps=7` gives" in flat(out)
    rc, out, _ = run("ablation", [SHAPES, "--steps=3", "-h"])  # the default command with the tokenizer section
    tok = configurator.preset_values(SHAPES, "tokenizer")
    assert rc == 0 and re.search(r"^  steps: int = 150 +3( |$)", out, re.M)
    assert re.search(rf"^  vq_pix\.codebook_size: int = \d+ +{tok['vq_pix']['codebook_size']!r}( |$)", out, re.M)


@pytest.mark.parametrize("script, argv, says", [
    ("train_mllm", ["--max_step=5"], "unknown config key 'max_step' (did you mean max_steps?) on the command line"),
    ("sample", ["generate", "--captoins=x"], "'captoins' (did you mean captions?)"),
    ("eval", ["mllm", "--qa_image=3"], "'qa_image' (did you mean qa_images"),
    ("ablation", ["mllm", "--variant=dual"], "'variant' (did you mean variants?)"),
    ("bench", ["rvq", "--dpeth=2"], "'dpeth' (did you mean depth?)"),
    ("sample", ["generate", "captions=x"], "got 'captions=x'; did you mean --captions=x?"),
    ("sample", ["generat"], "unknown command 'generat'; did you mean generate?"),
    ("bench", ["rqv"], "unknown command 'rqv'; did you mean rvq?"),
    ("ablation", ["mlm", SHAPES], "unknown command 'mlm'; did you mean mllm?"),
    ("eval", [], "usage: python eval.py {tokenizer|mllm|t2i|probes}"),
])
def test_a_typo_names_the_key_that_was_meant(script, argv, says, untouched):
    rc, out, err = run(script, argv)
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert says in err and "--help" in err, err


def test_a_preset_typo_names_the_key_in_one_line(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("max_step = 5\nlearning_rate = 1.0\nbatch_size = 8\n")
    rc, out, err = run("train_mllm", [str(preset)])
    assert rc == 2 and err.count("\n") == 1, err
    assert re.match(rf"error: unknown config keys 'max_step' \(did you mean max_steps\?\), 'learning_rate' "
                    rf"\(no key is close\) in {re.escape(str(preset))}; `python train_mllm.py --help` lists every key",
                    err), err


def test_the_real_script(untouched):
    """`python train_mllm.py --help` itself (the __main__ wiring), and the typo that must not train."""
    rc, out, err = run_sub("train_mllm", ["--help"], untouched)
    assert (rc, err) == (0, "") and key_line(out, "max_steps", 2000), (rc, err[-2000:])
    rc, out, err = run_sub("train_mllm", ["--max_step=5"], untouched)
    assert rc == 2 and out == "" and err.count("\n") == 1, (out, err)
    assert "did you mean max_steps?" in err


# ---------------------------------------------------------------------------------------------------------------
# the layout rules on a config written here


@dataclass
class Demo:
    """A config of every layout."""
    SECTION = "demo"  # a class attribute, not a key
    out: str = "x"  # where it goes
    # group one: these two
    # (a heading of two lines)
    a: int = 1
    b: Optional[float] = None  # a meaning that goes on
                               # on the next line
    c: tuple[int, ...] = (1, 2)  # and another,
    #                              continued at the heading's column

    d: bool = False


@dataclass
class SubDemo(Demo):
    out: str = "y"
    e: str = ""  # its own


def test_layout_rules(capsys):
    doc, items = configurator._class_layout(Demo)
    assert doc == "A config of every layout."
    assert items == [("field", "out", ["where it goes"]),
                     ("heading", ["group one: these two", "(a heading of two lines)"]),
                     ("field", "a", []),
                     ("field", "b", ["a meaning that goes on", "on the next line"]),
                     ("field", "c", ["and another,", "continued at the heading's column"]),
                     ("gap",), ("field", "d", [])]
    with pytest.raises(SystemExit) as e:
        parse_config(SubDemo(), ["--d=True", "-h"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    lines = out.splitlines()
    assert re.match(r"  e: str = '' +its own$", lines[lines.index("SubDemo (test_help.py)") + 2])
    assert re.search(r"^  out: str = 'y' +where it goes$", out, re.M)  # the comment of the class that has one
    assert re.search(r"^  b: Optional\[float\] = None +a meaning that goes on on the next line$", out, re.M)
    assert re.search(r"^  c: tuple\[int, \.\.\.\] = \(1, 2\) +and another, continued", out, re.M)
    assert re.search(r"^  d: bool = False +True$", out, re.M)
    assert "  # group one: these two\n  # (a heading of two lines)\n  a: int = 1\n" in out
    assert "demo_config = dict(...)" in out and "not a key" not in out
