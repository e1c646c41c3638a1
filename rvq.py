"""
Residual vector quantizer with EMA codebooks and dead-code restart (design §2).

Both DualToken branches quantize a (B, 729, 32) latent with depth 8 and one 16384 x 32 codebook shared by
all depths. Per depth: nearest code to the current residual (squared L2, fp32), subtract it, keep the
running partial sum. The codebook never gets a gradient; in training mode it moves only by the EMA of
RQ-VAE (kakaobrain/rq-vae-transformer, `VQEmbedding`), with the same order of operations:

    counts_k = #{i: code_i = k}              sums_k = sum of the vectors assigned to k
    (DDP: counts and sums all-reduced)
    cluster_size_ema = decay * cluster_size_ema + (1 - decay) * counts
    embed_ema        = decay * embed_ema        + (1 - decay) * sums
    restart: codes with cluster_size_ema < 1 get embed_ema = a random batch vector, cluster_size_ema = 1
    (the random vectors come from rank 0 under DDP)
    n = sum(cluster_size_ema);  size = n * (cluster_size_ema + eps) / (n + K * eps)   (Laplace smoothing)
    codebook = embed_ema / size

As in RQ-VAE, counts start at 0 while embed_ema starts as a copy of the random codebook, so on the first
training step almost every code restarts from data. Two update schedules exist in the released code:
"per_depth" (pixel branch) updates the book after each depth, so depth d+1 searches the updated book;
"deferred" (semantic branch) searches all depths with the same book and updates once afterwards on the
residuals of all depths. In both, the codeword a depth subtracts is the one it found, i.e. the value
before that depth's update (RQ-VAE looks the code up before `_update_embedding`), so `quantized` equals
`embed(codes)` evaluated on the codebook(s) the search saw.

Memory. Nothing of size (K x N) is ever built: counts and sums use index_add_, and the search runs
over chunks of `search_chunk` vectors through one reused (C, K) fp32 distance block, the largest tensor
of the whole quantizer. With N vectors, K codes, width D, depth L, chunk C, a training step (forward and
backward) needs about
    4*C*K                    the distance block
  + 4*N*D*(L + 5)            residual, partial sum, codeword, straight-through output and its gradient,
                             plus the L (x - partial_d) tensors autograd keeps for the commitment loss
  + 4*N*D*L                  the residuals of all depths ("deferred" only, for its single update)
  + 16*N*L                   codes (int64, per depth and stacked)
  + 4*K*(D + 1)*3            counts|sums, random restart vectors, the new codebook
bytes on top of the module's own buffers (3 * 4*K*D bytes per book). At the released size (K=16384,
D=32, L=8, C=512) with B=32 images x 729 = 23328 vectors: 32 + 37 + 2.8 + 6.2 = 78 MiB for "per_depth"
and 101 MiB for "deferred" (the RQ-VAE one-hot update alone holds a 16384 x 23328 fp32 one-hot and an
equal distance matrix, 2.8 GiB). Inference needs the distance block and a few N x D tensors. The formula
is a slight overestimate: `python bench.py rvq` measured 40 / 45 MiB (per_depth / deferred) for a
training step at B=8 (5832 vectors) where it predicts 48 / 54 MiB, and 35 MiB for inference.

rvq.py imports only torch.
"""
import torch
import torch.distributed as dist
try:
    import torch.distributed._functional_collectives as funcol
except ImportError:  # a torch built without distributed: _ddp() is then always False
    funcol = None
import torch.nn as nn
import torch.nn.functional as F


class ResidualVQ(nn.Module):

    def __init__(self, *, dim, codebook_size, depth, shared_codebook=True, decay=0.99, eps=1e-5,
                 restart_unused=True, ema_update="per_depth", sync_ddp=True, search_chunk=512):
        super().__init__()
        if ema_update not in ("per_depth", "deferred"):
            raise ValueError(f"ema_update must be 'per_depth' or 'deferred', got {ema_update!r}")
        if min(dim, codebook_size, depth, search_chunk) < 1:
            raise ValueError(f"dim, codebook_size, depth, search_chunk must be >= 1, got "
                             f"{dim}, {codebook_size}, {depth}, {search_chunk}")
        self.dim, self.codebook_size, self.depth = dim, codebook_size, depth
        self.shared_codebook = shared_codebook
        self.decay, self.eps = decay, eps
        self.restart_unused, self.ema_update, self.sync_ddp = restart_unused, ema_update, sync_ddp
        self.search_chunk = search_chunk
        n_books = 1 if shared_codebook else depth
        # N(0, 1) init and embed_ema = a copy of it, like RQ-VAE's nn.Embedding-based VQEmbedding
        codebook = torch.randn(n_books, codebook_size, dim)
        self.register_buffer("codebook", codebook)                                  # (n_books, K, D)
        self.register_buffer("cluster_size_ema", torch.zeros(n_books, codebook_size))  # (n_books, K)
        self.register_buffer("embed_ema", codebook.clone())                         # (n_books, K, D)
        self.last_stats = {}

    def book_of(self, d):
        return 0 if self.shared_codebook else d

    # ---------------------------------------------------------------- search

    @torch.no_grad()
    def search(self, r, book):
        """Nearest code (squared L2, fp32) of each row of r (N, D) in book (K, D) -> (N,) int64.

        Distances are |r|^2 + |e|^2 - 2 r.e in one addmm like RQ-VAE, but only C rows at a time: the
        (C, K) block is the largest tensor of the whole quantizer."""
        e = book.float()
        e2 = e.pow(2).sum(1)                                        # (K,)
        codes = torch.empty(r.shape[0], dtype=torch.long, device=r.device)
        # one block reused by every chunk (a fresh `dist = ...` per chunk keeps two alive at the rebind)
        buf = r.new_empty(min(self.search_chunk, r.shape[0]), e.shape[0])  # (C, K)
        for i in range(0, r.shape[0], self.search_chunk):
            rc = r[i:i + self.search_chunk]                         # (c, D), c <= C
            dist_ = buf[:rc.shape[0]]                               # (c, K)
            torch.add(rc.pow(2).sum(1, keepdim=True), e2, out=dist_)
            dist_.addmm_(rc, e.t(), alpha=-2.0)
            codes[i:i + self.search_chunk] = dist_.argmin(1)
        return codes

    # ---------------------------------------------------------------- EMA

    def _ddp(self):
        return self.sync_ddp and self.training and dist.is_available() and dist.is_initialized()

    @torch.no_grad()
    def _random_vectors(self, v):
        """K vectors drawn without replacement from v (M, D); when M < K, v is tiled and every copy gets
        uniform noise of scale 0.01/sqrt(D) (RQ-VAE's _tile_with_noise). Gathers K rows instead of
        materialising the tiled batch."""
        M, K, D = v.shape[0], self.codebook_size, self.dim
        n_rep = (K + M - 1) // M
        idx = torch.randperm(n_rep * M, device=v.device)[:K]       # (K,)
        out = v[idx % M]                                           # (K, D)
        if n_rep > 1:
            out = out + torch.rand_like(out) * (0.01 / D ** 0.5)
        return out

    @torch.no_grad()
    def ema_step(self, b, v, codes):
        """One EMA update of book b from vectors v (M, D) fp32 and their codes (M,)."""
        K, D = self.codebook_size, self.dim
        stats = torch.zeros(K, D + 1, device=v.device)             # (K, D+1): sums | counts
        stats[:, :D].index_add_(0, codes, v)
        # counts by index_add_ too, not bincount: bincount's output length depends on the largest code
        # (a data-dependent shape, which splits a torch.compile graph)
        stats[:, D].index_add_(0, codes, v.new_ones(v.shape[0]))
        ddp = self._ddp()
        if ddp:
            # functional collectives: torch.compile traces them into the graph (c10d's in-place
            # all_reduce / broadcast split it, twice per depth under torchrun)
            stats = funcol.all_reduce(stats, "sum", dist.group.WORLD)  # one collective for both
        cse, ema = self.cluster_size_ema[b], self.embed_ema[b]     # (K,), (K, D) views
        cse.mul_(self.decay).add_(stats[:, D], alpha=1 - self.decay)
        ema.mul_(self.decay).add_(stats[:, :D], alpha=1 - self.decay)
        if self.restart_unused:
            # drawn for all K codes, used where dead: no host sync on n_dead, same shape on every rank
            rand = self._random_vectors(v)
            if ddp:
                rand = funcol.broadcast(rand, 0, dist.group.WORLD)
            dead = cse < 1                                          # (K,)
            ema.copy_(torch.where(dead[:, None], rand, ema))
            cse.masked_fill_(dead, 1.0)
        n = cse.sum()
        size = n * (cse + self.eps) / (n + K * self.eps)            # Laplace-smoothed counts
        self.codebook[b].copy_(ema / size[:, None])

    # ---------------------------------------------------------------- forward

    def check_input(self, x):
        """The finiteness check reads a value back to the host: eager only. Under torch.compile it would
        split the graph in two every forward; there a nan input shows up at once as a non-finite commitment
        loss, which the trainers' check_finite stops on by name before anything is saved."""
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"ResidualVQ input x: expected shape (..., {self.dim}), got {tuple(x.shape)}")
        if not torch.compiler.is_compiling() and not torch.isfinite(x).all():
            raise ValueError(f"ResidualVQ input x {tuple(x.shape)} has non-finite values (nan/inf)")

    def forward(self, x):
        """x (..., D) -> quantized (..., D) straight-through, codes (..., depth) int64, commit_loss ()."""
        self.check_input(x)
        shape = x.shape
        # fp32 search and EMA even under bf16 autocast: near-ties between 16384 codes decide the codes
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.reshape(-1, self.dim).float()                    # (N, D)
            r = xf.detach().clone()                                 # residual
            psum = torch.zeros_like(r)                              # running partial sum
            train = self.training
            deferred = train and self.ema_update == "deferred"
            codes, losses = [], []
            if deferred:  # the residual each depth searched with, for the single update afterwards
                res = r.new_empty(self.depth, *r.shape)             # (L, N, D)
            for d in range(self.depth):
                b = self.book_of(d)
                c = self.search(r, self.codebook[b])                 # (N,)
                q = F.embedding(c, self.codebook[b])                 # (N, D), value before this update
                if train and not deferred:
                    self.ema_step(b, r, c)
                elif deferred:
                    res[d] = r
                r.sub_(q)
                psum.add_(q)  # in place: the subtraction below keeps no reference to it for backward
                codes.append(c)
                losses.append((xf - psum).pow(2).mean())
            codes = torch.stack(codes, 1)                            # (N, L)
            if deferred and self.shared_codebook:
                self.ema_step(0, res.reshape(-1, self.dim), codes.t().reshape(-1))  # (L*N, D), (L*N,)
            elif deferred:
                for d in range(self.depth):
                    self.ema_step(d, res[d], codes[:, d])
            commit = torch.stack(losses).mean()
            # value exactly the sum of codewords, gradient the identity to x (x - sg(x) == 0)
            quantized = psum + (xf - xf.detach())
        self.last_stats = code_stats(codes, self.codebook_size)
        return (quantized.to(x.dtype).reshape(shape), codes.reshape(*shape[:-1], self.depth),
                commit)

    # ---------------------------------------------------------------- codes -> vectors

    def _lookup(self, codes, name="codes"):
        """codes (..., n), n <= depth, column j read from book j -> (..., n, D) fp32."""
        K = self.codebook_size
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"{name}: expected an integer tensor, got {codes.dtype} {tuple(codes.shape)}")
        if codes.ndim < 1 or codes.shape[-1] > self.depth:
            raise ValueError(f"{name}: expected shape (..., n) with n <= depth={self.depth}, "
                             f"got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= K):
            raise ValueError(f"{name} {tuple(codes.shape)}: values must be in [0, {K}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        codes = codes.long()
        if not self.shared_codebook:  # offset column j into book j of the flattened (L*K, D) table
            codes = codes + K * torch.arange(codes.shape[-1], device=codes.device)
        return F.embedding(codes, self.codebook.reshape(-1, self.dim))  # (..., n, D)

    def embed_per_depth(self, codes):
        """codes (..., n) -> (..., n, D): the codeword of each depth (n <= depth, depths 0..n-1)."""
        return self._lookup(codes)

    def embed(self, codes):
        """codes (..., depth) -> (..., D): sum over depths, what forward() returns as `quantized`."""
        if codes.ndim < 1 or codes.shape[-1] != self.depth:
            raise ValueError(f"codes: expected shape (..., {self.depth}), got {tuple(codes.shape)}")
        return self._lookup(codes).sum(-2)

    def extra_repr(self):
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, depth={self.depth}, "
                f"shared_codebook={self.shared_codebook}, decay={self.decay}, eps={self.eps}, "
                f"restart_unused={self.restart_unused}, ema_update={self.ema_update!r}, "
                f"search_chunk={self.search_chunk}")


@torch.no_grad()
def code_stats(codes, K):
    """codes (..., depth) int in [0, K) -> {"usage": share of the K codes used, "perplexity": exp(H) of the code
    histogram (K when uniform, 1 when collapsed to one code), "entropy_bits": H in bits (at most log2 K)}, each
    (depth,), and "usage_any_depth": () the share of the book used at any depth (one book is shared by all
    depths). The one code statistic: the quantizer records it every forward (last_stats), train_tokenizer's
    and eval.py's reports convert it to lists. Tensors on the codes' device, so training makes no host sync;
    fp64 (an entropy over 16384 bins from millions of codes), except on MPS, which has none."""
    if codes.ndim < 1:
        raise ValueError(f"codes: expected shape (..., depth), got {tuple(codes.shape)}")
    L = codes.shape[-1]
    c = codes.reshape(-1, L).long() + K * torch.arange(L, device=codes.device)  # (N, L): depth d counts in bins d*K..
    dt = torch.float32 if codes.device.type == "mps" else torch.float64
    hist = torch.zeros(L * K, dtype=dt, device=codes.device).index_add_(  # a fixed shape, unlike bincount's
        0, c.reshape(-1), torch.ones(c.numel(), dtype=dt, device=codes.device)).reshape(L, K)  # (L, K)
    p = hist / hist.sum(1, keepdim=True).clamp(min=1)
    h = -(p * p.clamp(min=1e-30).log()).sum(1)  # (L,) nats
    return {"usage": (hist > 0).to(dt).mean(1), "perplexity": h.exp(), "entropy_bits": h / 0.6931471805599453,  # ln 2
            "usage_any_depth": (hist.sum(0) > 0).to(dt).mean()}


def tiny_config():
    """The test-sized quantizer (the fixture's shape: K=32, D=16, depth 3, shared)."""
    return dict(dim=16, codebook_size=32, depth=3, shared_codebook=True)
