from dataclasses import dataclass
from typing import Optional

import pytest

from configurator import parse_config


@dataclass
class Cfg:
    lr: float = 1e-3
    steps: int = 10
    compile: bool = True
    name: str = "x"
    shape: tuple = (4, 4)
    maybe: Optional[int] = None


def test_overrides_are_typed(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("steps = 20\nname = 'preset'\n")
    cfg = parse_config(Cfg(), [str(preset), "--lr=3e-4", "--compile=False", "--shape=(8, 2)",
                               "--maybe=3", "--steps=5"])
    assert cfg == Cfg(lr=3e-4, steps=5, compile=False, name="preset", shape=(8, 2), maybe=3)
    assert parse_config(Cfg(), ["--maybe=None"]).maybe is None


def test_unknown_keys_fail_loudly(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*'stpes'"):
        parse_config(Cfg(), ["--stpes=3"])
    preset = tmp_path / "p.py"
    preset.write_text("learning_rate = 1.0\n")
    with pytest.raises(ValueError, match="learning_rate"):
        parse_config(Cfg(), [str(preset)])
    with pytest.raises(ValueError, match="expected a bool"):
        parse_config(Cfg(), ["--compile=maybe"])
    with pytest.raises(ValueError, match="expected int"):
        parse_config(Cfg(), ["--steps=1.5"])


@dataclass
class SectionCfg:
    SECTION = "tok"  # a plain class attribute (no annotation), not a field
    steps: int = 1
    lr: float = 0.1


def test_preset_sections(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("lr = 0.5\ntok_config = dict(steps=7)\nmllm_config = dict(nonsense=1)\n")
    cfg = parse_config(SectionCfg(), [str(preset)])
    assert (cfg.steps, cfg.lr) == (7, 0.5)  # another script's section is skipped
    preset.write_text("tok_config = dict(stepz=7)\n")
    with pytest.raises(ValueError, match="stepz"):
        parse_config(SectionCfg(), [str(preset)])


@dataclass
class EvalLikeCfg:
    siglip_config: str = ""  # a real field whose name ends in _config (eval.py / sample.py)
    lr: float = 0.1


def test_config_named_fields_and_misspelt_sections(tmp_path):
    """A `..._config` value that is not a section dict is an ordinary key (it was dropped: eval.py's
    siglip_config could not be set from a preset); a misspelt section is an error (it was skipped)."""
    preset = tmp_path / "p.py"
    preset.write_text("siglip_config = '/weights/siglip'\nlr = 0.5\n")
    assert parse_config(EvalLikeCfg(), [str(preset)]).siglip_config == "/weights/siglip"
    preset.write_text("tokenzier_config = dict(steps=7)\n")
    with pytest.raises(ValueError, match="unknown section.*tokenzier_config"):
        parse_config(SectionCfg(), [str(preset)])
    with pytest.raises(ValueError, match="tokenzier_config"):
        parse_config(EvalLikeCfg(), [str(preset)])


def test_preset_values_are_typed_like_the_command_line(tmp_path):
    """A preset's value goes through its field's type as `--key=value` does: an int may stand for a float, a list
    for a tuple, None for an Optional; anything else names the preset, the key and the value."""
    preset = tmp_path / "p.py"
    preset.write_text("lr = 1\nshape = [2, 3]\nmaybe = None\n")
    cfg = parse_config(Cfg(), [str(preset)])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.shape == (2, 3) and cfg.maybe is None
    for text, msg in (("steps = '10'", r"steps = '10': expected int, got str"),
                      ("steps = True", r"steps = True: expected int, got bool"),
                      ("compile = 1", r"compile = 1: expected bool"), ("shape = 4", r"shape = 4: expected tuple"),
                      ("maybe = 1.5", r"maybe = 1.5: expected int, got float")):
        preset.write_text(text + "\n")
        with pytest.raises(ValueError, match=msg):
            parse_config(Cfg(), [str(preset)])
    with pytest.raises(ValueError, match=r"--shape: expected a tuple"):  # a bare `tuple` field on the command line
        parse_config(Cfg(), ["--shape='ab'"])
