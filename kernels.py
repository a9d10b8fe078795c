"""
Triton-free kernels in plain PyTorch: attention with document masks, and large-vocabulary losses.
They run wherever torch runs (CPU, CUDA, MPS) and hold memory linear in sequence length.

attention(q, k, v, causal, doc_ids) is the one entry point model.py uses. Two backends:
- "sdpa": torch's scaled_dot_product_attention. Fast without a mask, but an explicit mask (packed
  documents) sends it to a path that materialises the T x S score matrix.
- "fused": the FlashAttention algorithm. Queries and keys are cut into tiles; for each query tile we
  walk its key tiles keeping, per row, a running max m and running sum l of exp(score - m) in
  float32 (online softmax), so the output is exact without ever holding a row of T scores. The
  forward saves only the output and the log-sum-exp per row; the backward recomputes each tile's
  probabilities from them. Tiles whose keys no query of the tile may see (above the causal
  diagonal, or in other documents of a packed sequence) are skipped: with 8 documents in a
  sequence only ~1/8 of the causal tiles hold work, which is where the speed-up comes from.
The automatic choice sends document masks to "fused" and everything else to "sdpa";
set_backend(name) / use_backend(name) force one (tests, benchmarks, users).

linear_cross_entropy and distill_loss fuse the output projection with the loss. A 128,256-token
vocabulary makes logits the memory peak of a small model (4 bytes x 128,256 = 0.5 MB per token), so
both compute logits a chunk of rows at a time, keep one float per row (the log-sum-exp), and
recompute the chunk's logits in the backward.
"""
import contextlib
import functools
import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "fused")
# Tile sizes of the fused kernel. Large tiles keep the 2-core CPU in big batched matmuls and the
# Python loop short; 128 beat 64 and 256 at T = 1k..4k with 8 documents (see bench.py).
BLOCK_Q = 128
BLOCK_K = 128
# Loss chunks hold about this many logits (2^24 floats = 64 MB): 130 rows of a 128k vocabulary.
# Small enough to cut peak memory far below naive, large enough for full-speed matmuls.
LOSS_CHUNK_ELEMENTS = 2**24

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
    last T of the S positions (S > T with a KV cache). doc_ids (B, S) integer document ids of a
    packed sequence: key j is visible to query i iff they share a document (and j <= i if causal).
    Returns (B, H, T, D). backend: "sdpa", "fused", or None (forced backend, else automatic)."""
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(f"attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] < T:
        raise ValueError(f"attention: {T} queries but only {k.shape[2]} keys")
    if doc_ids is not None and tuple(doc_ids.shape) != (B, k.shape[2]):
        raise ValueError(f"doc_ids must be (B, S) = {(B, k.shape[2])}, got {tuple(doc_ids.shape)}")
    name = backend or _forced_backend or ("fused" if doc_ids is not None else "sdpa")
    if name == "sdpa":
        return sdpa_attention(q, k, v, causal, doc_ids)
    if name == "fused":
        return fused_attention(q, k, v, causal, doc_ids)
    raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")


def visible(q_pos, k_pos, causal, q_doc=None, k_doc=None):
    """Bool mask (B or 1, len(q_pos), len(k_pos)): which keys each query may attend to."""
    mask = torch.ones(1, len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
    if causal:
        mask = mask & (k_pos[None, None, :] <= q_pos[None, :, None])
    if q_doc is not None:
        mask = mask & (q_doc[:, :, None] == k_doc[:, None, :])
    return mask


def sdpa_attention(q, k, v, causal=True, doc_ids=None):
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    # SDPA's is_causal aligns the diagonal top-left, which is only right when T == S (or T == 1,
    # where the last position sees everything); the KV-cache case needs an explicit offset mask.
    if doc_ids is None and (not causal or T == S or T == 1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, enable_gqa=gqa)
    q_pos = torch.arange(S - T, S, device=q.device)
    k_pos = torch.arange(S, device=q.device)
    q_doc, k_doc = (doc_ids[:, S - T:], doc_ids) if doc_ids is not None else (None, None)
    mask = visible(q_pos, k_pos, causal, q_doc, k_doc)[:, None]  # (B, 1, T, S): quadratic memory
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def fused_attention(q, k, v, causal=True, doc_ids=None, block_q=None, block_k=None):
    """The FlashAttention algorithm (see module docstring); same arguments as attention()."""
    return _FusedAttention.apply(q, k, v, causal, doc_ids, block_q or BLOCK_Q, block_k or BLOCK_K)


def _float_math(method):
    """Run a forward/backward with autocast off: autocast would turn our float32 tile and chunk
    matmuls back into bfloat16, which is the precision the accumulators exist to avoid."""
    @functools.wraps(method)
    def run(ctx, x, *args):
        with torch.autocast(x.device.type, enabled=False):
            return method(ctx, x, *args)
    return run


def _tile_ranges(start, stop, block):
    return [(a, min(a + block, stop)) for a in range(start, stop, block)]


def _tile_bounds(ids, block):
    """Per-tile min and max of ids (B, N) over consecutive blocks: (B, n_tiles) each."""
    B, N = ids.shape
    pad = -N % block  # repeat the last id so padding changes no tile's range
    ids = torch.cat([ids, ids[:, -1:].expand(B, pad)], 1).view(B, -1, block)
    return ids.amin(-1), ids.amax(-1)


def _tile_plan(T, S, causal, doc_ids, block_q, block_k):
    """For each query tile, the key tiles it must visit as (j, needs_mask) pairs. A pair is skipped
    when every key lies after every query (causal) or when no batch row has a document id range of
    the query tile that overlaps the key tile's. For packed sequences (ids ascending) that is exact;
    for arbitrary ids overlap is only a necessary condition, and the tile mask handles the rest."""
    dev = doc_ids.device if doc_ids is not None else "cpu"
    q_lo = torch.arange(S - T, S, block_q, device=dev)
    q_hi = (q_lo + block_q).clamp(max=S) - 1
    k_lo = torch.arange(0, S, block_k, device=dev)
    k_hi = (k_lo + block_k).clamp(max=S) - 1
    alive = torch.ones(len(q_lo), len(k_lo), dtype=torch.bool, device=dev)
    full = alive.clone()  # every key of the tile visible to every query: no mask needed
    if causal:
        alive &= k_lo[None, :] <= q_hi[:, None]
        full &= k_hi[None, :] <= q_lo[:, None]
    if doc_ids is not None:
        qd_min, qd_max = _tile_bounds(doc_ids[:, S - T:], block_q)
        kd_min, kd_max = _tile_bounds(doc_ids, block_k)
        overlap = (qd_min[:, :, None] <= kd_max[:, None, :]) & (kd_min[:, None, :] <= qd_max[:, :, None])
        alive &= overlap.any(0)
        one_doc = (qd_min == qd_max)[:, :, None] & (kd_min == kd_max)[:, None, :] & (qd_min[:, :, None] == kd_min[:, None, :])
        full &= one_doc.all(0)
    alive, full = alive.tolist(), full.tolist()  # one host sync per call
    return [[(j, not full[i][j]) for j in range(len(k_lo)) if alive[i][j]] for i in range(len(q_lo))]


class _FusedAttention(torch.autograd.Function):
    # Layout: q is viewed as (B, KV, G, T, D) with G = H // KV query heads per kv head (consecutive
    # heads share a kv head). A query tile of n positions becomes (B, KV, G*n, D), so one batched
    # matmul against a (B, KV, n_k, D) key tile serves all G heads: GQA without repeating K or V.

    @staticmethod
    @_float_math
    def forward(ctx, q, k, v, causal, doc_ids, block_q, block_k):
        B, H, T, D = q.shape
        KV, S = k.shape[1], k.shape[2]
        G = H // KV
        acc = torch.promote_types(q.dtype, torch.float32)  # float32 accumulators, float64 stays exact
        scale = 1.0 / math.sqrt(D)
        qs = (q.to(acc) * scale).reshape(B, KV, G, T, D)  # scale folded into q once
        ks, vs = k.to(acc).contiguous(), v.to(acc).contiguous()
        q_tiles = _tile_ranges(0, T, block_q)
        k_tiles = _tile_ranges(0, S, block_k)
        plan = _tile_plan(T, S, causal, doc_ids, block_q, block_k)
        outs, lses = [], []
        for (i0, i1), row in zip(q_tiles, plan):
            n = i1 - i0
            qi = qs[:, :, :, i0:i1].reshape(B, KV, G * n, D)
            m = torch.full((B, KV, G * n, 1), -math.inf, dtype=acc, device=q.device)  # running max
            l = torch.zeros_like(m)  # running sum of exp(score - m)
            o = torch.zeros_like(qi)  # running sum of exp(score - m) @ v
            for j, needs_mask in row:
                j0, j1 = k_tiles[j]
                s = qi @ ks[:, :, j0:j1].transpose(-1, -2)
                if needs_mask:
                    _mask_tile(s, S - T + i0, i1 - i0, j0, j1, causal, doc_ids, G)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                # a row with no visible key yet has m = -inf: shift by 0 so exp gives 0, not NaN
                shift = m_new.masked_fill(m_new == -math.inf, 0.0)
                p = s.sub_(shift).exp_()
                alpha = (m - shift).exp_()  # rescales what was summed under the old max
                l.mul_(alpha).add_(p.sum(-1, keepdim=True))
                o.mul_(alpha).add_(p @ vs[:, :, j0:j1])
                m = m_new
            empty = l == 0  # a query that sees no key outputs 0 and passes no gradient
            outs.append((o / l.masked_fill(empty, 1.0)).view(B, KV, G, n, D))
            # lse = +inf for empty rows so the backward's exp(s - lse) is 0 there
            lses.append((m + l.log()).masked_fill(empty, math.inf).view(B, KV, G, n))
        out = torch.cat(outs, 3).view(B, H, T, D).to(q.dtype)
        lse = torch.cat(lses, 3)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.setup = (causal, block_q, block_k, plan)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_float_math
    def backward(ctx, dout):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        causal, block_q, block_k, plan = ctx.setup
        B, H, T, D = q.shape
        KV, S = k.shape[1], k.shape[2]
        G = H // KV
        acc = lse.dtype
        scale = 1.0 / math.sqrt(D)
        qs = (q.to(acc) * scale).reshape(B, KV, G, T, D)
        ks, vs = k.to(acc).contiguous(), v.to(acc).contiguous()
        do = dout.to(acc).reshape(B, KV, G, T, D)
        # delta_i = sum_j P_ij dP_ij = rowsum(dO * O): the softmax backward term, one float per row
        delta = (do * out.to(acc).reshape(B, KV, G, T, D)).sum(-1)
        k_tiles = _tile_ranges(0, S, block_k)
        dk, dv = torch.zeros_like(ks), torch.zeros_like(vs)
        dqs = []
        for (i0, i1), row in zip(_tile_ranges(0, T, block_q), plan):
            n = i1 - i0
            qi = qs[:, :, :, i0:i1].reshape(B, KV, G * n, D)
            doi = do[:, :, :, i0:i1].reshape(B, KV, G * n, D)
            lsei = lse[:, :, :, i0:i1].reshape(B, KV, G * n, 1)
            deltai = delta[:, :, :, i0:i1].reshape(B, KV, G * n, 1)
            dqi = torch.zeros_like(qi)
            for j, needs_mask in row:
                j0, j1 = k_tiles[j]
                kj, vj = ks[:, :, j0:j1], vs[:, :, j0:j1]
                s = qi @ kj.transpose(-1, -2)
                if needs_mask:
                    _mask_tile(s, S - T + i0, n, j0, j1, causal, doc_ids, G)
                p = s.sub_(lsei).exp_()  # probabilities, recomputed instead of stored
                dv[:, :, j0:j1] += p.transpose(-1, -2) @ doi
                ds = (doi @ vj.transpose(-1, -2)).sub_(deltai).mul_(p)  # dScore = P * (dP - delta)
                dqi += ds @ kj
                dk[:, :, j0:j1] += ds.transpose(-1, -2) @ qi  # qi carries the scale already
            dqs.append(dqi.view(B, KV, G, n, D))
        dq = torch.cat(dqs, 3).mul_(scale).view(B, H, T, D)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _mask_tile(s, q0, n, j0, j1, causal, doc_ids, G):
    """Set the invisible scores of a (B, KV, G*n, n_k) tile to -inf in place; queries start at
    absolute position q0. The mask is per position, shared by the G heads of a kv group."""
    dev = s.device
    q_pos = torch.arange(q0, q0 + n, device=dev)
    k_pos = torch.arange(j0, j1, device=dev)
    q_doc = k_doc = None
    if doc_ids is not None:
        q_doc, k_doc = doc_ids[:, q0:q0 + n], doc_ids[:, j0:j1]
    mask = visible(q_pos, k_pos, causal, q_doc, k_doc)
    B, KV = s.shape[:2]
    s.view(B, KV, G, n, j1 - j0).masked_fill_(~mask[:, None, None], -math.inf)


def _loss_rows(chunk_size, vocab_size):
    return chunk_size or max(1, LOSS_CHUNK_ELEMENTS // vocab_size)


def _reduce(rows, n, reduction, select):
    """rows: per-row losses of the selected positions; n: number of positions in all."""
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":  # no selected position gives 0 (and zero gradients), not NaN
        return rows.sum() / max(rows.numel(), 1)
    if reduction == "none":
        return rows.new_zeros(n).index_put((select,), rows)
    raise ValueError(f"unknown reduction {reduction!r}; choose 'mean', 'sum' or 'none'")


class _LinearCrossEntropy(torch.autograd.Function):
    # Per-row losses -log softmax(h W^T)[target] over rows that all count (ignored rows are removed
    # before); the caller reduces them. Saved: inputs and one log-sum-exp per row.

    @staticmethod
    @_float_math
    def forward(ctx, hidden, weight, targets, chunk_size):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        w = weight.to(acc)  # one float32 copy of W (bf16 models); logits are never rounded to bf16
        lse = torch.empty(len(hidden), dtype=acc, device=hidden.device)
        target_logit = torch.empty_like(lse)
        for c0 in range(0, len(hidden), chunk_size):
            c1 = c0 + chunk_size
            z = hidden[c0:c1].to(acc) @ w.T
            target_logit[c0:c1] = z.gather(1, targets[c0:c1, None]).squeeze(1)
            # log-sum-exp in place on z (logsumexp() would allocate a second chunk-sized buffer)
            m = z.amax(-1, keepdim=True)
            lse[c0:c1] = (m + z.sub_(m).exp_().sum(-1, keepdim=True).log()).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return lse - target_logit

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_float_math
    def backward(ctx, grad_rows):
        hidden, weight, targets, lse = ctx.saved_tensors
        acc = lse.dtype
        w = weight.to(acc)
        grad_rows = grad_rows.to(acc)
        grad_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device)
        grad_weight = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for c0 in range(0, len(hidden), ctx.chunk_size):
            c1 = c0 + ctx.chunk_size
            h = hidden[c0:c1].to(acc)
            # dloss/dlogits = softmax - onehot(target), recomputed from the saved log-sum-exp
            dz = (h @ w.T).sub_(lse[c0:c1, None]).exp_()
            dz[torch.arange(len(h), device=dz.device), targets[c0:c1]] -= 1
            dz.mul_(grad_rows[c0:c1, None])
            grad_hidden[c0:c1] = dz @ w
            if grad_weight is not None:
                grad_weight.addmm_(dz.T, h)  # summed over chunks: W is shared by all rows
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden.to(hidden.dtype), grad_weight, None, None


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", chunk_size=None):
    """cross_entropy(hidden @ weight.T, targets) without holding all logits. hidden (..., d),
    weight (V, d), targets (...) with ignore_index marking unsupervised positions. reduction:
    "mean" over supervised positions (0 if there are none), "sum", or "none" (per position).
    chunk_size: rows per chunk (default: ~LOSS_CHUNK_ELEMENTS logits per chunk)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    # Ignored rows need no logits at all: drop them first (SFT prompts are often half the tokens).
    select = (t != ignore_index).nonzero().squeeze(1)
    rows = _LinearCrossEntropy.apply(h[select], weight, t[select], _loss_rows(chunk_size, len(weight)))
    loss = _reduce(rows, len(t), reduction, select)
    return loss.view(targets.shape) if reduction == "none" else loss


class _DistillKL(torch.autograd.Function):
    # Per-row KL(teacher || student) of softmax(logits / temperature) times temperature^2 (so the
    # gradient scale does not depend on the temperature). Teacher inputs get no gradient.

    @staticmethod
    @_float_math
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, temperature, chunk_size):
        acc = torch.promote_types(s_hidden.dtype, torch.float32)
        ws, wt = s_weight.to(acc), t_weight.to(acc)
        s_lse = torch.empty(len(s_hidden), dtype=acc, device=s_hidden.device)
        t_lse, kl = torch.empty_like(s_lse), torch.empty_like(s_lse)
        for c0 in range(0, len(s_hidden), chunk_size):
            c1 = c0 + chunk_size
            # Both sides computed the same way, so an identical student gives exactly 0.
            zs = (s_hidden[c0:c1].to(acc) @ ws.T) / temperature
            zt = (t_hidden[c0:c1].to(acc) @ wt.T) / temperature
            s_lse[c0:c1], t_lse[c0:c1] = torch.logsumexp(zs, -1), torch.logsumexp(zt, -1)
            log_pt = zt.sub_(t_lse[c0:c1, None])
            log_ps = zs.sub_(s_lse[c0:c1, None])
            kl[c0:c1] = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
        ctx.save_for_backward(s_hidden, s_weight, t_hidden, t_weight, s_lse, t_lse)
        ctx.setup = (temperature, chunk_size)
        return kl * temperature**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_float_math
    def backward(ctx, grad_rows):
        s_hidden, s_weight, t_hidden, t_weight, s_lse, t_lse = ctx.saved_tensors
        temperature, chunk_size = ctx.setup
        acc = s_lse.dtype
        ws, wt = s_weight.to(acc), t_weight.to(acc)
        # d(T^2 KL)/d(student logits) = T (p_student - p_teacher)
        grad_rows = grad_rows.to(acc) * temperature
        grad_hidden = torch.empty(s_hidden.shape, dtype=acc, device=s_hidden.device)
        grad_weight = torch.zeros_like(ws) if ctx.needs_input_grad[1] else None
        for c0 in range(0, len(s_hidden), chunk_size):
            c1 = c0 + chunk_size
            h = s_hidden[c0:c1].to(acc)
            ps = ((h @ ws.T) / temperature).sub_(s_lse[c0:c1, None]).exp_()
            pt = ((t_hidden[c0:c1].to(acc) @ wt.T) / temperature).sub_(t_lse[c0:c1, None]).exp_()
            dz = ps.sub_(pt).mul_(grad_rows[c0:c1, None])
            grad_hidden[c0:c1] = dz @ ws
            if grad_weight is not None:
                grad_weight.addmm_(dz.T, h)
        grad_weight = grad_weight.to(s_weight.dtype) if grad_weight is not None else None
        return grad_hidden.to(s_hidden.dtype), grad_weight, None, None, None, None


def distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None,
                 temperature=1.0, reduction="mean", chunk_size=None):
    """Logit distillation (RECIPE section on mid-training): KL(teacher || student) summed over the
    vocabulary per position, on softmax(logits / temperature), times temperature^2; reduced ("mean",
    "sum" or "none") over positions where mask (...) is true (all if None). Logits are hidden @
    weight.T computed chunk by chunk for both models; the teacher's may have another width d."""
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    if len(hs) != len(ht):
        raise ValueError(f"student has {len(hs)} positions but teacher {len(ht)}")
    keep = torch.ones(len(hs), dtype=torch.bool, device=hs.device) if mask is None else mask.reshape(-1).bool()
    select = keep.nonzero().squeeze(1)
    rows = _DistillKL.apply(hs[select], student_weight, ht[select], teacher_weight.detach(),
                            float(temperature), _loss_rows(chunk_size, len(student_weight)))
    loss = _reduce(rows, len(hs), reduction, select)
    return loss.view(student_hidden.shape[:-1]) if reduction == "none" else loss
