"""One home per field: a trainer's config holds its model's config (the `model` field) instead of copying its
fields, and the command line still names them alone (--n_layer=4) or, inside a group, with a dot
(--decoder.ch=64); config.json / train_state.pt keep the flat layout a preset writes."""
import dataclasses
from dataclasses import dataclass, field

import pytest

import ablation
import configurator
import train_mllm as tm
import train_tokenizer as tt
from configurator import UserError, config_dict, keys, make, parse_config
from losses import LossConfig
from mllm import MLLMConfig
from tokenizer import DecoderConfig, DualTokenConfig, QuantizerConfig

TRAINERS = {tm.TrainMLLMConfig: MLLMConfig, tt.TrainTokenizerConfig: DualTokenConfig,
            ablation.AblationConfig: DualTokenConfig, ablation.AblationMLLMConfig: None}


def field_names(cls):
    """Every field of a config class and of the configs nested in it (DualTokenConfig's quantizers, decoder)."""
    out = set()
    for f in dataclasses.fields(cls):
        out.add(f.name)
        t = f.type if isinstance(f.type, type) else None
        if t is not None and dataclasses.is_dataclass(t):
            out |= field_names(t)
    return out


MODEL_FIELDS = field_names(MLLMConfig) | field_names(DualTokenConfig) | field_names(QuantizerConfig) | field_names(
    DecoderConfig) | field_names(LossConfig)


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda c: c.__name__)
def test_no_trainer_declares_a_model_field_again(trainer):
    own = {n for c in trainer.__mro__ if dataclasses.is_dataclass(c) for n in c.__dict__.get("__annotations__", {})}
    again = sorted((own - set(configurator.FLAT)) & MODEL_FIELDS)
    assert not again, f"{trainer.__name__} declares model fields again: {again} (set them in its `model` config)"
    model = TRAINERS[trainer]
    if model is not None:  # it holds the model's config, whose defaults are the model's own
        assert {f.name: f.type for f in dataclasses.fields(trainer)}["model"] is model
        assert trainer().model == model()
    keys(trainer())  # and no key is named twice (keys raises)


def test_flat_dotted_and_grouped_keys(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("tokenizer_config = dict(layer_sem=3, vq_pix=dict(depth=5), decoder=dict(ch=64))\n")
    cfg = parse_config(tt.TrainTokenizerConfig(), [str(preset), "--vq_sem.depth=2", "--lr=0.5", "--layer_recon=0"])
    m = cfg.model
    assert (m.layer_sem, m.layer_recon, m.vq_pix.depth, m.vq_sem.depth, m.decoder.ch, cfg.lr) == (3, 0, 5, 2, 64, 0.5)
    assert m.vq_pix.codebook_size == QuantizerConfig().codebook_size  # a group's dict sets only what it names
    d = config_dict(cfg)  # the keys as a preset writes them: the model's beside the trainer's, a group as a dict
    assert d["layer_sem"] == 3 and d["vq_pix"]["depth"] == 5 and "model" not in d and "siglip" not in d
    assert "resolution" not in d["decoder"]  # DERIVED: the teacher's
    assert make(tt.TrainTokenizerConfig, **d) == cfg  # what ablation.run_config rebuilds a run from
    t = parse_config(tt.TrainTokenizerConfig(), ["--w_edge=0.5", "--w_rec=2.0"])  # the loss weights: one home
    assert (t.loss.w_edge, t.loss.w_rec, config_dict(t)["w_edge"], "loss" in config_dict(t)) == (0.5, 2.0, 0.5, False)
    assert tt.TrainTokenizerConfig().loss == LossConfig()
    c = make(tm.TrainMLLMConfig, n_layer=2, max_steps=7)
    assert (c.model.n_layer, c.max_steps, config_dict(c)["n_layer"]) == (2, 7, 2)


@pytest.mark.parametrize("argv, says", [
    (["--vocab_size=9"], "'vocab_size' (it comes from the text tokenizer"),
    (["--n_layr=2"], "'n_layr' (did you mean n_layer?)"),
    (["--model.n_layer=2"], "'model.n_layer'"),
    (["--n_layer=two"], "--n_layer: expected int, got 'two'"),
])
def test_model_keys_fail_loudly(argv, says):
    with pytest.raises(UserError) as e:
        parse_config(tm.TrainMLLMConfig(), argv)
    assert says in str(e.value)


@pytest.mark.parametrize("argv, says", [
    (["--vq_pix.dpeth=2"], "'vq_pix.dpeth' (did you mean vq_pix.depth?)"),
    (["--decoder.resolution=64"], "'decoder.resolution' (it comes from the teacher's image size)"),
    (["--vq_pix=3"], "vq_pix = 3: expected a dict of vq_pix's keys"),
    (["--codebook_size=3"], "did you mean vq_pix.codebook_size or vq_sem.codebook_size?"),
])
def test_group_keys_fail_loudly(argv, says, tmp_path):
    with pytest.raises(UserError) as e:
        parse_config(tt.TrainTokenizerConfig(), argv)
    assert says in str(e.value)
    preset = tmp_path / "p.py"
    preset.write_text("vq_pix = dict(depth='six')\n")
    with pytest.raises(UserError, match=r"vq_pix.depth = 'six': expected int"):
        parse_config(tt.TrainTokenizerConfig(), [str(preset)])


@dataclass
class Inner:
    a: int = 1


@dataclass
class Clash:
    a: int = 2
    model: Inner = field(default_factory=Inner)


def test_a_name_in_both_the_trainer_and_its_model_is_a_bug():
    with pytest.raises(TypeError, match="two keys named 'a'"):
        configurator.keys(Clash())
