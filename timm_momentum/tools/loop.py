"""One pass of training and one of evaluation, shared by fine-tuning (``finetune``) and healing (``heal``, and
through it ``convert --distill-steps``): the label loss, distillation from a frozen teacher (the KL divergence
to its logits), or a mix of the two.

``train_one_epoch`` runs whatever loader it is given, on any device, under AMP, wrapped in DDP or compiled;
``evaluate`` measures a model on a loader, against the labels and against a teacher, summed over every rank.
"""
import dataclasses
import math
import sys
import time
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import ConfigError, first_line

__all__ = ['Teacher', 'Distillation', 'teacher_dtype', 'kl_to_teacher', 'norms_to_eval', 'train_one_epoch',
           'evaluate', 'validate', 'batches', 'is_distributed', 'rank']


def is_distributed() -> bool:
    """Whether a process group is running (torchrun)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def teacher_dtype(device: torch.device) -> Optional[torch.dtype]:
    """What a teacher computes in on ``device``: bfloat16 on a CUDA GPU that has it, else full precision (None)."""
    if device.type == 'cuda' and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class Teacher:
    """A frozen model whose logits a student learns from: in eval mode (its norm layers use, and keep, their
    running statistics), without gradients (``requires_grad`` off, run under ``no_grad``), in bfloat16 on CUDA.

    Not an ``nn.Module``: it stays out of the student's parameters, state dict, optimiser and DDP wrapper.
    """

    def __init__(self, model: nn.Module, device: torch.device, description: str = 'the teacher') -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.dtype = teacher_dtype(device)
        self.description = description

    @property
    def num_classes(self) -> Optional[int]:
        """The number of classes the teacher predicts (timm models' ``num_classes``)."""
        return getattr(self.model, 'num_classes', None)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for ``x``, as float32."""
        self.model.eval()  # whatever a caller did to it: a teacher never updates its statistics
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                             enabled=self.dtype is not None):
            return self.model(x).float()


@dataclasses.dataclass
class Distillation:
    """Training toward a teacher: the loss is ``(1 - weight) * label loss + weight * kl_to_teacher``.

    ``weight`` 1 is the KL alone (the labels are not used, so images need none); ``eval_norms`` keeps the student's
    norm layers in eval mode while it trains, so that they use and keep their running statistics (healing after
    BatchNorm recalibration), where train mode re-estimates them from the batches.
    """
    teacher: Teacher
    weight: float = 1.0
    temperature: float = 1.0
    eval_norms: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 1:
            raise ValueError(f'distillation weight must be in [0, 1], got {self.weight}')
        if not self.temperature > 0:
            raise ValueError(f'distillation temperature must be > 0, got {self.temperature}')

    @property
    def uses_labels(self) -> bool:
        """Whether the loss has a label term."""
        return self.weight < 1


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  reduction: str = 'batchmean') -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times temperature² (Hinton et al. 2015),
    which keeps the gradients' scale as the temperature changes."""
    return nn.functional.kl_div((student_logits.float() / temperature).log_softmax(-1),
                                (teacher_logits.float() / temperature).log_softmax(-1), log_target=True,
                                reduction=reduction) * temperature ** 2


def norms_to_eval(model: nn.Module) -> None:
    """Put ``model``'s BatchNorm layers in eval mode (the rest stays as it is)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _progress(loader: Any, epoch: int, cfg: Dict[str, Any]) -> Any:
    if not cfg['progress'] or rank() != 0:
        return loader
    from tqdm import tqdm
    return tqdm(loader, desc=f'epoch {epoch}', leave=False, file=sys.stderr)


@dataclasses.dataclass
class _Tally:
    """Running sums of one pass: images, the losses, label hits and agreement with the teacher."""
    seen: int = 0
    loss: float = 0.0
    label_loss: float = 0.0
    kl: float = 0.0
    correct: int = 0
    agree: int = 0

    def add(self, count: int, loss: float, label_loss: float, kl: float, correct: int, agree: int) -> None:
        self.seen += count
        self.loss += loss * count
        self.label_loss += label_loss * count
        self.kl += kl * count
        self.correct += correct
        self.agree += agree

    def means(self, labeled: bool, distilling: bool) -> Dict[str, float]:
        n = max(self.seen, 1)
        out = {'loss': self.loss / n, 'acc': 100.0 * self.correct / n if labeled else math.nan, 'images': self.seen}
        if distilling:
            out.update(label_loss=self.label_loss / n if labeled else math.nan, kl=self.kl / n,
                       agreement=100.0 * self.agree / n)
        return out


def _losses(logits: torch.Tensor, target: Any, x: torch.Tensor, criterion: Optional[nn.Module],
            distillation: Optional[Distillation],
            labeled: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(loss, label loss, KL, teacher logits) of one batch. The label loss is computed wherever there are labels,
    for the record, even when its weight is 0; a term that is not computed is 0."""
    zero = logits.new_zeros(())
    if distillation is None:
        loss = criterion(logits.float(), target)
        return loss, loss, zero, None
    teacher_logits = distillation.teacher.logits(x)
    kl = kl_to_teacher(logits, teacher_logits, distillation.temperature)
    label_loss = criterion(logits.float(), target) if labeled and criterion is not None else zero
    if not distillation.uses_labels:
        return kl, label_loss, kl, teacher_logits
    return (1 - distillation.weight) * label_loss + distillation.weight * kl, label_loss, kl, teacher_logits


def _optimiser_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Dict[str, Any],
                    scaler: Any, update: bool) -> None:
    """Backward ``loss`` (scaled for accumulation) and, when ``update``, clip and step."""
    scaled = loss / cfg['grad_accum_steps']
    if scaler is not None:
        scaler(scaled, optimizer, clip_grad=cfg['clip_grad'], parameters=model.parameters(), need_update=update)
        return
    scaled.backward()
    if update:
        if cfg['clip_grad']:
            nn.utils.clip_grad_norm_(model.parameters(), cfg['clip_grad'])
        optimizer.step()


def _batch_error(e: Exception, cfg: Dict[str, Any], device: torch.device, count: int) -> Exception:
    """The error to raise for an out-of-memory step or a batch BatchNorm cannot normalise; ``e`` itself otherwise."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return RuntimeError(f"batch_size={cfg['batch_size']} does not fit on {device}: set memory_efficient: true, "
                            f"a smaller batch with grad_accum_steps, or --batch-size auto")
    if isinstance(e, ValueError) and 'Expected more than 1 value per channel when training' in str(e):
        return ConfigError(
            f"batch_size {cfg['batch_size']}: a batch of {count} image(s) leaves BatchNorm one value per channel "
            f"({first_line(e).split('got ')[-1]}), and in training BatchNorm normalises by the batch's own "
            f"variance, which needs two. Use batch_size >= 2 (the loader drops a short last batch, as "
            f"drop_last does) or a larger img_size")
    return e


def train_one_epoch(epoch: int, model: nn.Module, train_model: nn.Module, loader: Any,
                    optimizer: torch.optim.Optimizer, criterion: Optional[nn.Module], cfg: Dict[str, Any],
                    device: torch.device, amp: Optional[torch.dtype], scaler: Any = None, ema: Any = None,
                    mixup: Any = None, last_good: str = '', distillation: Optional[Distillation] = None,
                    labeled: bool = True) -> Dict[str, float]:
    """One pass over ``loader``: forward ``train_model`` (``model``, maybe wrapped in DDP or compiled), step the
    optimiser every ``grad_accum_steps`` batches, update the EMA. With ``distillation`` the loss mixes in the KL
    to its teacher. Returns the mean loss and accuracy (NaN unless ``labeled``) and the images seen; with
    ``distillation`` also the mean label loss, KL and top-1 agreement with the teacher (%).

    ``cfg`` gives grad_accum_steps, clip_grad, channels_last, batch_size, progress, and for error messages
    dataset, data_dir and train_split. A non-finite loss stops training with FloatingPointError; ``last_good``
    says where the last good checkpoint is.
    """
    model.train()
    if distillation is not None and distillation.eval_norms:
        norms_to_eval(model)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    tally, started = _Tally(), time.perf_counter()
    bar = _progress(loader, epoch, cfg)
    optimizer.zero_grad(set_to_none=True)
    for step, (x, y) in enumerate(batches(bar, cfg, cfg['train_split'])):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg['channels_last']:
            x = x.to(memory_format=torch.channels_last)
        target = y
        if mixup:
            x, target = mixup(x, y)
        try:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = train_model(x)
                loss, label_loss, kl, teacher_logits = _losses(logits, target, x, criterion, distillation, labeled)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch} step {step}; stopping. '
                                         f'{last_good}; lower lr or enable clip_grad.')
            update = (step + 1) % cfg['grad_accum_steps'] == 0 or step + 1 == len(loader)
            _optimiser_step(loss, model, optimizer, cfg, scaler, update)
            if update:
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
        except (torch.cuda.OutOfMemoryError, ValueError) as e:
            raise _batch_error(e, cfg, device, len(y)) from None
        predicted = logits.argmax(-1)
        tally.add(len(y), loss.item(), float(label_loss.detach()), float(kl.detach()), int((predicted == y).sum()),
                  int((predicted == teacher_logits.argmax(-1)).sum()) if teacher_logits is not None else 0)
        if hasattr(bar, 'set_postfix'):
            shown = tally.means(labeled, distillation is not None)
            bar.set_postfix(loss=f"{shown['loss']:.4f}", **({'acc': f"{shown['acc']:.2f}"} if labeled else {}),
                            **({'kl': f"{shown['kl']:.4f}"} if distillation is not None else {}),
                            img_s=f'{tally.seen / (time.perf_counter() - started):.1f}')
    return tally.means(labeled, distillation is not None)


def batches(loader: Any, cfg: Dict[str, Any], split: str) -> Iterator[Any]:
    """The batches of ``loader``; an image PIL refuses to open as a decompression bomb stops the run with a
    ConfigError saying so (in a worker process too), where it was a traceback."""
    from PIL import Image

    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Image.DecompressionBombError as e:  # the DataLoader re-raises a worker's error as its type
            reason = str(e).strip().splitlines()[-1].split('DecompressionBombError: ')[-1]
            raise ConfigError(f"dataset {cfg['dataset']!r} split {split!r} in {cfg['data_dir']} holds an image "
                              f"too large to open safely: {reason} Remove it, or raise PIL.Image.MAX_IMAGE_PIXELS "
                              f"if you trust it") from None
        yield batch


def evaluate(model: nn.Module, loader: Any, device: torch.device, amp: Optional[torch.dtype],
             cfg: Optional[Dict[str, Any]] = None, teacher: Optional[Teacher] = None, temperature: float = 1.0,
             labeled: bool = True) -> Dict[str, float]:
    """``model`` in eval mode on ``loader``, summed over every rank: the mean cross-entropy ('loss') and top-1
    accuracy in % ('acc'; both NaN unless ``labeled``), and with a ``teacher`` the mean KL to it ('kl', at
    ``temperature``) and top-1 agreement with it in % ('agreement')."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # images, cross-entropy, correct, KL, agreeing
    items = batches(loader, cfg, cfg['val_split']) if cfg is not None else loader
    with torch.no_grad():
        for x, y in items:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x).float()
            batch = [len(y), float(nn.functional.cross_entropy(logits, y, reduction='sum')) if labeled else 0.0,
                     int((logits.argmax(-1) == y).sum()), 0.0, 0]
            if teacher is not None:
                reference = teacher.logits(x)
                batch[3] = float(kl_to_teacher(logits, reference, temperature, reduction='sum'))
                batch[4] = int((logits.argmax(-1) == reference.argmax(-1)).sum())
            sums += torch.tensor(batch, dtype=torch.float64)
    if is_distributed():  # timm's reduce_tensor averages over the ranks; the ratios of the means are the same
        from timm.utils import reduce_tensor
        sums = reduce_tensor(sums.to(device), dist.get_world_size()).cpu()
    total, loss, correct, kl, agree = sums.tolist()
    if not total:
        return {'loss': 0.0, 'acc': 0.0, **({'kl': 0.0, 'agreement': 0.0} if teacher is not None else {})}
    out = {'loss': loss / total if labeled else math.nan, 'acc': 100.0 * correct / total if labeled else math.nan}
    if teacher is not None:
        out.update(kl=kl / total, agreement=100.0 * agree / total)
    return out


def validate(model: nn.Module, loader: Any, device: torch.device, amp: Optional[torch.dtype],
             cfg: Optional[Dict[str, Any]] = None) -> Tuple[float, float]:
    """The validation loss and top-1 accuracy (%) of ``model`` on ``loader``, summed over every rank."""
    result = evaluate(model, loader, device, amp, cfg)
    return result['loss'], result['acc']
