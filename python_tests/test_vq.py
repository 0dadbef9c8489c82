"""VectorQuantizer baseline: taming's VectorQuantizer2 formula (gradient mode) and the EMA codebook update."""

import pytest
import torch
from torch import nn

from lasers_ext import VectorQuantizer


def taming_vq2(z, weight, beta, legacy):
    """taming-transformers' VectorQuantizer2.forward, restated (einsum distances, argmin, legacy loss, STE)."""
    zp = z.permute(0, 2, 3, 1).contiguous()
    flat = zp.view(-1, weight.shape[1])
    d = (flat**2).sum(1, keepdim=True) + (weight**2).sum(1) - 2 * torch.einsum("bd,dn->bn", flat, weight.T)
    idx = torch.argmin(d, dim=1)
    z_q = weight[idx].view(zp.shape)
    if legacy:
        loss = torch.mean((z_q.detach() - zp) ** 2) + beta * torch.mean((z_q - zp.detach()) ** 2)
    else:
        loss = beta * torch.mean((z_q.detach() - zp) ** 2) + torch.mean((z_q - zp.detach()) ** 2)
    z_q = zp + (z_q - zp).detach()
    return z_q.permute(0, 3, 1, 2).contiguous(), loss, idx


@pytest.mark.parametrize("legacy", [True, False])
def test_gradient_mode_matches_taming(gen, legacy):
    q = VectorQuantizer(32, 4, beta=0.3, legacy=legacy)
    with torch.no_grad():
        q.embedding.weight.normal_(generator=gen)
    z = torch.randn(2, 4, 5, 3, generator=gen, requires_grad=True)
    z_q, loss, (perplexity, min_encodings, idx) = q(z)
    w = q.embedding.weight.detach().clone().requires_grad_()
    zz = z.detach().clone().requires_grad_()
    ref_zq, ref_loss, ref_idx = taming_vq2(zz, w, 0.3, legacy)
    assert torch.equal(idx, ref_idx) and min_encodings is None
    torch.testing.assert_close(z_q, ref_zq)
    torch.testing.assert_close(loss, ref_loss)
    g = torch.randn(z.shape, generator=gen)
    got = torch.autograd.grad((z_q * g).sum() + loss, (z, q.embedding.weight))
    want = torch.autograd.grad((ref_zq * g).sum() + ref_loss, (zz, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    counts = torch.bincount(idx, minlength=32).float()
    p = counts / counts.sum()
    torch.testing.assert_close(perplexity, torch.exp(-(p * torch.log(p + 1e-10)).sum()))


def test_layout_aliases_and_codebook_entry(gen):
    q = VectorQuantizer(n_embed=16, embedding_dim=3, sane_index_shape=True)
    z = torch.randn(2, 3, 4, 5, generator=gen)
    z_q, _, info = q(z)
    assert info[2].shape == (2, 4, 5)
    torch.testing.assert_close(q.get_codebook_entry(info[2], (2, 4, 5, 3)), z_q)
    torch.testing.assert_close(q.embed_code(info[2].reshape(-1), (2, 4, 5, 3)), z_q)
    assert q.embedding.weight.abs().max() <= 1 / 16  # taming's uniform(-1/n_e, 1/n_e) start (before any update)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 3, H, W\)"):
        q(torch.randn(2, 4, 4, 4))


def test_ema_update_follows_the_moving_averages(gen):
    q = VectorQuantizer(8, 2, ema=True, decay=0.9, eps=1e-5)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(8, 2, generator=gen))
        q.embed_avg.copy_(q.embedding.weight)
    w0, size0, avg0 = q.embedding.weight.clone(), q.cluster_size.clone(), q.embed_avg.clone()
    z = torch.randn(3, 2, 4, 4, generator=gen, requires_grad=True)
    z_q, loss, (_, _, idx) = q(z)
    sites = z.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.equal(idx, torch.cdist(sites, w0).argmin(1))
    torch.testing.assert_close(z_q.detach().permute(0, 2, 3, 1).reshape(-1, 2), w0[idx])  # quantized before update
    torch.testing.assert_close(loss, 0.25 * ((w0[idx] - sites) ** 2).mean())  # commitment only
    counts = torch.bincount(idx, minlength=8).float()
    sums = torch.zeros(8, 2).index_add_(0, idx, sites)
    size = 0.9 * size0 + 0.1 * counts
    avg = 0.9 * avg0 + 0.1 * sums
    n = size.sum()
    torch.testing.assert_close(q.embedding.weight, avg / ((size + 1e-5) / (n + 8e-5) * n)[:, None])
    assert not q.embedding.weight.requires_grad
    loss.backward()  # the codebook needs no gradient; the encoder gets the commitment gradient
    assert z.grad is not None and q.embedding.weight.grad is None
    q.eval()
    w1 = q.embedding.weight.clone()
    q(z)
    assert torch.equal(q.embedding.weight, w1)  # no update in eval mode


def test_ema_state_dict_round_trip(gen):
    q = VectorQuantizer(8, 2, ema=True)
    q(torch.randn(2, 2, 3, 3, generator=gen))
    assert set(q.state_dict()) == {"embedding.weight", "cluster_size", "embed_avg"}
    other = VectorQuantizer(8, 2, ema=True)
    other.load_state_dict(q.state_dict())
    for a, b in zip(other.state_dict().values(), q.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_key_is_shared_with_the_sparse_bottleneck():
    from lasers_ext import SparseDictBottleneck

    vq, dl = nn.Module(), nn.Module()
    vq.quantize, dl.quantize = VectorQuantizer(16, 4), SparseDictBottleneck(16, 4, sparsity=2)
    dl.load_state_dict(vq.state_dict())  # a VQ checkpoint warm-starts the dictionary
    assert torch.equal(dl.quantize.embedding.weight, vq.quantize.embedding.weight)


def test_ema_refuses_non_finite_latents_and_keeps_its_state(gen):
    """A NaN or Inf latent is refused with a clear error (as SparseDictBottleneck refuses it) and the codebook and
    EMA statistics stay as they were; the update itself also ignores such a batch (the path torch.compile takes,
    where the value check is skipped)."""
    q = VectorQuantizer(16, 4, ema=True).train()
    q(torch.randn(2, 4, 3, 3, generator=gen))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        z = torch.randn(2, 4, 3, 3, generator=gen)
        z[1, 2, 0, 1] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            q(z)
        sites = z.permute(0, 2, 3, 1).reshape(-1, 4)
        q._ema_update(sites, torch.zeros(len(sites), dtype=torch.long))
        for k, v in q.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed"
    q(torch.randn(2, 4, 3, 3, generator=gen))  # a finite batch still updates
    assert not torch.equal(q.embedding.weight, before["embedding.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("ema", [False, True])
def test_same_dtype_rules_as_the_sparse_bottleneck(gen, dtype, ema):
    """Half types are quantized in float32 and float64 in float64, with outputs in z's dtype, like
    SparseDictBottleneck; the codes equal those of the same values given in the compute dtype."""
    q = VectorQuantizer(32, 4, ema=ema).eval()
    with torch.no_grad():
        q.embedding.weight.normal_(generator=gen)
    z = torch.randn(2, 4, 5, 5, generator=gen).to(dtype)
    z_q, loss, info = q(z)
    assert z_q.dtype == dtype and loss.dtype == dtype and info.coeffs.dtype == dtype
    _, _, ref = q(z.to(torch.float64 if dtype == torch.float64 else torch.float32))
    assert torch.equal(info.indices, ref.indices)
    if dtype == torch.float64 and not ema:
        z64 = z.clone().requires_grad_()
        q.train()(z64)[1].backward()
        assert z64.grad.dtype == torch.float64 and q.embedding.weight.grad is not None


@pytest.mark.parametrize("ema", [False, True])
def test_coherence_in_eval_mode_only(gen, ema):
    """Training steps skip the K x K coherence (None); eval mode reports max_{i != j} |cos(e_i, e_j)|, restated in
    float64 from the codebook."""
    q = VectorQuantizer(16, 3, ema=ema)
    with torch.no_grad():
        q.embedding.weight.normal_(generator=gen)
    z = torch.randn(2, 3, 4, 4, generator=gen)
    assert q.train()(z)[2].coherence is None
    w = torch.nn.functional.normalize(q.embedding.weight.detach().double(), dim=1)
    cos = (w @ w.T).abs().fill_diagonal_(0)
    assert q.eval()(z)[2].coherence.item() == pytest.approx(cos.max().item(), rel=1e-5)
