"""Healing a converted model: at gamma > 0 a Momentum ResNet computes another function than its source ResNet.
BatchNorm recalibration and distillation from the source (gamma = 0) on unlabeled images bring it back toward
the source (measured in ``convert/HEALING.md``).
"""
from pathlib import Path

import torch
import torch.nn as nn

from .data import FASHION_MNIST, DigitsDataset, FashionMNIST
from .errors import ConfigError, ConversionError, first_line

__all__ = ['recalibrate_batchnorm', 'distill', 'load_images', 'HELD_OUT_SPLITS']

# image sources with a split that training never sees: healing takes 'train', drift is measured on 'validation'
HELD_OUT_SPLITS = ('sklearn/digits', FASHION_MNIST)


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """Re-estimate BatchNorm running statistics of ``model`` on unlabeled ``images`` (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


def distill(student: nn.Module, teacher: nn.Module, images: torch.Tensor, steps: int = 100,
            lr: float = 1e-4, batch_size: int = 64, temperature: float = 1.0, seed: int = 0) -> nn.Module:
    """Train ``student`` to match ``teacher``'s logits (KL divergence) on unlabeled ``images``.

    Both run in eval mode: norm layers use (and keep) their running statistics, so the student learns
    the function it will compute at inference, and recalibrated statistics are not overwritten by
    noisy batch statistics. Measured in ``convert/HEALING.md``: after BatchNorm recalibration this
    brings the converted net closest to its source.
    """
    if steps < 0:
        raise ValueError(f'distillation steps must be >= 0, got {steps}')
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    teacher.eval()
    student.eval()
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        with torch.no_grad():
            target = nn.functional.log_softmax(teacher(batch) / temperature, -1)
        loss = nn.functional.kl_div(nn.functional.log_softmax(student(batch) / temperature, -1), target,
                                    log_target=True, reduction='batchmean')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return student


def load_images(spec: str, in_chans: int = 3, img_size: int = 224, limit: int = 1024,
                split: str = 'train', role: str = 'healing images') -> torch.Tensor:
    """Unlabeled images for healing or evaluation: ``sklearn/digits`` or ``torch/fashion_mnist`` (from its default
    folder; their ``split``) or a folder of images (resized, normalised), at most ``limit`` of them. ``role``
    names them in errors."""
    try:
        if spec == 'sklearn/digits':
            return DigitsDataset(split, None, img_size, in_chans).images[:limit]
        if spec == FASHION_MNIST:
            return FashionMNIST(split, None, None, img_size, in_chans, limit=limit).batch(slice(None))
    except ConfigError as e:
        raise ConversionError(f'{role} {spec}: {e}') from None
    if not Path(spec).is_dir():
        raise ConversionError(f'{role} {spec}: not sklearn/digits, {FASHION_MNIST} or a folder of images')
    from timm.data import create_dataset, create_transform
    try:
        dataset = create_dataset('', root=spec, transform=create_transform((in_chans, img_size, img_size)))
    except RuntimeError as e:  # timm refuses a folder without images
        raise ConversionError(f'{role} {spec}: no images found ({first_line(e)})') from None
    if len(dataset) == 0:
        raise ConversionError(f'{role} {spec}: no images found')
    return torch.stack([dataset[i][0] for i in range(min(len(dataset), limit))])
