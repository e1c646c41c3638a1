"""
Decoding with one shape per step, the loops behind mllm.MLLM.generate / generate_text / generate_image with
use_cache="static" or compile_decode: the same tokens and codes as mllm.py's loops from the same generator, with
each step's work traceable by torch.compile once and then replayed without recompiling:
- the trunk's KV cache keeps its preallocated length; a step writes its slot in place, the slot index held in a
  tensor (llm.KVCache.make_static), and attends over every slot with the unwritten ones masked: no shape and no
  Python number changes from step to step;
- the random numbers a step samples with are drawn before it, eagerly, from the caller's generator, in the order
  and shapes mllm.py's loops draw them (llm.sample_logits: one Exp(1) tensor per sampled distribution), and go in
  as inputs (dynamo does not trace a torch.Generator);
- one step is everything a position does: for an image position both depth heads' loops over their depths with
  CFG and sampling, then the position's input and the trunk; for text the output head, sampling and the trunk.
  The trunk also runs after the last position (one step in N spent for nothing) so that every step is the
  same graph.
The prefill (its length changes with the prompt) runs eagerly through MLLM.trunk before the cache turns static,
exactly as in mllm.py's loops. Eager, a step's numbers differ from mllm.py's by float rounding at most (SDPA over
all slots, masked, instead of the filled ones), and tests/test_decode.py checks that the samples are the same;
inductor's fused kernels round differently again, so there a near tie could in principle draw another sample
(its test and bench.py llm check that they draw the same).
"""
import torch

from llm import sample_logits

_COMPILED = {}


def compile_step(fn, backend):
    """fn itself (backend None) or its torch.compile with that backend ("inductor"; "eager" traces with dynamo
    and runs the traced ops as they are), built once per (fn, backend). Each sampler setting, batch size and
    model is a graph of its own; past dynamo's recompile limit (8) a step runs eagerly, still exact.
    tests/test_decode.py checks that a generation is one graph (no graph break)."""
    if backend is None:
        return fn
    if (fn, backend) not in _COMPILED:
        _COMPILED[fn, backend] = torch.compile(fn, backend=backend)
    return _COMPILED[fn, backend]


def backend_of(compile_decode):
    """MLLM's compile_decode -> a torch.compile backend: False -> None (eager), True -> inductor, a name -> it."""
    return "inductor" if compile_decode is True else (compile_decode or None)


def trunk_step(model, x, cache):
    """One input per row through the trunk over a static cache: x (B, 1, C) -> final-norm hidden states (B, 1, C).
    MLLM.trunk's decode step with the slot, the RoPE position and the mask read from tensors."""
    cache.valid.index_fill_(1, cache.at, True)
    freqs = cache.next_pos[:, None, None].float() * model.inv_freq  # (B, 1, hd/2)
    emb = torch.cat((freqs, freqs), -1)[:, None]  # (B, 1, 1, hd)
    rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
    mask = cache.valid[:, None, None]  # (B, 1, 1, L): the slots written so far, padding hidden
    for i, blk in enumerate(model.layers):
        x = blk(x, rope, mask, cache, i)
    cache.at.add_(1)
    cache.next_pos.add_(1)
    return model.norm(x)


def text_step(model, h, cache, noise, temperature, top_k, top_p):
    """h (B, C) -> (the next ids (B,), the state after reading them (B, C))."""
    nxt = sample_logits(model.lm_head(h), temperature, top_k, top_p, noise=noise)
    return nxt, trunk_step(model, model.embed(nxt[:, None]), cache)[:, 0]


def image_step(model, h, cache, n, noise, B, sampling):
    """h (B', C), n (B',) the index of this position in its image -> (pix (B', Dp), sem (B', Ds) or None, the
    state after reading them (B', C), n + 1). noise: (pixel draws, semantic draws), one per depth (None: greedy)."""
    cfg_scale, temperature, top_k, top_p, fine_temperature, depth_cache = sampling
    p = model._sample_depths(model.pix_head, model.pix_book, h, B, cfg_scale, temperature, top_k, top_p, None,
                             fine_temperature, depth_cache, noise[0])
    s = None if model.sem_head is None else \
        model._sample_depths(model.sem_head, model.sem_book, h, B, cfg_scale, temperature, top_k, top_p, None,
                             fine_temperature, depth_cache, noise[1])
    e = model.embed_images(p, s, n)[:, None]  # (B', 1, C)
    return p, s, trunk_step(model, e, cache)[:, 0], n + 1


def draws(generator, temperatures, B, K, device):
    """What sample_logits would draw for each of these temperatures, in order: Exp(1) (B, K), None for 0 (greedy)."""
    q = lambda: torch.empty(B, K, dtype=torch.float32, device=device).exponential_(generator=generator)
    return [None if t == 0 else q() for t in temperatures]


def _fresh(h):
    """The prefill's last states (a view into (B, T, C), strides of its own) as the steps give them: dense (B, C).
    dynamo guards on strides, even of a size-1 batch dimension: a view would cost a second graph."""
    return h.clone(memory_format=torch.contiguous_format)


def text_loop(model, h, cache, max_new_tokens, temperature, top_k, top_p, generator, backend, eos=None):
    """After the prefill: h (B, C) its last states -> the new ids (B, n), n <= max_new_tokens: the loop stops
    after the step at which every row has drawn eos (eos None: never; one host read per step)."""
    cache.make_static()
    step, B, V = compile_step(text_step, backend), h.shape[0], model.config.vocab_size
    h, out, done = _fresh(h), [], torch.zeros(B, dtype=torch.bool, device=h.device)
    for _ in range(max_new_tokens):
        nxt, h = step(model, h, cache, draws(generator, [temperature], B, V, h.device)[0], temperature, top_k, top_p)
        out.append(nxt)
        if eos is not None:
            done |= nxt == eos
            if bool(done.all()):
                break
    return torch.stack(out, 1)


def image_loop(model, h, cache, B, num_positions, generator, backend, cfg_scale, temperature, top_k, top_p,
               fine_temperature, depth_cache):
    """After the prefill: h (B', C) -> (pix (B, N, Dp), sem (B, N, Ds) or None), MLLM.generate_image's codes."""
    cache.make_static()
    step = compile_step(image_step, backend)
    sampling = (cfg_scale, temperature, top_k, top_p, fine_temperature, depth_cache)
    temps = lambda D: [temperature] + [temperature if fine_temperature is None else fine_temperature] * (D - 1)
    heads = [(model.pix_book, temps(model.pix_book.shape[0]))]
    if model.sem_head is not None:
        heads.append((model.sem_book, temps(model.sem_book.shape[0])))
    h, n, pix, sem = _fresh(h), torch.zeros(h.shape[0], dtype=torch.long, device=h.device), [], []
    for _ in range(num_positions):
        noise = [draws(generator, t, B, book.shape[1], h.device) for book, t in heads]
        p, s, h, n = step(model, h, cache, n, noise, B, sampling)
        pix.append(p[:B])
        sem.append(None if s is None else s[:B])
    return torch.stack(pix, 1), None if model.sem_head is None else torch.stack(sem, 1)  # (B, N, Dp), (B, N, Ds)
