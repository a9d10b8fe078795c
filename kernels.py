"""
Triton-free kernels in plain PyTorch: attention with document masks, and large-vocabulary losses.
They run wherever torch runs (CPU, CUDA, MPS) and hold memory linear in sequence length.

attention(q, k, v, causal, doc_ids) is the one entry point model.py uses. Three backends:
- "sdpa": torch's scaled_dot_product_attention. Fast without a mask, but an explicit mask (packed
  documents) sends it to a path that materialises the T x S score matrix.
- "fused": the FlashAttention algorithm. Queries and keys are cut into tiles; each query tile
  visits its key tiles keeping, per row, a running max m and running sum l of exp(score - m) in
  float32 (online softmax), so the output is exact without ever holding a row of T scores. The
  forward saves only the output and the log-sum-exp per row; the backward recomputes each tile's
  probabilities from them. Tile pairs in which no query may see any key (above the causal
  diagonal, or in different documents of a packed sequence) are skipped: with 8 documents only
  ~1/8 of the causal tiles hold work, which is where the speed-up over masked SDPA comes from.
  The live pairs that lie on one tile diagonal are computed together in one batched matmul, so the
  Python loop runs over diagonals, not pairs: few large ops, which small CPUs and GPUs both need.
- "varlen": packed documents as the separate sequences they are (FlashAttention's variable-length
  idea in plain PyTorch): the tokens of each (row, document) are gathered into a sequence of their
  own, documents of similar lengths share one causal SDPA call without a mask, and the outputs are
  scattered back. No mask, no work across documents; the lengths come to the host once per call.
The automatic choice: "sdpa" without documents or up to SDPA_MASK_MAX_KEYS keys (a dense mask is
small there, and torch's kernel beats the tile loop); longer packed rows "varlen" on a CPU in eager
mode, "fused" elsewhere (torch.compile wants static shapes; on GPUs varlen has not been measured).
set_backend(name) / use_backend(name) force one (tests, benchmarks, users).

linear_cross_entropy and distill_loss fuse the output projection with the loss. A 128,256-token
vocabulary makes logits the memory peak of a small model (4 bytes x 128,256 = 0.5 MB per token), so
both compute logits a chunk of rows at a time and never hold more than one chunk. The backward
recomputes each chunk's logits (recompute=True, the default), or, with recompute=False, the
gradients are computed in the forward while the chunk is at hand and the backward only scales them.
DistillationLoss is mid-training's student + teacher loss built on distill_loss.
Under bf16 autocast their vocabulary-sized matmuls run in bf16 (as the reference's lm_head does);
the softmax, the loss and the sums over chunks stay in float32.
"""
import contextlib
import functools
import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "fused", "varlen")
# Tile sizes of the fused kernel: large enough for efficient matmuls, small enough that tiles
# straddling a document boundary waste little. On the 2-core CPU 64 was within ~8% of the best of
# 32/64/128 at T = 4k (3 or 8 documents) and ~2x faster than 128 at T = 256..512 (short documents).
BLOCK_Q = 64
BLOCK_K = 64
# Loss chunks hold about this many logits (2^25 floats = 128 MB): 261 rows of a 128k vocabulary.
# Each chunk streams all of W (V x d) through 3-4 matmuls, so smaller chunks get slower
# (measured at 140m shapes: 2^24 ~15% slower); the peak stays far below naive (see bench.py).
LOSS_CHUNK_ELEMENTS = 2**25
# Under bf16 autocast the matmuls run ~5x faster, so what every chunk pays whatever its size
# (streaming all of W through 3 matmuls, adding a V x d weight gradient) weighs more: chunks twice
# as large (its bf16 logits are half the size). At 140m, 2 x 256 rows: one chunk instead of two,
# 0.77x the loss's fwd+bwd time on one CPU thread.
LOSS_CHUNK_ELEMENTS_BF16 = 2**26
# Live tile pairs of one diagonal go through one batched matmul (see _tile_plan). This caps the
# scores of one batch (2^20 floats = 4 MB), so the temporary memory does not grow with T;
# larger batches measured no faster.
TILE_BATCH_ELEMENTS = 2**20
# Up to this many keys, doc-masked attention goes to SDPA with a dense mask: on the 2-core CPU, fwd+bwd
# at toy shapes with documents of 40-300 tokens, SDPA (float32) took 0.52x the fused kernel's time at
# T = 256 and 0.63x at 512; at 1024 the fused kernel was ahead (0.74x) and at 2048 2x. Above it, on a
# CPU, varlen: at the 140m heads, 2 threads, float32, 0.64x the fused kernel's time at 1 x 1024 (4
# documents of 100-600 tokens), 0.51x at 2 x 2048 (40-300), 0.57x at 1 x 4096 (300-3000) and 0.77x
# with 8 equal documents. At the toy SFT's 8 x 512 varlen's attention took 0.64x dense SDPA's time, but
# the whole SFT step only ~0.9x, and seeds 0-2 scored 0.5-1 point lower each (RESULTS.md): 512 stays here.
SDPA_MASK_MAX_KEYS = 512
# varlen attention: documents sorted by length go through one SDPA call per bucket, padded to the bucket's
# longest; a bucket ends where a document is shorter than VARLEN_SPLIT x that, up to VARLEN_BUCKETS calls.
VARLEN_BUCKETS = 8
VARLEN_SPLIT = 0.8

_forced_backend = None


def set_backend(name):
    """Force every attention() call to backend `name` ("sdpa" or "fused"); None restores auto."""
    global _forced_backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS} or None")
    _forced_backend = name


@contextlib.contextmanager
def use_backend(name):
    """with use_backend("fused"): ... forces a backend inside the block, then restores the old one."""
    previous = _forced_backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def attention(q, k, v, causal=True, doc_ids=None, backend=None):
    """q (B, H, T, D), k and v (B, KV, S, D) with H a multiple of KV and S >= T: the queries are the
    last T of the S positions (S > T with a KV cache). The output has v's dtype (q and k may be in
    float32 straight from RoPE and QK-norm while v is a bf16 projection). doc_ids (B, S) integer document ids of a
    packed sequence: key j is visible to query i iff they share a document (and j <= i if causal).
    Returns (B, H, T, D). backend: "sdpa", "fused", "varlen" or None (forced backend, else automatic);
    "varlen" splits packed rows only, anything else goes to SDPA."""
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(f"attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[2] < T:
        raise ValueError(f"attention: {T} queries but only {k.shape[2]} keys")
    if doc_ids is not None and tuple(doc_ids.shape) != (B, k.shape[2]):
        raise ValueError(f"doc_ids must be (B, S) = {(B, k.shape[2])}, got {tuple(doc_ids.shape)}")
    packed = doc_ids is not None and k.shape[2] == T  # self-attention over packed rows (no KV cache)
    name = backend or _forced_backend or _auto_backend(q.device, k.shape[2], doc_ids is not None, packed)
    if name == "sdpa" or (name == "varlen" and not packed):  # nothing to split: one sequence per row
        return sdpa_attention(q, k, v, causal, doc_ids)
    if name == "fused":
        return fused_attention(q, k, v, causal, doc_ids)
    if name == "varlen":
        return varlen_attention(q, k, v, causal, doc_ids)
    raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")


def _auto_backend(device, n_keys, has_docs, packed):
    """Up to SDPA_MASK_MAX_KEYS keys, or without documents: SDPA. Longer packed rows: per-document
    SDPA calls on a CPU in eager mode (measured there); the tile loop elsewhere (static shapes)."""
    if not has_docs or n_keys <= SDPA_MASK_MAX_KEYS:
        return "sdpa"
    eager_cpu = device.type == "cpu" and not torch.compiler.is_compiling()
    return "varlen" if eager_cpu and packed else "fused"


def _sdpa_dtype(q, v):
    """The dtype SDPA computes in. torch's CPU kernels measured faster in float32 than in bf16, fwd+bwd
    on the 2-core CPU (causal at toy shapes 0.71x the time, with a dense mask ~0.7x; equal at the 140m
    heads), so on a CPU bf16 inputs (autocast) are computed in float32, the output cast back to v's dtype."""
    return torch.promote_types(q.dtype, torch.float32) if q.device.type == "cpu" else v.dtype


def sdpa_attention(q, k, v, causal=True, doc_ids=None):
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    out_dtype, dtype = v.dtype, _sdpa_dtype(q, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast(q.device.type, enabled=False):
        # SDPA's is_causal aligns the diagonal top-left, which is only right when T == S (or T == 1,
        # where the last position sees everything); the KV-cache case needs an explicit offset mask.
        if doc_ids is None and (not causal or T == S or T == 1):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, enable_gqa=gqa)
        else:
            docs = (doc_ids[:, None, S - T:], doc_ids[:, None]) if doc_ids is not None else ()
            whole = slice(0, 1)  # the whole sequence as one tile pair
            mask = _visible(whole, whole, T, S, T, S, causal, q.device, *docs)[0][:, None]  # (B, 1, T, S)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.to(out_dtype)


def varlen_attention(q, k, v, causal=True, doc_ids=None, n_buckets=None):
    """Packed documents attended as the separate sequences they are (see the module docstring): the
    tokens of each (row, document) are gathered, in time order, into a sequence of their own; documents
    sorted by length are cut into at most n_buckets groups of similar lengths, each one SDPA call
    without a mask, padded to its longest document. Self-attention over packed rows only (T == S);
    same arguments as attention(). Exact: a query sees the keys it sees under the dense mask (the
    padding after a document comes after all its keys, and is masked when not causal)."""
    B, H, T, D = q.shape
    if doc_ids is None or k.shape[2] != T:
        raise ValueError("varlen attention needs doc_ids and as many keys as queries (no KV cache)")
    out_dtype, dtype = v.dtype, _sdpa_dtype(q, v)
    dev, N = q.device, B * T
    ids = doc_ids.long() - doc_ids.amin()
    _, doc, counts = torch.unique((torch.arange(B, device=dev)[:, None] * (ids.amax() + 1) + ids).flatten(),
                                  return_inverse=True, return_counts=True)  # one document per (row, id)
    order = torch.argsort(doc, stable=True)  # tokens grouped by document, each in time order
    starts = torch.cumsum(counts, 0) - counts
    by_length = torch.argsort(counts, descending=True, stable=True)
    lengths = counts[by_length].tolist()
    bounds = [0]  # a new bucket where the length falls below VARLEN_SPLIT x its bucket's longest
    for i, n in enumerate(lengths):
        if n < VARLEN_SPLIT * lengths[bounds[-1]] and len(bounds) < (n_buckets or VARLEN_BUCKETS):
            bounds.append(i)
    bounds.append(len(lengths))
    slots, real, shapes = [], [], []  # per bucket: the token in each padded slot (N: padding)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        docs, L = by_length[lo:hi], lengths[lo]
        pos = torch.arange(L, device=dev)
        real.append(pos < counts[docs, None])
        slots.append(torch.where(real[-1], order[(starts[docs, None] + pos).clamp(max=N - 1)], N).flatten())
        shapes.append((hi - lo, L))
    slots = torch.cat(slots)
    slot_of = torch.empty(N + 1, dtype=torch.long, device=dev)
    slot_of[slots] = torch.arange(len(slots), device=dev)  # each token's slot (the padding's is overwritten)
    slot_of = slot_of[:N]
    sizes = [n * L for n, L in shapes]
    with torch.autocast(dev.type, enabled=False):
        packed = [_Gather.apply(x.to(dtype).transpose(1, 2).reshape(N, x.shape[1], D), slots, slot_of).split(sizes)
                  for x in (q, k, v)]
        outs = []
        for (n, L), mask, *qkv in zip(shapes, real, *packed):
            qb, kb, vb = (x.view(n, L, x.shape[1], D).transpose(1, 2) for x in qkv)
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=None if causal else mask[:, None, None, :],
                                               is_causal=causal, enable_gqa=H != k.shape[1])
            outs.append(o.transpose(1, 2).reshape(n * L, H, D))
        out = _Gather.apply(torch.cat(outs), slot_of, slots)  # a padding slot's gradient: zeros
    return out.view(B, T, H, D).transpose(1, 2).to(out_dtype)


class _Gather(torch.autograd.Function):
    """x's rows at index, where index len(x) is a row of zeros. index and inverse pair every row of x
    with one row of the output (the rest of which are zeros), so the backward is the inverse gather:
    no accumulation, unlike indexing's backward."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return _gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.saved_tensors[0]), None, None


def _gather_rows(x, index):
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, index)


def fused_attention(q, k, v, causal=True, doc_ids=None, block_q=None, block_k=None):
    """The FlashAttention algorithm (see module docstring); same arguments as attention()."""
    return _FusedAttention.apply(q, k, v, causal, doc_ids, block_q or BLOCK_Q, block_k or BLOCK_K)


def _float_math(method):
    """Run a forward/backward with autocast off: the kernels pick each matmul's dtype themselves
    (attention tiles in float32; the loss's in autocast's dtype, read before this switches it off)
    and keep every accumulator (softmax statistics, sums over tiles and chunks) in float32."""
    @functools.wraps(method)
    def run(ctx, x, *args):
        with torch.autocast(x.device.type, enabled=False):
            return method(ctx, x, *args)
    return run


def _to_tiles(x, KV, block, dtype):
    """(B, KV*G, N, D) -> (n_tiles, B, KV, G*block, D), zero-padded to whole tiles. A query tile
    holds the G heads that share a kv head, so one batched matmul against a (B, KV, block_k, D) key
    tile serves all of them: GQA without repeating K or V. For k and v, G = 1."""
    B, H, N, D = x.shape
    G = H // KV
    x = F.pad(x.to(dtype), (0, 0, 0, -N % block)).view(B, KV, G, -1, block, D)
    return x.permute(3, 0, 1, 2, 4, 5).reshape(-1, B, KV, G * block, D)


def _from_tiles(t, H, N):
    """Inverse of _to_tiles without the padding: (B, H, N, D)."""
    n, B, KV, GB, D = t.shape
    G = H // KV
    t = t.view(n, B, KV, G, GB // G, D).permute(1, 2, 3, 0, 4, 5)
    return t.reshape(B, H, n * GB // G, D)[:, :, :N]


def _tile_ids(ids, block):
    """(B, N) doc ids -> (B, n_tiles, block), padded by repeating the last id (so the padding
    changes no tile's id range; padded positions are masked or dropped anyway)."""
    B, N = ids.shape
    return torch.cat([ids, ids[:, -1:].expand(B, -N % block)], 1).view(B, -1, block)


def _visible(rows, cols, block_q, block_k, T, S, causal, dev, q_docs=None, k_docs=None):
    """Which keys each query may see in tile pairs (query tile rows[p], key tile cols[p]):
    bool (P, B or 1, block_q or 1, block_k). Queries are positions S - T + i. q_docs and k_docs
    are tiled doc ids (B, n_tiles, block). Also hides the zero padding after the last key."""
    rows, cols = _as_tensor(rows, dev), _as_tensor(cols, dev)
    q_pos = S - T + rows[:, None] * block_q + torch.arange(block_q, device=dev)
    k_pos = cols[:, None] * block_k + torch.arange(block_k, device=dev)
    mask = (k_pos < S)[:, None, None, :]
    if causal:
        mask = mask & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
    if q_docs is not None:
        mask = mask & (q_docs[:, rows, :, None] == k_docs[:, cols, None, :]).transpose(0, 1)
    return mask


def _tile_plan(T, S, causal, q_docs, k_docs, block_q, block_k, max_pairs, dev):
    """The (query tile, key tile) pairs holding any visible key, as batches (rows, cols, needs_mask).
    A pair is dead when all its keys come after all its queries (causal), or when no batch row has
    overlapping document id ranges in the two tiles: exact for packed sequences (ascending ids), a
    safe over-estimate for arbitrary ids, where the mask does the rest. A batch holds pairs of one
    tile diagonal (cols - rows constant), so no query tile appears twice in it and each batch is a
    single online-softmax step for the tiles it touches."""
    q_lo = S - T + torch.arange(0, T, block_q, device=dev)
    q_hi = (q_lo + block_q).clamp(max=S) - 1
    k_lo = torch.arange(0, S, block_k, device=dev)
    k_hi = k_lo + block_k - 1
    alive = torch.ones(len(q_lo), len(k_lo), dtype=torch.bool, device=dev)
    full = (k_hi < S).expand_as(alive).clone()  # no key hidden from any query: no mask needed
    if causal:
        alive &= k_lo[None, :] <= q_hi[:, None]
        full &= k_hi[None, :] <= q_lo[:, None]
    if q_docs is not None:
        q_min, q_max = q_docs.amin(-1)[:, :, None], q_docs.amax(-1)[:, :, None]  # (B, n_q, 1)
        k_min, k_max = k_docs.amin(-1)[:, None, :], k_docs.amax(-1)[:, None, :]  # (B, 1, n_k)
        alive &= ((q_min <= k_max) & (k_min <= q_max)).any(0)
        full &= ((q_min == q_max) & (k_min == k_max) & (q_min == k_min)).all(0)  # one document
    alive, full = alive.tolist(), full.tolist()  # one host sync per call
    pairs = sorted((j - i, i, j) for i, row in enumerate(alive) for j, live in enumerate(row) if live)
    batches = []
    for diagonal, i, j in pairs:
        if not batches or batches[-1][0] != diagonal or len(batches[-1][1]) == max_pairs:
            batches.append((diagonal, [], [], []))
        for items, x in zip(batches[-1][1:], (i, j, not full[i][j])):
            items.append(x)
    return [(_index(rows, dev), _index(cols, dev), any(masked)) for _, rows, cols, masked in batches]


def _index(tiles, device):
    """A run of consecutive tiles as a slice (indexing gives views, no copies), else a tensor."""
    if tiles == list(range(tiles[0], tiles[-1] + 1)):
        return slice(tiles[0], tiles[-1] + 1)
    return torch.tensor(tiles, device=device)


def _as_tensor(index, device):
    return torch.arange(index.start, index.stop, device=device) if isinstance(index, slice) else index


class _FusedAttention(torch.autograd.Function):
    # Tensors are kept as tiles (n_tiles, B, KV, G*block, D); rows and cols pick query and key tiles.

    @staticmethod
    @_float_math
    def forward(ctx, q, k, v, causal, doc_ids, block_q, block_k):
        B, H, T, D = q.shape
        KV, S = k.shape[1], k.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)  # float32 accumulators, float64 stays exact
        qt = _to_tiles(q, KV, block_q, acc).mul_(1.0 / math.sqrt(D))  # scale folded into q once
        kt, vt = _to_tiles(k, KV, block_k, acc), _to_tiles(v, KV, block_k, acc)
        docs = (None, None)
        if doc_ids is not None:
            docs = (_tile_ids(doc_ids[:, S - T:], block_q), _tile_ids(doc_ids, block_k))
        dev, G = q.device, H // KV
        max_pairs = max(1, TILE_BATCH_ELEMENTS // (B * H * block_q * block_k))
        plan = _tile_plan(T, S, causal, *docs, block_q, block_k, max_pairs, dev)

        def hide(s, rows, cols):  # scores (P, B, KV, G*block_q, block_k) -> -inf where not visible
            visible = _visible(rows, cols, block_q, block_k, T, S, causal, dev, *docs)[:, :, None, None]
            # one mask per position pair, shared by the G heads of a kv head
            s.view(*s.shape[:3], G, block_q, block_k).masked_fill_(~visible, -math.inf)

        m = torch.full((*qt.shape[:-1], 1), -math.inf, dtype=acc, device=dev)  # running max
        l = torch.zeros_like(m)  # running sum of exp(score - m)
        o = torch.zeros_like(qt)  # running sum of exp(score - m) @ v
        for rows, cols, needs_mask in plan:
            s = qt[rows] @ kt[cols].transpose(-1, -2)  # (P, B, KV, G*block_q, block_k)
            if needs_mask:
                hide(s, rows, cols)
            m_old = m[rows]
            m_new = torch.maximum(m_old, s.amax(-1, keepdim=True))
            # a row with no visible key yet has m = -inf: shift by 0 so exp gives 0, not NaN
            shift = m_new.masked_fill(m_new == -math.inf, 0.0)
            p = s.sub_(shift).exp_()
            alpha = (m_old - shift).exp_()  # rescales what was summed under the old max
            l[rows] = l[rows].mul_(alpha).add_(p.sum(-1, keepdim=True))
            o[rows] = o[rows].mul_(alpha).add_(p @ vt[cols])
            m[rows] = m_new
        empty = l == 0  # a query that sees no key outputs 0 and passes no gradient
        out = _from_tiles(o.div_(l.masked_fill(empty, 1.0)), H, T).to(v.dtype)
        lse = (m + l.log()).masked_fill_(empty, math.inf)  # +inf: exp(s - lse) = 0 in the backward
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = (block_q, block_k, plan, hide)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_float_math
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        block_q, block_k, plan, hide = ctx.setup
        B, H, T, D = q.shape
        KV, S = k.shape[1], k.shape[2]
        acc, scale = lse.dtype, 1.0 / math.sqrt(D)
        qt = _to_tiles(q, KV, block_q, acc).mul_(scale)
        kt, vt = _to_tiles(k, KV, block_k, acc), _to_tiles(v, KV, block_k, acc)
        dot = _to_tiles(dout, KV, block_q, acc)
        # delta = rowsum(dO * O) = sum_j P_ij dP_ij: the softmax backward term, one float per row
        delta = _to_tiles((dout.to(acc) * out.to(acc)).sum(-1, keepdim=True), KV, block_q, acc)
        dqt, dkt, dvt = torch.zeros_like(qt), torch.zeros_like(kt), torch.zeros_like(vt)
        for rows, cols, needs_mask in plan:
            qb, kb, vb, dob = qt[rows], kt[cols], vt[cols], dot[rows]
            s = qb @ kb.transpose(-1, -2)
            if needs_mask:
                hide(s, rows, cols)
            p = s.sub_(lse[rows]).exp_()  # probabilities, recomputed instead of stored
            dvt[cols] += p.transpose(-1, -2) @ dob  # += is exact: no tile repeats within a batch
            ds = (dob @ vb.transpose(-1, -2)).sub_(delta[rows]).mul_(p)  # dScore = P * (dP - delta)
            dqt[rows] += ds @ kb
            dkt[cols] += ds.transpose(-1, -2) @ qb  # qb carries the scale already
        dq = _from_tiles(dqt.mul_(scale), H, T)
        dk, dv = _from_tiles(dkt, KV, S), _from_tiles(dvt, KV, S)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _loss_and_grads(chunk_loss, hidden, weight, chunk_size, with_grads, matmul_dtype):
    """Sum over rows of chunk_loss(logits, first_row, with_grads) -> (per-row loss, dloss/dlogits
    or None), one chunk of rows at a time so only chunk_size x V logits ever exist; with_grads also
    returns the gradients of that sum for hidden and weight (weight's summed over chunks).
    matmul_dtype: float32 (exact), or bfloat16 under autocast: the three vocabulary-sized matmuls
    then run in bf16 as autocast's lm_head would, while the softmax, the loss and the weight
    gradient's sum over chunks stay in float32."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    mm = matmul_dtype if matmul_dtype is not None else acc
    w = weight.to(mm)  # one copy of W in the matmul dtype (float32 for bf16 weights without autocast)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if with_grads else None
    grad_weight = None  # made by the first chunk's matmul: no V x d buffer of zeros to fill and add to
    for c0 in range(0, len(hidden), chunk_size):
        h = hidden[c0:c0 + chunk_size].to(mm)
        rows, dlogits = chunk_loss((h @ w.T).to(acc), c0, with_grads)
        total += rows.sum()
        if with_grads:
            dlogits = dlogits.to(mm)
            grad_hidden[c0:c0 + chunk_size] = dlogits @ w
            if grad_weight is None:
                grad_weight = (dlogits.T @ h).to(acc)
            elif mm == acc:
                grad_weight.addmm_(dlogits.T, h)
            else:
                grad_weight += dlogits.T @ h  # each chunk's part in bf16, their sum in float32
        del dlogits  # free this chunk before the next one is allocated
    if with_grads and grad_weight is None:  # no rows: zero gradients
        grad_weight = torch.zeros(w.shape, dtype=acc, device=w.device)
    return total, grad_hidden, grad_weight


class _ChunkedLoss(torch.autograd.Function):
    """Sum of a per-row loss of the logits hidden @ weight.T, never holding all logits. The
    backward recomputes each chunk's logits (recompute=True: nothing but the inputs is kept), or,
    with recompute=False, the gradients are computed during the forward and only scaled in the
    backward: 3 instead of 4 (N x d x V) matmuls, but the gradients are held in between."""

    @staticmethod
    @_float_math
    def forward(ctx, hidden, weight, chunk_loss, chunk_size, recompute, with_grads, matmul_dtype):
        total, grad_hidden, grad_weight = _loss_and_grads(
            chunk_loss, hidden, weight, chunk_size, with_grads and not recompute, matmul_dtype)
        ctx.setup = (chunk_loss, chunk_size, recompute, hidden.dtype, weight.dtype, matmul_dtype)
        if recompute:
            ctx.save_for_backward(hidden, weight)
        else:
            ctx.grads = (grad_hidden, grad_weight)  # intermediate results: kept on ctx (torch docs)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_float_math
    def backward(ctx, grad_total):
        chunk_loss, chunk_size, recompute, hidden_dtype, weight_dtype, matmul_dtype = ctx.setup
        if recompute:
            hidden, weight = ctx.saved_tensors
            _, grad_hidden, grad_weight = _loss_and_grads(chunk_loss, hidden, weight, chunk_size, True,
                                                          matmul_dtype)
        else:
            if not hasattr(ctx, "grads"):
                raise RuntimeError("a second backward through this loss needs recompute=True")
            grad_hidden, grad_weight = ctx.grads
            del ctx.grads  # scaled in place below: a second use would be wrong
        grad_hidden = grad_hidden.mul_(grad_total).to(hidden_dtype)
        return grad_hidden, grad_weight.mul_(grad_total).to(weight_dtype), None, None, None, None, None


def _chunked_loss(chunk_loss, hidden, weight, chunk_size, recompute):
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    matmul_dtype = _autocast_dtype(hidden.device.type)
    elements = LOSS_CHUNK_ELEMENTS_BF16 if matmul_dtype == torch.bfloat16 else LOSS_CHUNK_ELEMENTS
    chunk_size = chunk_size or max(1, elements // len(weight))
    return _ChunkedLoss.apply(hidden, weight, chunk_loss, chunk_size, recompute, with_grads, matmul_dtype)


def _autocast_dtype(device_type):
    """Under autocast the loss matmuls take its dtype, as every other linear layer's do (the
    reference's bf16 lm_head included); None: the inputs' precision, at least float32."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _reduce(total, count, reduction):
    if reduction == "sum":
        return total
    if reduction == "mean":  # no selected position gives 0 (and zero gradients), not NaN
        return total / max(count, 1)
    raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'sum'")


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", chunk_size=None,
                         recompute=True):
    """cross_entropy(hidden @ weight.T, targets) without holding all logits. hidden (..., d),
    weight (V, d), targets (...) with ignore_index marking unsupervised positions. reduction:
    "mean" over supervised positions (0 if there are none) or "sum"; a float32 (float64) scalar.
    chunk_size: rows per chunk (default: LOSS_CHUNK_ELEMENTS logits per chunk). recompute=True: the
    backward recomputes chunk logits and nothing but the inputs is kept in between;
    recompute=False: gradients are made in the forward (3 instead of 4 matmuls of N x d x V; at
    140m shapes on the 2-core CPU ~1.1x naive time instead of ~1.3x) and held until the backward
    (V x d + N x d floats)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    # Ignored rows need no logits at all: drop them first (SFT prompts are often half the tokens).
    select = (t != ignore_index).nonzero().squeeze(1)
    h, t = h[select], t[select]

    def chunk_loss(logits, c0, with_grad):  # -log softmax[target], and softmax - onehot
        rows, target = torch.arange(len(logits), device=logits.device), t[c0:c0 + len(logits)]
        target_logit = logits[rows, target]
        m = logits.amax(-1, keepdim=True)
        p = logits.sub_(m).exp_()  # in place: the chunk's logits are the memory peak
        sum_exp = p.sum(-1, keepdim=True)
        if with_grad:
            p.div_(sum_exp)[rows, target] -= 1
        return (m + sum_exp.log()).squeeze(1) - target_logit, p if with_grad else None

    total = _chunked_loss(chunk_loss, h, weight, chunk_size, recompute)
    return _reduce(total, len(t), reduction)


def distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None,
                 temperature=1.0, reduction="mean", chunk_size=None, recompute=True):
    """Logit distillation for mid-training (RECIPE section 4): KL(teacher || student) of
    softmax(logits / temperature) summed over the vocabulary per position, times temperature^2
    (which keeps the gradient scale independent of the temperature); "mean" or "sum" over the
    positions where mask (...) is true (all if None). Logits are hidden @ weight.T, made chunk by
    chunk for both models; the teacher may have another width d and gets no gradient."""
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    if len(hs) != len(ht):
        raise ValueError(f"student has {len(hs)} positions but teacher {len(ht)}")
    if mask is not None:
        select = mask.reshape(-1).nonzero().squeeze(1)
        hs, ht = hs[select], ht[select]
    acc = torch.promote_types(hs.dtype, torch.float32)
    mm = _autocast_dtype(hs.device.type) or acc  # the student's matmul dtype, so a copy still gives 0
    wt = teacher_weight.detach().to(mm)
    tau = float(temperature)

    def log_softmax_(z):
        z.div_(tau)
        return z.sub_(torch.logsumexp(z, -1, keepdim=True))

    def chunk_loss(logits, c0, with_grad):
        # Both sides are computed the same way, so an identical student gives exactly 0.
        log_ps = log_softmax_(logits)
        log_pt = log_softmax_((ht[c0:c0 + len(logits)].to(mm) @ wt.T).to(acc))
        p_t = log_pt.exp()
        kl = (p_t * log_pt.sub_(log_ps)).sum(-1)
        # d(tau^2 KL)/d(student logits) = tau (p_student - p_teacher)
        return kl * tau**2, log_ps.exp_().sub_(p_t).mul_(tau) if with_grad else None

    total = _chunked_loss(chunk_loss, hs, student_weight, chunk_size, recompute)
    return _reduce(total, len(hs), reduction)


class DistillationLoss(torch.nn.Module):
    """Mid-training's loss (RECIPE section 4): KL(teacher || student) over the vocabulary at every
    supervised position, computed chunk by chunk (distill_loss), plus kd_ce_weight x
    cross-entropy. The paper publishes neither the temperature nor any CE mixing: defaults T = 1
    and pure distillation, as the official README describes. Returns the summed (loss, ce, kd) of
    one micro-batch; the caller divides by the global count of supervised tokens. This module is
    what DDP wraps when there is a teacher (without one, DDP wraps the model itself)."""

    def __init__(self, model, teacher, temperature=1.0, ce_weight=0.0):
        super().__init__()
        self.model = model
        self.teacher = [teacher]  # in a list: not a submodule, so not in parameters() or state_dict()
        self.temperature, self.ce_weight = temperature, ce_weight

    def forward(self, x, y, doc_ids=None):
        teacher = self.teacher[0]
        h = self.model.forward_hidden(x, doc_ids)
        w = self.model.lm_head_weight
        with torch.no_grad():
            t_h = teacher.forward_hidden(x, doc_ids)
        kd = distill_loss(h, w, t_h, teacher.lm_head_weight, mask=y != -100, temperature=self.temperature,
                          reduction="sum")
        with torch.no_grad() if self.ce_weight == 0 else contextlib.nullcontext():
            ce = linear_cross_entropy(h, w, y, reduction="sum")  # logged even when not trained on
        loss = kd + self.ce_weight * ce if self.ce_weight else kd
        return loss, ce.detach(), kd.detach()
