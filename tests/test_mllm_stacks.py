"""Which code stacks an MLLM reads (input_codes), the model without a semantic stack, and the depth heads'
KV cache along the depths: each checked against the behaviour it must equal."""
import pytest
import torch

import mllm
from mllm import MLLM, tiny_config
from sequences import build_sequence, collate_sequences, make_targets
from test_mllm import random_codes, tiny_model


# --- input_codes: which stack a model reads ------------------------------------------------------------

def _und_logits(m, p, s):
    """Logits of one understood image (4 positions) and two question tokens, reading codes p / s."""
    cfg = m.config
    b = collate_sequences(cfg, [build_sequence(cfg, [("und", 4), [65, 66]])])
    with torch.no_grad():
        return m(b["idx"], image_mask=b["image_mask"], pix_codes=p, sem_codes=s)[0]


@pytest.mark.parametrize("mode", ["both", "pix", "sem"])
def test_input_codes_reads_only_its_stack(mode):
    """A model reads exactly the stacks input_codes names: changing the other stack's codes leaves every logit
    unchanged, changing a read stack changes them; the projector has only the read stacks' input columns."""
    m = tiny_model(input_codes=mode)
    cfg = m.config
    p, s = random_codes(cfg, 4)
    p2, s2 = (p + 1) % cfg.pix_vocab, (s + 1) % cfg.sem_vocab
    ref = _und_logits(m, p, s)
    same_pix, same_sem = torch.equal(ref, _und_logits(m, p2, s)), torch.equal(ref, _und_logits(m, p, s2))
    assert same_pix == (mode == "sem") and same_sem == (mode == "pix")
    width = {"both": cfg.pix_dim + cfg.sem_dim, "pix": cfg.pix_dim, "sem": cfg.sem_dim}[mode]
    assert m.vis_in[0].in_features == width
    if mode == "pix":  # the unread stack may be absent altogether
        assert torch.equal(ref, _und_logits(m, p, None))
        out = m.generate_text([[65]], images=(p.view(1, 4, -1), None), max_new_tokens=2)
        assert len(out) == 1


def test_one_vocabulary_model_has_one_stack_and_one_head(tmp_path):
    """input_codes='pix' with gen_sem=False (the single_vocab / pix_input layout) holds no semantic book and no
    semantic head, trains and draws without semantic codes and survives export / load; 'sem' without gen_sem
    is refused (a drawn image could not be read back)."""
    m = tiny_model(input_codes="pix", gen_sem=False).train()
    cfg = m.config
    assert m.sem_book is None and m.sem_head is None
    assert not any(k.startswith(("sem_book", "sem_head")) for k in m.state_dict())
    seq = [build_sequence(cfg, [("und", 4), [65, 66]]), build_sequence(cfg, [[67], ("gen", 4), [cfg.eos_id]])]
    b = collate_sequences(cfg, seq)
    t = make_targets(b["idx"], b["image_mask"], b["attention_mask"])
    p, _ = random_codes(cfg, 8)
    _, loss = m(b["idx"], t, b["image_mask"], p, None, b["attention_mask"], b["gen_mask"])
    loss.backward()
    assert float(m.loss_parts["pix"]) > 0 and float(m.loss_parts["sem"]) == 0.0
    m.eval()
    pix, sem = m.generate_image([[65]], 4, generator=torch.Generator().manual_seed(0))
    assert sem is None and pix.shape == (1, 4, cfg.pix_depth)
    m.save_pretrained(str(tmp_path))
    back = MLLM.from_pretrained(str(tmp_path))
    assert back.sem_book is None and back.config.input_codes == "pix"
    with pytest.raises(ValueError, match="gen_sem"):
        MLLM(tiny_config(input_codes="sem", gen_sem=False))
    with pytest.raises(ValueError, match="input_codes"):
        MLLM(tiny_config(input_codes="pixel"))


@pytest.mark.parametrize("code_logits", [False, True])
def test_depth_cache_samples_the_reference_codes(code_logits):
    """One head pass per depth over a KV cache gives the logits of re-running the head over every earlier depth
    (to float rounding) and so, from the same generator, the same codes: guided and unguided, both heads."""
    m = tiny_model(head_code_logits=code_logits)
    h = torch.randn(6, m.config.n_embd)
    for head, book in ((m.pix_head, m.pix_book), (m.sem_head, m.sem_book)):
        codes = torch.randint(0, book.shape[1], (6, book.shape[0]))
        ref = head(h, mllm.code_vectors(book, codes).cumsum(1)[:, :-1], book=book)  # (6, D, K)
        cache, x, run = head.new_cache(6, h.device, h.dtype), head.proj(h), 0.0
        for d in range(book.shape[0]):
            if d:
                run = run + book[d - 1][codes[:, d - 1]]
                x = head.code_in(run)
            torch.testing.assert_close(head.step(x, d, cache, book), ref[:, d], atol=1e-5, rtol=1e-5)
    for scale in (None, 2.0):
        draw = lambda c: m.generate_image([[65, 66], [67]], 5, cfg_scale=scale, use_cache=c,
                                          generator=torch.Generator().manual_seed(11))
        (pa, sa), (pb, sb) = draw(True), draw(False)
        assert torch.equal(pa, pb) and torch.equal(sa, sb)
