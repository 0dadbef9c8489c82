"""The paper's four models: DL-VAE / VQ-VAE autoencoders and their DL-GAN / VQ-GAN variants (section 3.4, section 5).

Encoder and decoder follow the van den Oord et al. (2017) VQ-VAE architecture the paper cites as [48] (two 4x4 stride-2
convolutions, residual blocks of ReLU, 3x3 conv, ReLU, 1x1 conv, 128 hidden units); the bottleneck is either
:class:`~lasers_ext.SparseDictBottleneck` ("dl") or :class:`~lasers_ext.VectorQuantizer` with EMA updates ("vq").
The GAN variants add a PatchGAN discriminator trained with the hinge loss and weighted by the adaptive weight of
eq. 16, as in taming-transformers' VQ-GAN. All tensors are channels-first (B, C, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bottleneck import SparseDictBottleneck
from .quantizer import QuantizerInfo
from .vq import VectorQuantizer

__all__ = ["ResidualBlock", "Encoder", "Decoder", "Autoencoder", "build_autoencoder", "PatchDiscriminator",
           "hinge_d_loss", "generator_hinge_loss", "adaptive_gan_weight", "ReconstructionLoss", "GANLoss"]

DOWNSAMPLE = 4  # the encoder's spatial reduction: two stride-2 convolutions


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_sizes(hidden: int, res_hidden: int, n_res_blocks: int, **channels: int) -> None:
    _check_positive(hidden=hidden, res_hidden=res_hidden, **channels)
    if hidden % 2:
        raise ValueError(f"hidden must be even (the first/last layer has hidden/2 channels), got {hidden}")
    if isinstance(n_res_blocks, bool) or not isinstance(n_res_blocks, int) or n_res_blocks < 0:
        raise ValueError(f"n_res_blocks must be a non-negative int, got {n_res_blocks!r}")


def _residual_stack(channels: int, hidden: int, n_blocks: int) -> list[nn.Module]:
    """``n_blocks`` residual blocks and the closing ReLU (Sonnet's ResidualStack)."""
    return [*(ResidualBlock(channels, hidden) for _ in range(n_blocks)), nn.ReLU()]


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): (B, channels, H, W) -> same shape; ``hidden`` channels inside."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        _check_positive(channels=channels, hidden=hidden)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(hidden, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> latents (B, embed_dim, H/4, W/4), any float dtype of the weights.

    conv4x4/2 (hidden/2), ReLU, conv4x4/2 (hidden), ReLU, conv3x3 (hidden), ``n_res_blocks`` residual blocks, ReLU,
    and a 1x1 convolution into the bottleneck's ``embed_dim`` channels. H and W should be multiples of 4.
    """

    def __init__(self, in_channels: int = 3, hidden: int = 128, res_hidden: int = 32, n_res_blocks: int = 2,
                 embed_dim: int = 16) -> None:
        super().__init__()
        _check_sizes(hidden, res_hidden, n_res_blocks, in_channels=in_channels, embed_dim=embed_dim)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            *_residual_stack(hidden, res_hidden, n_res_blocks),
            nn.Conv2d(hidden, embed_dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Latents (B, embed_dim, h, w) -> images (B, out_channels, 4h, 4w).

    conv3x3 (hidden), ``n_res_blocks`` residual blocks, ReLU, convT4x4/2 (hidden/2), ReLU, convT4x4/2 (out_channels).
    The output is linear (no tanh): the training maps images to [-1, 1] and the MSE pulls the output there, while a
    tanh would saturate the gradient at the extremes. Clamp to [-1, 1] for display or metrics.
    """

    def __init__(self, out_channels: int = 3, hidden: int = 128, res_hidden: int = 32, n_res_blocks: int = 2,
                 embed_dim: int = 16) -> None:
        super().__init__()
        _check_sizes(hidden, res_hidden, n_res_blocks, out_channels=out_channels, embed_dim=embed_dim)
        self.net = nn.Sequential(
            nn.Conv2d(embed_dim, hidden, 3, padding=1),
            *_residual_stack(hidden, res_hidden, n_res_blocks),
            nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(hidden // 2, out_channels, 4, stride=2, padding=1),
        )

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight (hidden/2, out_channels, 4, 4) of the final transposed convolution: G_L of eq. 16."""
        return self.net[-1].weight

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class Autoencoder(nn.Module):
    """Encoder -> bottleneck -> decoder; ``kind`` is "dl" (SparseDictBottleneck), "vq" (VectorQuantizer) or the
    ``kind`` of another bottleneck with their contract.

    The latent width ``embed_dim`` is ``bottleneck.e_dim``. Images are (B, in_channels, H, W) with H and W multiples
    of 4 (times the DL bottleneck's patch size); the reconstruction has the same shape.
    """

    def __init__(self, bottleneck: nn.Module, in_channels: int = 3, hidden: int = 128, res_hidden: int = 32,
                 n_res_blocks: int = 2) -> None:
        super().__init__()
        if isinstance(bottleneck, SparseDictBottleneck):
            self.kind = "dl"
        elif isinstance(bottleneck, VectorQuantizer):
            self.kind = "vq"
        elif isinstance(bottleneck, nn.Module) and isinstance(getattr(bottleneck, "kind", None), str) \
                and isinstance(getattr(bottleneck, "e_dim", None), int):
            self.kind = bottleneck.kind  # another quantizer with the same contract (e.g. the training tool's peers)
        else:
            raise TypeError(f"bottleneck must be a SparseDictBottleneck, a VectorQuantizer or a module with their "
                            f"contract (a str `kind` and an int `e_dim`), got {type(bottleneck).__name__}")
        self.in_channels = in_channels
        embed_dim = bottleneck.e_dim
        self.encoder = Encoder(in_channels, hidden, res_hidden, n_res_blocks, embed_dim)
        self.bottleneck = bottleneck
        self.decoder = Decoder(in_channels, hidden, res_hidden, n_res_blocks, embed_dim)
        patch = getattr(bottleneck, "patch_size", (1, 1))
        self.multiple = (DOWNSAMPLE * patch[0], DOWNSAMPLE * patch[1])

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, in_channels={self.in_channels}"

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight, for :func:`adaptive_gan_weight`."""
        return self.decoder.last_layer

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, QuantizerInfo]:
        """x (B, in_channels, H, W) -> (z_q (B, e_dim, H/4, W/4), bottleneck loss (0-dim), info
        (:class:`~lasers_ext.QuantizerInfo`: ``.perplexity``, ``.indices``, ...))."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.multiple[0] or x.shape[3] % self.multiple[1]:
            raise ValueError(f"image height and width {tuple(x.shape[2:])} must be multiples of {self.multiple}")
        return self.bottleneck(self.encoder(x))

    def decode(self, z_q: Tensor) -> Tensor:
        """z_q (B, e_dim, h, w) -> reconstruction (B, in_channels, 4h, 4w), unbounded (see :class:`Decoder`)."""
        return self.decoder(z_q)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, QuantizerInfo]:
        """x (B, in_channels, H, W) -> (x_rec (B, in_channels, H, W), bottleneck loss (0-dim), info)."""
        z_q, q_loss, info = self.encode(x)
        return self.decode(z_q), q_loss, info


def build_autoencoder(kind: str, *, in_channels: int = 3, hidden: int = 128, res_hidden: int = 32,
                      n_res_blocks: int = 2, n_e: int = 512, e_dim: int = 16, sparsity: int = 5, beta: float = 0.25,
                      patch_size: int = 1, backend: str = "auto", ema_decay: float = 0.99,
                      dictionary_update: str = "gradient", coeff_bins: int | None = None,
                      coeff_quant: str = "uniform", legacy: bool = False, **dl_options) -> Autoencoder:
    """The paper's autoencoders: "dl" (DL-VAE: Batch-OMP bottleneck, ``sparsity`` atoms of a 512 x 16 dictionary,
    trained by gradients) or "vq" (VQ-VAE: nearest codeword, EMA codebook with decay ``ema_decay``).
    ``sparsity``, ``patch_size``, ``backend`` and ``dictionary_update`` ("gradient" or the paper's "online"
    block-coordinate-descent update), ``coeff_bins`` and ``coeff_quant`` (coefficient tokens for stage 2) apply to
    "dl" only, ``ema_decay`` to "vq" only. ``legacy=False`` (default) is the paper's loss weighting (equation 13:
    beta on the commitment term ||z - sg[z_hat]||^2); True is taming's (beta on the codebook/dictionary term).
    ``dl_options`` are further keyword options of :class:`SparseDictBottleneck` (``gradient``, ``init``,
    ``restart_window``, ``coeff_per_slot``, ...), for "dl" only."""
    if kind == "dl":
        bottleneck = SparseDictBottleneck(n_e, e_dim, beta, legacy=legacy, sparsity=sparsity, patch_size=patch_size,
                                          backend=backend, dictionary_update=dictionary_update,
                                          coeff_bins=coeff_bins, coeff_quant=coeff_quant, **dl_options)
    elif kind == "vq":
        if dl_options:
            raise ValueError(f"options {sorted(dl_options)} apply to the 'dl' bottleneck only")
        bottleneck = VectorQuantizer(n_e, e_dim, beta, legacy=legacy, ema=True, decay=ema_decay)
    else:
        raise ValueError(f"kind must be 'dl' or 'vq', got {kind!r}")
    return Autoencoder(bottleneck, in_channels, hidden, res_hidden, n_res_blocks)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming's NLayerDiscriminator): images (B, in_channels, H, W) -> patch logits
    (B, 1, H/2^n_layers - 2, W/2^n_layers - 2), e.g. (B, 1, 2, 2) for 32x32 and (B, 1, 6, 6) for 64x64 with
    n_layers=3. H and W must be at least 3 * 2^n_layers.

    conv4x4/2 + LeakyReLU(0.2); n_layers - 1 times conv4x4/2 + BatchNorm + LeakyReLU, doubling the channels up to
    8 * ndf; conv4x4/1 + BatchNorm + LeakyReLU; conv4x4/1 to one channel. Weights start as in taming (conv
    N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0). Under DDP the trainer converts the BatchNorm layers with
    ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, ndf=ndf, n_layers=n_layers)
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, padding=1))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """taming's ``weights_init``."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}"

    def forward(self, x: Tensor) -> Tensor:
        smallest = 3 * 2**self.n_layers
        if x.shape[-2] < smallest or x.shape[-1] < smallest:
            raise ValueError(f"images must be at least {smallest}x{smallest} for n_layers={self.n_layers}, "
                             f"got {tuple(x.shape[-2:])}")
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 0.5 (mean relu(1 - real) + mean relu(1 + fake)); logits of any shape -> 0-dim."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_hinge_loss(logits_fake: Tensor) -> Tensor:
    """Generator side of the hinge GAN: -mean(logits_fake) (0-dim)."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, delta: float = 1e-6,
                        max_weight: float = 1e4) -> Tensor:
    """lambda of eq. 16: ||d rec_loss / d last_layer|| / (||d g_loss / d last_layer|| + delta), clamped to
    [0, max_weight] and detached (0-dim, float32). Both losses must depend on ``last_layer`` through a live graph;
    the graph is kept (``retain_graph=True``) for the caller's backward."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(rec_grad.float()) / (torch.linalg.vector_norm(g_grad.float()) + delta)
    return weight.clamp(0.0, max_weight).detach()


class ReconstructionLoss(nn.Module):
    """l_recon for images x, x_rec (B, C, H, W) in [-1, 1] -> 0-dim.

    With a ``perceptual`` module (e.g. LPIPS: two images (B, C, H, W) in [0, 1] -> (B,) distances; the caller
    freezes it): eta * MSE + (1 - eta) * mean(perceptual((x + 1) / 2, (x_rec + 1) / 2)). Without one the loss is the
    plain MSE and ``eta`` is ignored.
    """

    def __init__(self, eta: float = 0.5, perceptual: nn.Module | None = None) -> None:
        super().__init__()
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.eta = float(eta)
        self.perceptual = perceptual
        self.uses_perceptual = perceptual is not None

    def extra_repr(self) -> str:
        return f"eta={self.eta}, uses_perceptual={self.uses_perceptual}"

    def forward(self, x: Tensor, x_rec: Tensor) -> Tensor:
        mse = F.mse_loss(x_rec, x)
        if self.perceptual is None:
            return mse
        distance = self.perceptual((x + 1) / 2, (x_rec + 1) / 2).mean()
        return self.eta * mse + (1 - self.eta) * distance


class GANLoss(nn.Module):
    """The adversarial half of DL-GAN / VQ-GAN (eqs. 14-16) with the hinge loss; owns the discriminator.

    One training step::

        x_rec, q_loss, info = model(x)
        rec = rec_loss_fn(x, x_rec)
        g_term, g_stats = gan.generator_loss(rec, x_rec, model.last_layer, step)
        (rec + q_loss + g_term).backward(); opt_g.step()           # g_term also leaves grads in D: zero them next
        opt_d.zero_grad()
        d_loss, d_stats = gan.discriminator_loss(x, x_rec, step)  # x_rec is detached inside
        d_loss.backward(); opt_d.step()

    Before ``disc_start`` steps the generator term is 0 (D is not run) and the discriminator loss is 0 times the
    hinge loss: still backward-able, so the loop above needs no branch; ``active(step)`` lets a trainer skip the
    discriminator step altogether. Stats are detached 0-dim tensors (no host synchronisation).
    """

    def __init__(self, discriminator: nn.Module, disc_start: int = 0, disc_weight: float = 1.0,
                 delta: float = 1e-6) -> None:
        super().__init__()
        if disc_start < 0 or disc_weight < 0 or delta <= 0:
            raise ValueError(f"need disc_start >= 0, disc_weight >= 0 and delta > 0, got {disc_start}, "
                             f"{disc_weight}, {delta}")
        self.discriminator = discriminator
        self.disc_start, self.disc_weight, self.delta = int(disc_start), float(disc_weight), float(delta)

    def extra_repr(self) -> str:
        return f"disc_start={self.disc_start}, disc_weight={self.disc_weight}, delta={self.delta}"

    def active(self, step: int) -> bool:
        """Whether the adversarial terms are on at global step ``step``."""
        return step >= self.disc_start

    def generator_loss(self, rec_loss: Tensor, x_rec: Tensor, last_layer: Tensor,
                       step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """g_term = disc_weight * lambda * (-mean D(x_rec)), lambda of eq. 16 from ``rec_loss`` and ``last_layer``.

        Returns (g_term 0-dim, {"g_loss": hinge generator loss, "gan_weight": disc_weight * lambda}). Under
        ``torch.no_grad`` (validation) lambda cannot be computed and is 0, as in taming.
        """
        zero = x_rec.new_zeros((), dtype=torch.float32)
        if not self.active(step):
            return zero, {"g_loss": zero, "gan_weight": zero}
        g_loss = generator_hinge_loss(self.discriminator(x_rec))
        if torch.is_grad_enabled():
            weight = self.disc_weight * adaptive_gan_weight(rec_loss, g_loss, last_layer, self.delta)
        else:
            weight = zero
        return weight * g_loss, {"g_loss": g_loss.detach(), "gan_weight": weight}

    def discriminator_loss(self, x: Tensor, x_rec: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge loss of D on real ``x`` and detached ``x_rec`` (0 before ``disc_start``).

        Returns (d_loss 0-dim, {"d_loss", "logits_real", "logits_fake"}: the loss and the mean logits)."""
        logits_real = self.discriminator(x)
        logits_fake = self.discriminator(x_rec.detach())
        factor = 1.0 if self.active(step) else 0.0
        d_loss = factor * hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}
