"""SparseDictBottleneck against taming-transformers' VectorQuantizer2 contract and the paper's equations."""

import math

import pytest
import torch
from torch import nn

from lasers_ext import SparseDictBottleneck, VectorQuantizer, batch_omp, sparse_decode
from lasers_ext.bottleneck import SparseCode
from lasers_ext.quantizer import usage_statistics


def latent(gen, b=2, c=4, h=6, w=4, dtype=torch.float32):
    return torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)


def sites_of(z):
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def test_constructor_positional_and_aliases():
    q = SparseDictBottleneck(64, 8, 0.5)
    assert (q.n_e, q.e_dim, q.beta, q.legacy, q.sane_index_shape) == (64, 8, 0.5, True, False)
    assert q.embedding.weight.shape == (64, 8)
    for kwargs in ({"n_embed": 64, "embedding_dim": 8}, {"num_embeddings": 64, "vq_embed_dim": 8},
                   {"n_e": 64, "vq_embed_dim": 8}):
        assert SparseDictBottleneck(**kwargs).embedding.weight.shape == (64, 8)
    with pytest.raises(TypeError, match="conflicts"):
        SparseDictBottleneck(64, 8, n_embed=32)
    with pytest.raises(TypeError, match="unexpected keyword argument 'codebook_size'"):
        SparseDictBottleneck(64, 8, codebook_size=3)
    with pytest.raises(ValueError, match="sparsity must be in"):
        SparseDictBottleneck(64, 4, sparsity=5)
    assert SparseDictBottleneck(64, 16).sparsity == 5  # the paper's default where it fits
    assert SparseDictBottleneck(64, 3).sparsity == 3  # small latents (e.g. LDM's vq-f4, embed_dim 3)
    with pytest.raises(ValueError, match="e_dim must be a positive int"):
        SparseDictBottleneck(64)
    with pytest.raises(NotImplementedError, match="remap"):
        SparseDictBottleneck(64, 8, remap="used.npy")


def test_meta_device_construction_and_repr():
    q = SparseDictBottleneck(512, 16, device="meta")
    assert q.embedding.weight.device.type == "meta"
    q = q.to_empty(device="cpu")
    q.reset_parameters()
    torch.testing.assert_close(q.embedding.weight.norm(dim=1), torch.ones(512))
    assert "n_e=512, e_dim=16, sparsity=5" in repr(q)


def test_state_dict_round_trip_and_vq_warm_start(gen):
    q = SparseDictBottleneck(32, 4, sparsity=2)
    model = nn.Module()
    model.quantize = q
    assert list(model.state_dict()) == ["quantize.embedding.weight"]
    other = SparseDictBottleneck(32, 4, sparsity=2)
    other.load_state_dict(q.state_dict())
    z = latent(gen)
    torch.testing.assert_close(other(z)[0], q(z)[0])
    # a taming VectorQuantizer checkpoint (uniform(-1/n_e, 1/n_e) codebook) loads and is used as unit atoms
    vq_weight = torch.empty(32, 4).uniform_(-1 / 32, 1 / 32, generator=gen)
    q.load_state_dict({"embedding.weight": vq_weight})
    torch.testing.assert_close(q.atoms(), vq_weight / vq_weight.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("sparsity", [1, 3])
@pytest.mark.parametrize("sane", [False, True])
def test_forward_layout_matches_taming(gen, sparsity, sane):
    q = SparseDictBottleneck(40, 4, sparsity=sparsity, sane_index_shape=sane)
    z = latent(gen)
    z_q, loss, info = q(z)
    assert z_q.shape == z.shape and z_q.dtype == z.dtype
    assert loss.dim() == 0
    perplexity, min_encodings, indices = info  # taming unpacks exactly three
    assert min_encodings is None and perplexity.dim() == 0
    n = 2 * 6 * 4
    expected = {(False, 1): (n,), (False, 3): (n, 3), (True, 1): (2, 6, 4), (True, 3): (2, 6, 4, 3)}[(sane, sparsity)]
    assert indices.shape == expected and info.coeffs.shape == expected and indices.dtype == torch.int64


@pytest.mark.parametrize("legacy", [True, False])
def test_values_and_loss_follow_the_paper(gen, legacy):
    q = SparseDictBottleneck(40, 4, beta=0.3, sparsity=3, legacy=legacy)
    z = latent(gen)
    z_q, loss, info = q(z)
    codes = batch_omp(sites_of(z), q.atoms().detach(), 3)
    z_hat = sparse_decode(*codes, q.atoms().detach())
    assert torch.equal(info[2], codes.indices)
    torch.testing.assert_close(sites_of(z_q), z_hat)
    mse = ((z_hat - sites_of(z)) ** 2).mean()
    # both terms have the value ||z - z_hat||^2; legacy decides which one beta weighs, so the value is (1 + beta) mse
    torch.testing.assert_close(loss, (1 + 0.3) * mse)


@pytest.mark.parametrize("legacy", [True, False])
def test_gradients_straight_through_and_dictionary(gen, legacy):
    beta = 0.3
    q = SparseDictBottleneck(40, 4, beta=beta, sparsity=3, legacy=legacy)
    z = latent(gen, dtype=torch.float64).requires_grad_()
    q.double()
    z_q, loss, info = q(z)
    g = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    (gz,) = torch.autograd.grad((z_q * g).sum(), z)
    torch.testing.assert_close(gz, g)  # straight-through: identity
    gz, gw = torch.autograd.grad(loss, (z, q.embedding.weight))
    # oracle: the paper's loss written with explicit stop-gradients and the codes held fixed
    w = q.embedding.weight.detach().clone().requires_grad_()
    zz = z.detach().clone().requires_grad_()
    atoms = w / w.norm(dim=1, keepdim=True)
    idx, coef = batch_omp(sites_of(zz).detach(), atoms.detach(), 3)
    z_hat = sparse_decode(idx, coef, atoms)
    codebook, commit = ((z_hat - sites_of(zz).detach()) ** 2).mean(), ((z_hat.detach() - sites_of(zz)) ** 2).mean()
    ref = commit + beta * codebook if legacy else beta * commit + codebook
    ez, ew = torch.autograd.grad(ref, (zz, w))
    torch.testing.assert_close(gz, ez)
    torch.testing.assert_close(gw, ew)


def test_exact_gradient_gradcheck(gen):
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    atoms = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    atoms = (atoms / atoms.norm(dim=1, keepdim=True)).requires_grad_()
    # small perturbations keep the support, where the least-squares fit is smooth
    def code_and_decode(x, a):  # the codes are recomputed at every perturbed input: their gradient is the backward's
        return SparseCode.apply(x, a, *batch_omp(x.detach(), a.detach(), 3), True)

    assert torch.autograd.gradcheck(code_and_decode, (x, atoms))


def test_exact_gradient_is_a_projection(gen):
    q = SparseDictBottleneck(40, 4, sparsity=2, exact_gradient=True).double()
    z = latent(gen, dtype=torch.float64).requires_grad_()
    z_q, _, info = q(z)
    g = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    (gz,) = torch.autograd.grad((z_q * g).sum(), z)
    idx = info[2]
    atoms = q.atoms().detach()
    for n, (site_g, site_grad) in enumerate(zip(sites_of(g), sites_of(gz))):
        basis = atoms[idx[n]].T  # (M, S)
        proj = basis @ torch.linalg.solve(basis.T @ basis, basis.T @ site_g)
        torch.testing.assert_close(site_grad, proj)


def test_sparsity_one_is_nearest_atom_by_abs_correlation(gen):
    q = SparseDictBottleneck(50, 6, sparsity=1)
    z = latent(gen, c=6)
    z_q, _, (_, _, idx) = q(z)
    corr = sites_of(z) @ q.atoms().detach().T
    assert torch.equal(idx, corr.abs().argmax(1))
    torch.testing.assert_close(sites_of(z_q), corr.gather(1, idx[:, None]) * q.atoms().detach()[idx])


def test_patch_coding_codes_unfolded_patches(gen):
    q = SparseDictBottleneck(64, 3, sparsity=4, patch_size=(2, 3), sane_index_shape=True)
    assert q.embedding.weight.shape == (64, 2 * 3 * 3)
    z = latent(gen, b=2, c=3, h=4, w=6)
    z_q, _, info = q(z)
    assert info[2].shape == (2, 2, 2, 4)
    # independent unfolding: patch (i, j) of image b, entries ordered (row in patch, column in patch, channel)
    patches = torch.stack([z[b, :, 2 * i:2 * i + 2, 3 * j:3 * j + 3].permute(1, 2, 0).reshape(-1)
                           for b in range(2) for i in range(2) for j in range(2)])
    codes = batch_omp(patches, q.atoms().detach(), 4)
    assert torch.equal(info[2].reshape(-1, 4), codes.indices)
    rec = sparse_decode(*codes, q.atoms().detach())
    for k, (b, i, j) in enumerate((b, i, j) for b in range(2) for i in range(2) for j in range(2)):
        patch = z_q[b, :, 2 * i:2 * i + 2, 3 * j:3 * j + 3]
        torch.testing.assert_close(patch, rec[k].reshape(2, 3, 3).permute(2, 0, 1))
    with pytest.raises(ValueError, match="divisible by the patch size"):
        q(latent(gen, c=3, h=5, w=6))


@pytest.mark.parametrize("sparsity,patch", [(1, 1), (3, 1), (4, 2)])
def test_get_codebook_entry_decodes_forward_codes(gen, sparsity, patch):
    q = SparseDictBottleneck(48, 4, sparsity=sparsity, patch_size=patch)
    z = latent(gen)
    z_q, _, info = q(z)
    shape = (z.shape[0], z.shape[2], z.shape[3], z.shape[1])  # taming's (B, H, W, C)
    torch.testing.assert_close(q.get_codebook_entry(info[2], shape, info.coeffs), z_q)
    torch.testing.assert_close(q.embed_code(info[2], shape, info.coeffs), z_q)
    if sparsity == 1:  # VQ-style decode without coefficients: the unit atoms themselves
        torch.testing.assert_close(q.get_codebook_entry(info[2], None), q.atoms().detach()[info[2]])
    else:
        with pytest.raises(ValueError, match="coeffs are required"):
            q.get_codebook_entry(info[2], shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_and_autocast(gen, dtype):
    q = SparseDictBottleneck(40, 4, sparsity=3)
    z = latent(gen, dtype=dtype)
    z_q, loss, info = q(z)
    assert z_q.dtype == dtype and loss.dtype == dtype and info.coeffs.dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q2, _, _ = q(latent(gen))
    assert z_q2.dtype == torch.float32 and torch.isfinite(z_q2).all()


def test_degenerate_inputs_give_no_nan(gen):
    q = SparseDictBottleneck(16, 4, sparsity=4)
    with torch.no_grad():
        q.embedding.weight[8:] = q.embedding.weight[:8]  # duplicate atoms
        q.embedding.weight[7] = q.embedding.weight[6] + 1e-7  # near-duplicate
        q.embedding.weight[5] = 0  # zero atom
    z = latent(gen).requires_grad_()
    z_zero = torch.zeros(1, 4, 3, 3, requires_grad=True)
    for inp in (z, z_zero):
        z_q, loss, info = q(inp)
        (z_q.sum() + loss).backward()
        assert torch.isfinite(z_q).all() and torch.isfinite(loss) and torch.isfinite(inp.grad).all()
        assert torch.isfinite(q.embedding.weight.grad).all()
        assert torch.isfinite(info[0])


def test_taming_style_double_autograd_grad(gen):
    # taming's adaptive GAN weight calls autograd.grad twice on the same graph with retain_graph=True
    q = SparseDictBottleneck(32, 4, sparsity=2)
    conv = nn.Conv2d(4, 4, 1)
    z = conv(latent(gen))
    z_q, loss, _ = q(z)
    out = (z_q**2).sum() + loss
    g1 = torch.autograd.grad(out, conv.weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(out, conv.weight, retain_graph=True)[0]
    torch.testing.assert_close(g1, g2)
    out.backward()


def test_usage_statistics_against_numpy_formula(gen):
    idx = torch.tensor([[0, 2, -1], [2, 2, 1], [3, -1, -1]])
    coeffs = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.5, 4.0], [1.0, 0.0, 0.0]])
    atoms = torch.eye(5, 4)
    stats = usage_statistics(idx, coeffs, atoms)
    counts = [1, 1, 3, 1, 0]
    p = [c / 6 for c in counts if c]
    assert math.isclose(stats["perplexity"].item(), math.exp(-sum(pi * math.log(pi) for pi in p)), rel_tol=1e-5)
    weights = [1.0, 4.0, 3.0, 1.0]
    pw = [w / sum(weights) for w in weights]
    assert math.isclose(stats["weighted_perplexity"].item(), math.exp(-sum(pi * math.log(pi) for pi in pw)),
                        rel_tol=1e-5)
    assert stats["active_atoms"].item() == 4 and stats["dead_atoms"].item() == 1
    assert stats["coherence"].item() == pytest.approx(0.0)  # eye(5, 4): orthonormal rows and one zero row
    pair = torch.tensor([[0, 1]]), torch.ones(1, 2)
    assert usage_statistics(*pair, torch.tensor([[1.0, 0], [-0.6, 0.8]]))["coherence"].item() == pytest.approx(0.6)


def test_perplexity_matches_taming_for_sparsity_one(gen):
    q = SparseDictBottleneck(30, 4, sparsity=1)
    z = latent(gen)
    _, _, (perplexity, _, idx) = q(z)
    one_hot = torch.zeros(idx.shape[0], 30).scatter_(1, idx[:, None], 1)  # taming's min_encodings
    e_mean = one_hot.mean(0)
    torch.testing.assert_close(perplexity, torch.exp(-torch.sum(e_mean * torch.log(e_mean + 1e-10))))


def test_torch_compile_fullgraph(gen):
    q = SparseDictBottleneck(32, 4, sparsity=3)
    z = latent(gen)

    def step(z):
        z_q, loss, info = q(z)
        return z_q, loss, info[0], info[2], info.coeffs, info.active_atoms

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for got, want in zip(compiled(z), step(z)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("exact", [False, True])
def test_torch_compile_training_step_matches_eager(gen, exact):
    q = SparseDictBottleneck(32, 4, sparsity=3, exact_gradient=exact).double()
    conv = nn.Conv2d(4, 4, 1).double()
    z = latent(gen, dtype=torch.float64)

    def step(z):
        z_q, loss, info = q(conv(z))
        return (z_q**2).mean() + loss + 0 * info.coherence

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for f in (step, compiled):
        params = [conv.weight, q.embedding.weight]
        grads.append(torch.autograd.grad(f(z), params))
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager)


@pytest.mark.parametrize("cls", ["SparseDictBottleneck", "VectorQuantizer"])
def test_forward_argument_errors(cls):
    import lasers_ext

    q = getattr(lasers_ext, cls)(16, 4)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 4, H, W\)"):
        q(torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        q(torch.ones(2, 4, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        q([[1.0]])
    with pytest.raises(ValueError, match="GumbelQuantize"):
        q(torch.randn(2, 4, 4, 4), temp=0.5)


# ---- API details (issue 11) -----------------------------------------------------------------------------------------
def test_quantizer_info_deep_copies_and_pickles(gen):
    import copy
    import pickle

    for q in (SparseDictBottleneck(16, 4, sparsity=2), VectorQuantizer(16, 4)):
        _, _, info = q(torch.randn(2, 4, 3, 3, generator=gen))
        for clone in (copy.deepcopy(info), pickle.loads(pickle.dumps(info))):
            assert type(clone) is type(info) and len(clone) == 3 and clone[1] is None
            assert torch.equal(clone[2], info[2]) and torch.equal(clone.indices, info.indices)
            assert torch.equal(clone.coeffs, info.coeffs) and torch.equal(clone.perplexity, info.perplexity)
            assert clone.active_atoms == info.active_atoms


@pytest.mark.parametrize("kwargs", [dict(tol=-1.0), dict(tol=float("nan")), dict(backend="gpu"), dict(beta="x"),
                                    dict(beta=-0.1), dict(beta=float("inf")), dict(legacy="yes")])
def test_constructor_arguments_are_checked_when_built(kwargs):
    with pytest.raises((ValueError, TypeError)):
        SparseDictBottleneck(16, 4, **kwargs)
    if "tol" not in kwargs and "backend" not in kwargs:
        with pytest.raises((ValueError, TypeError)):
            VectorQuantizer(16, 4, **kwargs)


def test_get_codebook_entry_layouts_follow_taming(gen):
    """shape=None: one decoded latent per site in the indices' own layout (taming's indices.shape + (C,), the S
    dimension of sparse codes excluded); a shape that does not hold the codes is a clear error."""
    q = SparseDictBottleneck(16, 4, sparsity=2, sane_index_shape=True)
    z = torch.randn(2, 4, 3, 5, generator=gen)
    z_q, _, info = q.eval()(z)
    assert info.indices.shape == (2, 3, 5, 2)
    sites = q.get_codebook_entry(info.indices, None, info.coeffs)
    assert sites.shape == (2, 3, 5, 4)
    torch.testing.assert_close(sites.permute(0, 3, 1, 2), z_q)
    torch.testing.assert_close(q.get_codebook_entry(info.indices, (2, 3, 5, 4), info.coeffs), z_q)
    with pytest.raises(ValueError, match="coded sites"):
        q.get_codebook_entry(info.indices, (1, 3, 5, 4), info.coeffs)
    with pytest.raises(ValueError, match="same shape"):
        q.get_codebook_entry(info.indices, None, info.coeffs[..., :1])
    vq = VectorQuantizer(16, 4, sane_index_shape=True)
    z_q, _, info = vq.eval()(z)
    assert vq.get_codebook_entry(info.indices, None).shape == (2, 3, 5, 4)
    torch.testing.assert_close(vq.get_codebook_entry(info.indices, (2, 3, 5, 4)), z_q)
    with pytest.raises(ValueError, match="B\\*H\\*W"):
        vq.get_codebook_entry(info.indices, (2, 3, 3, 4))


@pytest.mark.parametrize("patch", [1, 2])
def test_latent_is_channels_first_contiguous(gen, patch):
    """A permuted view here made the decoder's convolution backward copy and slow the DL-GAN step by 1.2x."""
    q = SparseDictBottleneck(40, 4, sparsity=2, patch_size=patch)
    z_q, _, info = q(latent(gen))
    assert z_q.is_contiguous()
    assert q.get_codebook_entry(info.atom_indices, (2, 6, 4, 4), info.coeffs).is_contiguous()
