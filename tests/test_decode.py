"""decode.py's fixed-shape steps against mllm.py's loops: the same tokens and codes from the same generator (and the
generator left in the same state), for every generation path and model layout; traced by dynamo once, with no
recompile after the first step; and llm.sample_logits against the plain sampler (a full sort for top-p, then
torch.multinomial)."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import llm
from test_mllm import random_codes_b, tiny_model

# "eager": dynamo traces the step (graph breaks, guards and recompiles are dynamo's) and runs the traced ops as
# they are, so it draws what the uncompiled step draws, without inductor's minutes of compiling on a CPU
PATHS = [dict(use_cache="static"), dict(compile_decode="eager")]


def _same(a, b):
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


def _draw(fn, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    return fn(generator=g, **kw), g.get_state()


@pytest.mark.parametrize("layout", [{}, dict(gen_sem=False, image_pos=8, vis_norm=True),
                                    dict(input_codes="pix", gen_sem=False), dict(input_codes="sem", head_code_logits=True)])
def test_static_steps_draw_the_codes_of_mllm_loops(layout):
    """generate_image: guided and unguided, top-k / top-p, greedy refinements, without the depth heads' cache: the
    static step (eager and traced) draws exactly mllm.py's codes and uses the generator exactly as much; traced, a
    whole generation is one graph (no graph break, no recompile)."""
    m = tiny_model(**layout)
    caps = [[65, 66, 67], [70]]  # two lengths: the batch is left-padded
    for sampling in (dict(cfg_scale=2.0, top_k=20, top_p=0.9), dict(cfg_scale=None, temperature=0.7),
                     dict(cfg_scale=3.0, fine_temperature=0.0, top_p=0.8), dict(cfg_scale=1.5, depth_cache=False)):
        (ref, state) = _draw(lambda **kw: m.generate_image(caps, 6, **kw), 5, **sampling)
        for path in PATHS:
            torch._dynamo.reset()
            counters.clear()
            out, st = _draw(lambda **kw: m.generate_image(caps, 6, **kw), 5, **sampling, **path)
            assert _same(out, ref) and torch.equal(st, state), (sampling, path)
            assert counters["stats"]["unique_graphs"] == ("compile_decode" in path)
        assert (ref[1] is None) == (m.sem_head is None)


def test_static_steps_draw_the_tokens_of_mllm_loops():
    """generate (nanoGPT's loop) and generate_text (images read, eos, rows of two lengths), greedy and sampled."""
    m = tiny_model()
    idx = torch.randint(0, 256, (2, 7))
    for sampling in (dict(temperature=0), dict(temperature=0.8, top_k=30)):
        ref, state = _draw(lambda **kw: m.generate(idx, 10, **kw), 3, **sampling)
        for path in PATHS:
            out, st = _draw(lambda **kw: m.generate(idx, 10, **kw), 3, **sampling, **path)
            assert torch.equal(out, ref) and torch.equal(st, state)
    images = random_codes_b(m.config, 2, 4)
    ask = lambda **kw: m.generate_text([[65, 66], [67]], images=images, max_new_tokens=12, **kw)
    m.config.eos_id = None
    m.config.eos_id = ask()[0][3]  # an id this random model answers with: greedy, row 0 stops by its 4th token
    assert len(ask()[0]) <= 3
    for sampling in (dict(), dict(temperature=1.0, top_p=0.9), dict(temperature=1.2, top_k=5)):
        ref, state = _draw(ask, 1, **sampling)
        for path in PATHS:
            out, st = _draw(ask, 1, **sampling, **path)
            assert out == ref and torch.equal(st, state)


@pytest.mark.parametrize("what,rows", [("image", 1), ("image", 2), ("text", 1), ("text", 2)])
def test_traced_step_compiles_once(what, rows):
    """One graph for a whole generation: the first step is traced, every later step (and a second generation of the
    same shapes, other prompts and seed) runs it without a recompile. One row too: dynamo guards on the strides of a
    size-1 batch dimension, so the prefill's states must enter the first step laid out as later steps give them."""
    torch._dynamo.reset()
    counters.clear()
    m = tiny_model()
    if what == "image":  # one row: unguided (CFG doubles the batch)
        run = lambda caps, seed: m.generate_image(caps, 7, cfg_scale=2.0 if rows > 1 else None, top_k=20,
                                                  compile_decode="eager", generator=torch.Generator().manual_seed(seed))
        args = ([[65, 66], [67, 68]][:rows], 0), ([[70, 71], [72, 73]][:rows], 1)
    else:
        run = lambda ids, seed: m.generate(ids, 9, temperature=0.9, compile_decode="eager",
                                           generator=torch.Generator().manual_seed(seed))
        args = (torch.randint(0, 256, (rows, 5)), 0), (torch.randint(0, 256, (rows, 5)), 1)
    run(*args[0])
    assert counters["stats"]["unique_graphs"] == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(*args[1])
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow  # inductor compiles the step (~1 min on a CPU)
def test_inductor_step_draws_the_same_codes():
    """compile_decode=True, the default backend: one graph, the codes of mllm.py's loop (a small model: its fused
    kernels round differently from eager, which is why this is checked at all)."""
    torch._dynamo.reset()
    counters.clear()
    m = tiny_model(gen_sem=False, head_n_layer=1, n_layer=1)
    draw = lambda **kw: m.generate_image([[65, 66], [67]], 5, cfg_scale=2.0, top_k=20,
                                         generator=torch.Generator().manual_seed(2), **kw)
    assert _same(draw(compile_decode=True), draw())
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("rows", [1, 2, 4, 5])
def test_linear_of_few_rows_is_a_reduction_when_compiled(rows):
    """llm.Linear traced for a CPU: up to 4 rows (SMALL_ROWS: a decode step of 1 or 2 prompts with CFG) become a
    multiply and a sum (no matrix product in the graph), more rows and autocast stay F.linear; every way equals
    F.linear to float rounding."""
    lin = llm.Linear(48, 40)
    x = torch.randn(rows, 1, 48)  # (B, T, C) as a decode step gives it

    def traced_ops(autocast):
        ops = []

        def backend(gm, inputs):
            ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward
        torch._dynamo.reset()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = torch.compile(lin, backend=backend)(x)
        return ops, y
    ops, y = traced_ops(False)
    assert torch.allclose(y, F.linear(x, lin.weight, lin.bias), atol=1e-5)
    assert any("linear" in o for o in ops) == (rows == 5), ops
    ops, _ = traced_ops(True)
    assert any("linear" in o for o in ops), ops


def _multinomial_sampler(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """The plain sampler: top-p through a full sort of every row, then torch.multinomial."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, order = torch.sort(logits, descending=True)
        p = F.softmax(srt, -1)
        drop = p.cumsum(-1) - p > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def test_sample_logits_draws_what_multinomial_drew():
    """Same ids and the same generator state as torch.multinomial after a full sort, over codebook and vocabulary
    sizes (16384: the release's codebook), sharp and flat logits, masked entries, each filter alone and together."""
    n = 0
    for trial in range(120):
        B, K = [(1, 512), (2, 16384), (3, 263), (2, 50)][trial % 4]
        logits = torch.randn(B, K, generator=torch.Generator().manual_seed(trial)) * [0.3, 1.0, 3.0, 10.0][trial % 4]
        if trial % 3 == 0:
            logits[:, ::7] = float("-inf")
        kw = [dict(top_k=900, top_p=0.96), dict(top_p=0.9), dict(top_k=20), {}, dict(top_k=5, top_p=0.5,
                                                                                     temperature=0.6)][trial % 5]
        ga, gb = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        for _ in range(4):
            a, b = _multinomial_sampler(logits, generator=ga, **kw), llm.sample_logits(logits, generator=gb, **kw)
            assert torch.equal(a, b), (trial, kw)
            n += 1
        assert torch.equal(ga.get_state(), gb.get_state())
    assert n == 480


def test_top_p_after_top_k_counts_logits_tied_with_the_kth():
    """Logits tied with the k-th survive top-k (11 here for k = 5, as in bf16 logits); their mass counts toward
    top-p as the plain sampler's full sort counts it: top-p 0.35 keeps the first two codes (0.32 of the mass lies before the
    second), where a mass over the k alone (0.43) would keep one. A cut among the tied ones keeps all of them."""
    logits = torch.tensor([[4.0, 3.5, 3.0, 2.5] + [2.0] * 7 + [-1.0] * 20])
    for top_p, kept in ((0.35, {0, 1}), (0.6, {0, 1, 2}), (0.7, set(range(11)))):
        ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        b = [int(llm.sample_logits(logits, top_k=5, top_p=top_p, generator=gb)) for _ in range(300)]
        assert set(b) == kept
        if top_p < 0.7:
            assert b == [int(_multinomial_sampler(logits, top_k=5, top_p=top_p, generator=ga)) for _ in range(300)]
