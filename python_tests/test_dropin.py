"""Drop-in: models built the way taming's and diffusers' VQModel call their quantizer, only the class swapped."""

import pytest
import torch
from torch import nn

from lasers_ext import SparseDictBottleneck, VectorQuantizer


class TamingStyleVQModel(nn.Module):
    """The quantizer calls of taming.models.vqgan.VQModel (encode/decode/decode_code/forward), tiny conv stacks."""

    def __init__(self, quantizer_cls, n_embed=32, embed_dim=8, z_channels=16):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, z_channels, 3, 2, 1), nn.SiLU(),
                                     nn.Conv2d(z_channels, z_channels, 3, 1, 1))
        self.decoder = nn.Sequential(nn.Conv2d(z_channels, z_channels, 3, 1, 1), nn.SiLU(),
                                     nn.ConvTranspose2d(z_channels, 1, 4, 2, 1))
        self.quantize = quantizer_cls(n_embed, embed_dim, beta=0.25, remap=None, sane_index_shape=False)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x):
        h = self.encoder(x)
        h = self.quant_conv(h)
        quant, emb_loss, info = self.quantize(h)
        return quant, emb_loss, info

    def decode(self, quant):
        quant = self.post_quant_conv(quant)
        return self.decoder(quant)

    def decode_code(self, code_b):
        quant_b = self.quantize.embed_code(code_b)
        return self.decode(quant_b)

    def forward(self, input):
        quant, diff, _ = self.encode(input)
        dec = self.decode(quant)
        return dec, diff


class DiffusersStyleVQModel(TamingStyleVQModel):
    """diffusers.VQModel: VectorQuantizer(num_vq_embeddings, vq_embed_dim, beta=0.25, remap=None,
    sane_index_shape=False), quantization inside decode, get_codebook_entry(indices, shape) for indices."""

    def __init__(self, quantizer_cls, num_vq_embeddings=32, vq_embed_dim=8, z_channels=16):
        super().__init__(quantizer_cls, num_vq_embeddings, vq_embed_dim, z_channels)

    def decode(self, h, force_not_quantize=False):
        quant, commit_loss, _ = (h, torch.zeros((), device=h.device), None) if force_not_quantize else self.quantize(h)
        return self.decoder(self.post_quant_conv(quant)), commit_loss

    def forward(self, sample):
        h = self.quant_conv(self.encoder(sample))
        dec, commit_loss = self.decode(h)
        return dec, commit_loss


def images(gen, n=32):
    from sklearn.datasets import load_digits

    digits = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 8 - 1  # [-1, 1], 8x8
    return digits


@pytest.mark.parametrize("model_cls", [TamingStyleVQModel, DiffusersStyleVQModel])
@pytest.mark.parametrize("quantizer", [VectorQuantizer, SparseDictBottleneck])
def test_trains_with_only_the_quantizer_swapped(gen, model_cls, quantizer):
    torch.manual_seed(0)
    model = model_cls(quantizer)
    x = images(gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        xrec, qloss = model(x)
        loss = (xrec - x).abs().mean() + qloss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::10]
    assert model.quantize.embedding.weight.grad is not None  # learned through the caller's optimizer


def test_decode_from_indices_taming_and_diffusers_style(gen):
    x = images(gen, 4)
    model = TamingStyleVQModel(lambda *a, **k: SparseDictBottleneck(*a, sparsity=1, **k))
    quant, _, (_, _, indices) = model.encode(x)
    shape = (x.shape[0], quant.shape[2], quant.shape[3], quant.shape[1])
    torch.testing.assert_close(model.quantize.get_codebook_entry(indices, shape).abs(),
                               quant.detach().abs() / quant.detach().norm(dim=1, keepdim=True).clamp_min(1e-12))
    # with S > 1 the coefficients travel with the indices on info
    model = TamingStyleVQModel(SparseDictBottleneck)
    quant, _, info = model.encode(x)
    torch.testing.assert_close(model.quantize.get_codebook_entry(info[2], shape, info.coeffs), quant.detach())
