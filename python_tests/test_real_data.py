"""Real images: on scikit-learn's bundled 8x8 digits (no download), a small conv autoencoder with the
SparseDictBottleneck reconstructs held-out digits better than with VectorQuantizer at the same K and e_dim, and uses
its atoms more evenly (higher perplexity). Seeds are fixed: this is a training comparison, not a property test."""

import pytest
import torch
from torch import nn

from lasers_ext import SparseDictBottleneck, VectorQuantizer

K, E_DIM, STEPS = 32, 4, 300


def train_and_evaluate(quantizer, seed=0):
    """Adam 2e-3, batch 128, 300 steps on 1500 digits; returns (held-out MSE on 297 digits, perplexity)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    data = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8 - 1  # (1797, 1, 8, 8) in [-1, 1]
    train, test = data[:1500], data[1500:]
    enc = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.SiLU(), nn.Conv2d(32, E_DIM, 1))  # 4x4 latent
    dec = nn.Sequential(nn.Conv2d(E_DIM, 32, 1), nn.SiLU(), nn.ConvTranspose2d(32, 1, 4, 2, 1))
    params = [*enc.parameters(), *dec.parameters(), *quantizer.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        x = train[torch.randint(0, len(train), (128,), generator=g)]
        z_q, qloss, _ = quantizer(enc(x))
        loss = ((dec(z_q) - x) ** 2).mean() + qloss
        opt.zero_grad()
        loss.backward()
        opt.step()
    quantizer.eval()
    with torch.no_grad():
        z_q, _, (perplexity, _, _) = quantizer(enc(test))
        return ((dec(z_q) - test) ** 2).mean().item(), perplexity.item()


@pytest.fixture(scope="module")
def sparse_result():
    return train_and_evaluate(SparseDictBottleneck(K, E_DIM, sparsity=2))


@pytest.mark.parametrize("ema", [False, True], ids=["vq-gradient", "vq-ema"])
def test_sparse_bottleneck_beats_vq_on_digits(sparse_result, ema):
    vq_mse, vq_perplexity = train_and_evaluate(VectorQuantizer(K, E_DIM, ema=ema))
    dl_mse, dl_perplexity = sparse_result
    print(f"digits K={K} e_dim={E_DIM}: DL(S=2) mse={dl_mse:.4f} perplexity={dl_perplexity:.1f}; "
          f"VQ(ema={ema}) mse={vq_mse:.4f} perplexity={vq_perplexity:.1f}")
    assert dl_mse < 0.6 * vq_mse
    assert dl_perplexity > vq_perplexity
