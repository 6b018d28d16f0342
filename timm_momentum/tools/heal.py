"""Healing a converted model: at gamma > 0 a Momentum ResNet computes another function than its source ResNet.
BatchNorm recalibration and distillation from the source (gamma = 0) on unlabeled images bring it back toward
the source (measured in ``convert/HEALING.md``).
"""
from pathlib import Path
from typing import Optional

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
            lr: float = 1e-4, batch_size: int = 64, temperature: float = 1.0, seed: int = 0,
            eval_norms: bool = True, device: Optional[torch.device] = None) -> nn.Module:
    """Train ``student`` for ``steps`` batches (drawn from ``images`` with replacement, by ``seed``) toward
    ``teacher``'s logits, by the KL alone, with AdamW at ``lr``: fine-tuning's own loop (``loop.train_one_epoch``
    with a ``loop.Distillation``), on ``device`` (default: the student's).

    The teacher is frozen (eval mode, no gradients). With ``eval_norms`` the student's BatchNorm layers stay in eval
    mode too, so it learns the function it will compute at inference and recalibrated statistics are not
    overwritten by noisy batch statistics. Measured in ``convert/HEALING.md``: after BatchNorm recalibration this
    brings the converted net closest to its source. Returns the student, in eval mode.
    """
    from .loop import Distillation, Teacher, train_one_epoch

    if steps < 0:
        raise ValueError(f'distillation steps must be >= 0, got {steps}')
    device = device or next(student.parameters()).device
    if steps:
        data = torch.utils.data.TensorDataset(images, torch.zeros(len(images), dtype=torch.long))  # no labels
        sampler = torch.utils.data.RandomSampler(data, replacement=True, num_samples=steps * batch_size,
                                                 generator=torch.Generator().manual_seed(seed))
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler)
        optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
        settings = {'grad_accum_steps': 1, 'clip_grad': None, 'channels_last': False, 'batch_size': batch_size,
                    'progress': False, 'dataset': 'healing images', 'data_dir': None, 'train_split': 'train'}
        train_one_epoch(0, student, student, loader, optimizer, None, settings, device, None,
                        distillation=Distillation(Teacher(teacher, device, 'the source'), 1.0, temperature,
                                                  eval_norms), labeled=False)
    return student.eval()


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
