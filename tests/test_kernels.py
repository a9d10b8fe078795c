"""Tests for kernels.py against float64 naive references. Small shapes and small tiles (block_q,
block_k of a few positions) exercise the tiling, the online softmax and the tile skipping cheaply."""
import re

import pytest
import torch
import torch.nn.functional as F

import kernels


def naive_attention(q, k, v, causal, doc_ids):
    """Written independently of kernels.py: repeated K/V, full score matrix, float64 softmax."""
    B, H, T, D = q.shape
    S = k.shape[2]
    G = H // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    scores = q.double() @ k.transpose(-1, -2) / D**0.5
    allowed = torch.ones(B, T, S, dtype=torch.bool)
    for i in range(T):
        for j in range(S):
            if causal and j > S - T + i:
                allowed[:, i, j] = False
            if doc_ids is not None:
                allowed[:, i, j] &= doc_ids[:, S - T + i] == doc_ids[:, j]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, -1) @ v


def packed_doc_ids(B, S, lengths_per_row):
    rows = []
    for lengths in lengths_per_row:
        ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])
        assert len(ids) == S
        rows.append(ids)
    return torch.stack(rows)[:B]


def make_qkv(B, H, KV, T, S, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, KV, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, KV, S, D, generator=g, dtype=torch.float64)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def check_against_naive(run, q, k, v, causal, doc_ids, atol, rtol=0.0):
    """Forward and grads of q, k, v against the float64 reference on the same (rounded) inputs."""
    out = run(q, k, v, causal, doc_ids)
    dout = torch.randn_like(out, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out = naive_attention(*refs, causal, doc_ids)
    ref_grads = torch.autograd.grad(ref_out, refs, dout)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype, name
        torch.testing.assert_close(g.double(), r, atol=atol, rtol=rtol, msg=f"grad {name}")


def fused_small_tiles(q, k, v, causal, doc_ids):
    return kernels.fused_attention(q, k, v, causal, doc_ids, block_q=8, block_k=8)


def sdpa(q, k, v, causal, doc_ids):
    return kernels.attention(q, k, v, causal, doc_ids, backend="sdpa")


# (B, H, KV, T, S, causal, doc layout per batch row or None)
CASES = {
    "odd-length causal": (1, 2, 2, 37, 37, True, None),
    "gqa-3 non-causal": (2, 6, 2, 21, 21, False, None),
    "packed docs, len-1 docs": (2, 4, 2, 29, 29, True, [[1, 1, 7, 1, 19], [29]]),
    "query tile inside one doc": (1, 3, 1, 40, 40, True, [[3, 34, 3]]),
    "docs non-causal": (1, 4, 1, 23, 23, False, [[5, 1, 10, 7]]),
    "kv-cache T<S": (2, 4, 2, 5, 29, True, None),
    "kv-cache with docs": (1, 6, 3, 11, 33, True, [[20, 1, 12]]),
    "single decode query": (1, 2, 1, 1, 19, True, [[4, 15]]),
}


def varlen(q, k, v, causal, doc_ids):
    return kernels.attention(q, k, v, causal, doc_ids, backend="varlen")  # rows without documents: SDPA


@pytest.mark.parametrize("run", [fused_small_tiles, sdpa, varlen], ids=["fused", "sdpa", "varlen"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_attention_matches_naive_float64(run, case):
    B, H, KV, T, S, causal, docs = case
    doc_ids = packed_doc_ids(B, S, docs) if docs else None
    q, k, v = make_qkv(B, H, KV, T, S, 16)
    check_against_naive(run, q, k, v, causal, doc_ids, atol=1e-10)


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 5, 6])
def test_fused_gqa_groups(groups):
    q, k, v = make_qkv(1, 2 * groups, 2, 19, 19, 8, seed=groups)
    doc_ids = packed_doc_ids(1, 19, [[6, 2, 11]])
    check_against_naive(fused_small_tiles, q, k, v, True, doc_ids, atol=1e-10)


def test_fused_arbitrary_doc_ids():
    # ids that are neither sorted nor contiguous: tile ranges overlap without any shared document
    g = torch.Generator().manual_seed(3)
    doc_ids = torch.randint(0, 3, (2, 27), generator=g, dtype=torch.int32)
    doc_ids[:, 8:16] = torch.tensor([0, 2, 0, 2, 0, 2, 0, 2])
    q, k, v = make_qkv(2, 4, 2, 27, 27, 8)
    for causal in (True, False):
        check_against_naive(fused_small_tiles, q, k, v, causal, doc_ids, atol=1e-10)


@pytest.mark.parametrize("n_buckets", [1, 2, 3, 50])
def test_varlen_arbitrary_doc_ids_and_buckets(n_buckets):
    # ids repeated apart (0 2 0 2 ...) are one document each, as in the dense mask; the buckets only
    # change how many documents share an SDPA call (padded to the longest of them)
    g = torch.Generator().manual_seed(3)
    doc_ids = torch.randint(0, 3, (2, 27), generator=g, dtype=torch.int32) + 5
    doc_ids[:, 8:16] = torch.tensor([5, 7, 5, 7, 5, 7, 5, 7])
    q, k, v = make_qkv(2, 6, 2, 27, 27, 8)
    run = lambda *a: kernels.varlen_attention(*a, n_buckets=n_buckets)  # noqa: E731
    for causal in (True, False):
        check_against_naive(run, q, k, v, causal, doc_ids, atol=1e-10)


def test_varlen_float32_and_bfloat16_and_refusals():
    doc_ids = packed_doc_ids(2, 33, [[10, 23], [1, 31, 1]])
    q, k, v = make_qkv(2, 6, 2, 33, 33, 16, dtype=torch.float32)
    check_against_naive(kernels.varlen_attention, q, k, v, True, doc_ids, atol=2e-5, rtol=1e-5)
    q, k, v = make_qkv(2, 6, 2, 33, 33, 16, dtype=torch.bfloat16)
    check_against_naive(kernels.varlen_attention, q, k, v, True, doc_ids, atol=3e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="doc_ids"):
        kernels.varlen_attention(q, k, v, True, None)
    with pytest.raises(ValueError, match="keys"):
        kernels.varlen_attention(q[:, :, 3:], k, v, True, doc_ids)


def test_fused_rectangular_tiles_and_default_tiles():
    q, k, v = make_qkv(1, 3, 3, 45, 45, 8)
    doc_ids = packed_doc_ids(1, 45, [[13, 1, 31]])
    run = lambda *a: kernels.fused_attention(*a, block_q=16, block_k=5)  # noqa: E731
    check_against_naive(run, q, k, v, True, doc_ids, atol=1e-10)
    check_against_naive(kernels.fused_attention, q, k, v, True, doc_ids, atol=1e-10)


def test_fused_one_tile_pair_per_batch(monkeypatch):
    monkeypatch.setattr(kernels, "TILE_BATCH_ELEMENTS", 1)
    q, k, v = make_qkv(2, 4, 2, 30, 30, 8)
    doc_ids = packed_doc_ids(2, 30, [[12, 18], [1, 2, 27]])
    check_against_naive(fused_small_tiles, q, k, v, True, doc_ids, atol=1e-10)


def test_fused_float32_and_bfloat16():
    q, k, v = make_qkv(2, 6, 2, 33, 33, 16, dtype=torch.float32)
    doc_ids = packed_doc_ids(2, 33, [[10, 23], [1, 31, 1]])
    check_against_naive(fused_small_tiles, q, k, v, True, doc_ids, atol=2e-5, rtol=1e-5)
    q, k, v = make_qkv(2, 6, 2, 33, 33, 16, dtype=torch.bfloat16)
    check_against_naive(fused_small_tiles, q, k, v, True, doc_ids, atol=3e-2, rtol=2e-2)


def test_autocast_keeps_attention_in_float32_and_runs_the_loss_matmuls_in_bf16():
    # Attention tiles stay float32 under autocast (exact); the loss's vocabulary matmuls take bf16
    # as any linear layer does, its softmax, loss and gradient sums float32.
    q, k, v = make_qkv(1, 4, 2, 20, 20, 16, dtype=torch.float32)
    doc_ids = packed_doc_ids(1, 20, [[9, 11]])
    hidden, weight, targets = loss_inputs((12,), 16, 40, torch.float32)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = naive_ce(h64, w64, targets, "mean")
    ref_grads = torch.autograd.grad(ref, (h64, w64))
    exact = kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_against_naive(fused_small_tiles, q, k, v, True, doc_ids, atol=2e-5, rtol=1e-5)
        for recompute in (True, False):
            loss = kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=5, recompute=recompute)
            grads = torch.autograd.grad(loss, (hidden, weight))
            assert loss.dtype == torch.float32 and loss.item() != exact.item()  # bf16 matmuls ran
            torch.testing.assert_close(loss.double(), ref.detach(), atol=2e-2, rtol=1e-2)
            for g, r in zip(grads, ref_grads):
                assert g.dtype == torch.float32  # float32 master weights get float32 gradients
                torch.testing.assert_close(g.double(), r, atol=2e-2 * r.abs().max().item(), rtol=0)
        # an identical student and teacher: both sides round alike, the divergence is exactly 0
        kd = kernels.distill_loss(hidden, weight, hidden, weight, chunk_size=5)
    assert kd.item() == 0


def plan_pairs(T, S, causal, doc_ids, block, max_pairs=100):
    docs = (None, None)
    if doc_ids is not None:
        docs = (kernels._tile_ids(doc_ids[:, S - T:], block), kernels._tile_ids(doc_ids, block))
    plan = kernels._tile_plan(T, S, causal, *docs, block, block, max_pairs, "cpu")
    tiles = lambda i: list(range(i.start, i.stop)) if isinstance(i, slice) else i.tolist()  # noqa: E731
    batches = [(list(zip(tiles(rows), tiles(cols))), masked) for rows, cols, masked in plan]
    for pairs, _ in batches:  # a batch is one online-softmax step: one diagonal, no repeated tile
        assert len({j - i for i, j in pairs}) == 1
        assert len({i for i, _ in pairs}) == len(pairs) <= max_pairs
    return batches


def test_tile_plan_skips_masked_tiles():
    # 4 aligned documents of 16 tokens, tiles of 8: per document the 3 live tiles of its 2x2 causal
    # block; the diagonal tiles need the causal mask, the tile below does not.
    doc_ids = packed_doc_ids(1, 64, [[16, 16, 16, 16]])
    batches = plan_pairs(64, 64, True, doc_ids, 8)
    assert batches == [([(1, 0), (3, 2), (5, 4), (7, 6)], False), ([(i, i) for i in range(8)], True)]
    assert [len(p) for p, _ in plan_pairs(64, 64, True, doc_ids, 8, max_pairs=3)] == [3, 1, 3, 3, 2]
    # causal only: the lower triangle of tiles; the KV-cache offset moves the queries to the end
    assert sum(len(p) for p, _ in plan_pairs(64, 64, True, None, 8)) == 8 * 9 // 2
    assert plan_pairs(8, 64, True, None, 8) == [([(0, j)], j == 7) for j in range(8)]
    # keys padded up to a whole tile must be masked even without causal or document masks
    assert plan_pairs(20, 20, False, None, 8)[-1] == ([(0, 2)], True)


def test_backend_switch_and_auto_choice(monkeypatch):
    calls = []
    for name in kernels.BACKENDS:
        monkeypatch.setattr(kernels, f"{name}_attention", lambda *a, name=name: calls.append(name))
    monkeypatch.setattr(kernels, "SDPA_MASK_MAX_KEYS", 3)
    q, k, v = make_qkv(1, 2, 1, 4, 4, 8)
    doc_ids = torch.zeros(1, 4, dtype=torch.long)
    kernels.attention(q, k, v)
    kernels.attention(q, k, v, doc_ids=doc_ids)  # 4 keys > 3, packed rows on a CPU: per document
    kernels.attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], doc_ids=doc_ids[:, :3])  # short: a dense mask
    kernels.attention(q[:, :, 3:], k, v, doc_ids=doc_ids)  # a KV cache (1 query, 4 keys): the tile loop
    assert calls == ["sdpa", "varlen", "sdpa", "fused"]
    calls.clear()
    with monkeypatch.context() as m:  # varlen brings the lengths to the host: not under torch.compile
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        kernels.attention(q, k, v, doc_ids=doc_ids)
    assert calls == ["fused"]
    with kernels.use_backend("sdpa"):
        kernels.attention(q, k, v, doc_ids=doc_ids)
        with kernels.use_backend("fused"):
            kernels.attention(q, k, v)
        kernels.attention(q, k, v, doc_ids=doc_ids, backend="fused")  # an explicit argument wins
        kernels.attention(q, k, v, doc_ids=doc_ids, backend="varlen")
        kernels.attention(q, k, v, backend="varlen")  # no documents to split: SDPA
    kernels.attention(q, k, v)
    assert calls[1:] == ["sdpa", "fused", "fused", "varlen", "sdpa", "sdpa"]
    kernels.set_backend("fused")
    try:
        kernels.attention(q, k, v)
    finally:
        kernels.set_backend(None)
    assert calls[-1] == "fused" and kernels._forced_backend is None
    with pytest.raises(ValueError):
        kernels.set_backend("flash")
    with pytest.raises(ValueError):
        kernels.attention(q, k, v, backend="flash")
    with pytest.raises(ValueError):
        kernels.attention(q, k[:, :, :2], v[:, :, :2])  # fewer keys than queries


def test_no_triton_import():
    source = open(kernels.__file__).read()
    assert not re.search(r"^\s*(import|from)\s+triton", source, re.M)


# ---------------------------------------------------------------- losses


def naive_ce(hidden, weight, targets, reduction):
    logits = hidden.double() @ weight.double().T
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), reduction=reduction)


def loss_inputs(shape, d, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, shape, generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [3, None])
@pytest.mark.parametrize("recompute", [True, False])
def test_linear_cross_entropy_matches_naive(dtype, tol, reduction, chunk_size, recompute):
    hidden, weight, targets = loss_inputs((3, 7), 12, 50, dtype)
    targets[0, :4] = -100
    targets[2, 6] = -100
    loss = kernels.linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=chunk_size,
                                        recompute=recompute)
    grads = torch.autograd.grad(loss * 3, (hidden, weight))  # an upstream gradient other than 1
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = naive_ce(h64, w64, targets, reduction)
    ref_grads = torch.autograd.grad(ref * 3, (h64, w64))
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, atol=tol, rtol=tol)
    assert (grads[0][0, :4] == 0).all()  # ignored positions pass no gradient


def test_linear_cross_entropy_custom_ignore_no_grad_and_bf16():
    hidden, weight, targets = loss_inputs((10,), 8, 30, torch.float64)
    targets[3] = 7
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=7)
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(hidden, weight, targets, ignore_index=7, chunk_size=4)
    torch.testing.assert_close(loss, ref.detach())
    hb, wb, tb = loss_inputs((2, 9), 16, 40, torch.bfloat16)
    for recompute in (True, False):
        loss = kernels.linear_cross_entropy(hb, wb, tb, chunk_size=5, recompute=recompute)
        loss.backward()
    ref = naive_ce(hb.detach(), wb.detach(), tb, "mean")  # same bf16 inputs, float64 math
    assert loss.dtype == torch.float32  # the loss value is reported in float32
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-4)
    assert hb.grad.dtype == torch.bfloat16 and torch.isfinite(wb.grad.float()).all()


def test_linear_cross_entropy_all_ignored_is_zero():
    hidden, weight, targets = loss_inputs((2, 3), 4, 10, torch.float32)
    targets.fill_(-100)
    loss = kernels.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert loss.item() == 0.0
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_gradients_from_forward_refuse_a_second_backward():
    hidden, weight, targets = loss_inputs((4,), 4, 10, torch.float32)
    loss = kernels.linear_cross_entropy(hidden, weight, targets, recompute=False)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute=True"):
        loss.backward()


def naive_distill(sh, sw, th, tw, mask, temperature, reduction):
    log_ps = F.log_softmax((sh.double() @ sw.double().T) / temperature, -1)
    log_pt = F.log_softmax((th.double() @ tw.double().T) / temperature, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temperature**2
    kl = kl[mask] if mask is not None else kl.reshape(-1)
    return kl.sum() if reduction == "sum" else kl.mean()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("reduction,temperature,use_mask,recompute",
                         [("mean", 1.0, True, True), ("sum", 2.0, False, True), ("mean", 0.5, True, False)])
def test_distill_loss_matches_naive(dtype, tol, reduction, temperature, use_mask, recompute):
    sh, sw, _ = loss_inputs((2, 6), 10, 40, dtype, seed=0)
    th, tw, _ = loss_inputs((2, 6), 14, 40, dtype, seed=1)  # teacher of another width
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool) if use_mask else None
    loss = kernels.distill_loss(sh, sw, th, tw, mask, temperature, reduction, chunk_size=4, recompute=recompute)
    grads = torch.autograd.grad(loss * 3, (sh, sw))
    s64 = [x.detach().double().requires_grad_() for x in (sh, sw)]
    ref = naive_distill(*s64, th.detach(), tw.detach(), mask, temperature, reduction)
    ref_grads = torch.autograd.grad(ref * 3, s64)
    torch.testing.assert_close(loss.double(), ref, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=tol, rtol=tol)
    if use_mask:
        assert (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("recompute", [True, False])
def test_distill_into_identical_copy_is_zero_and_teacher_gets_no_grad(recompute):
    sh, sw, _ = loss_inputs((3, 5), 8, 30, torch.float32)
    th, tw = sh.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()
    loss = kernels.distill_loss(sh, sw, th, tw, temperature=2.0, chunk_size=4, recompute=recompute)
    loss.backward()
    assert loss.item() == 0.0
    assert (sh.grad == 0).all() and (sw.grad == 0).all()
    assert th.grad is None and tw.grad is None
    assert kernels.distill_loss(sh, sw, th * 2, tw, reduction="sum") > 0


def test_model_on_long_packed_rows_takes_varlen_and_matches_the_dense_mask(monkeypatch):
    # Above SDPA_MASK_MAX_KEYS keys a packed batch goes through varlen inside the model; its loss and
    # gradients equal the dense-mask SDPA's (float32 summation order only)
    from model import MobileLLM, ModelConfig
    torch.manual_seed(0)
    model = MobileLLM(ModelConfig.from_size("toy"))
    x, y = torch.randint(0, 272, (2, 48)), torch.randint(0, 272, (2, 48))
    doc_ids = packed_doc_ids(2, 48, [[20, 1, 27], [9, 39]])
    monkeypatch.setattr(kernels, "SDPA_MASK_MAX_KEYS", 16)
    used = []
    varlen_attention = kernels.varlen_attention
    monkeypatch.setattr(kernels, "varlen_attention", lambda *a: used.append(1) or varlen_attention(*a))
    results = []
    for backend in (None, "sdpa"):
        model.zero_grad()
        with kernels.use_backend(backend):
            _, loss = model(x, y, doc_ids=doc_ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert len(used) == model.config.n_layer
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
