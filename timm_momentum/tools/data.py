"""Where training data comes from: scikit-learn's digits, Fashion-MNIST from its idx files, timm's datasets
(folders, tar files, torchvision, Hugging Face), their transforms, and the loaders that batch them. Fine-tuning
and healing both read from here.
"""
import gzip
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .errors import ConfigError

__all__ = ['DigitsDataset', 'FashionMNIST', 'FASHION_MNIST', 'FASHION_MNIST_DIR', 'FASHION_MNIST_CLASSES',
           'find_fashion_mnist', 'build_datasets', 'build_loader', 'data_config_of', 'label_names']


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's handwritten digits (8x8, shipped with the package), upsampled, with a class subset.

    Classes are relabelled 0..len(classes)-1; ``split`` is a deterministic stratified 80/20 train/test split.
    ``per_class`` keeps that many training images of each class, drawn by ``seed`` (few-shot); the test
    split is never subsampled. ``limit`` keeps the split's first N images (before the few-shot draw). Pixels are
    normalised with mean 0.5 and std 0.5 (``mean``, ``std``).
    """

    mean = std = 0.5

    def __init__(self, split: str = 'train', classes: Optional[Sequence[int]] = None, img_size: int = 32,
                 in_chans: int = 3, per_class: Optional[int] = None, seed: int = 0,
                 limit: Optional[int] = None) -> None:
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError:
            raise ConfigError('the sklearn/digits dataset needs scikit-learn: pip install "timm-momentum[train]"') from None

        if split not in ('train', 'validation', 'test'):
            raise ConfigError(f"digits split must be 'train' or 'validation', got {split!r}")
        digits = load_digits()
        classes = list(range(10)) if classes is None else [int(c) for c in classes]
        keep = np.isin(digits.target, classes)
        images, labels = digits.images[keep] / 16.0, digits.target[keep]
        train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0,
                                               stratify=labels)
        idx = (train_idx if split == 'train' else test_idx)[:limit]
        if per_class is not None and split == 'train':
            idx = _draw_per_class(idx, labels[idx], per_class, seed, 'digit')
        x = torch.tensor(images[idx], dtype=torch.float32).unsqueeze(1)
        x = nn.functional.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False)
        self.images = ((x - self.mean) / self.std).expand(-1, in_chans, -1, -1).contiguous()
        remap = {c: i for i, c in enumerate(classes)}
        self.targets = torch.tensor([remap[int(t)] for t in labels[idx]])
        self.classes = [str(c) for c in classes]
        self.num_classes = len(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


def _draw_per_class(idx: np.ndarray, labels: np.ndarray, per_class: int, seed: int,
                    noun: str = 'class') -> np.ndarray:
    """``per_class`` entries of ``idx`` for each label, drawn by ``seed``, in their original order."""
    rng = np.random.default_rng(seed)
    kept = []
    for label in np.unique(labels):
        of_label = idx[labels == label]
        if len(of_label) < per_class:
            raise ConfigError(f'train_per_class={per_class}, but {noun} {label} has only {len(of_label)} '
                              f'training images')
        kept.append(rng.choice(of_label, per_class, replace=False))
    return np.sort(np.concatenate(kept))


FASHION_MNIST = 'torch/fashion_mnist'  # timm's name for it
FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')  # where `apt-get install dataset-fashion-mnist` puts it
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
_FASHION_MNIST_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                        'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
# the training images' mean and standard deviation (of pixel / 255), as torchvision's references use them
_FASHION_MNIST_MEAN, _FASHION_MNIST_STD = 0.2860, 0.3530


def _idx_file(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + '.gz', stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(data_dir: Optional[Union[str, Path]] = None) -> Path:
    """The folder that holds Fashion-MNIST's four idx files: ``data_dir`` itself or, as torchvision lays it out,
    ``data_dir/FashionMNIST/raw``; ``FASHION_MNIST_DIR`` by default. Raises ConfigError saying how to get them."""
    root = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    stems = [stem for pair in _FASHION_MNIST_FILES.values() for stem in pair]
    for folder in (root, root / 'FashionMNIST' / 'raw'):
        if all(_idx_file(folder, stem) for stem in stems):
            return folder
    raise ConfigError(
        f'Fashion-MNIST not found in {root}: it needs the four idx files ({", ".join(s + ".gz" for s in stems)}), in '
        f'that folder or in its FashionMNIST/raw/ (a torchvision root). Nothing is downloaded: install them with '
        f'`apt-get install dataset-fashion-mnist` (Debian, into {FASHION_MNIST_DIR}), or set data_dir to a folder '
        f'holding them')


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An idx array (uint8 data, big-endian header) from ``path``, gzipped or not; ConfigError when malformed."""
    try:
        with (gzip.open(path, 'rb') if path.suffix == '.gz' else open(path, 'rb')) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ConfigError(f'{path}: cannot read it as an idx file ({e})') from None
    header = 4 * (1 + dims)
    if len(data) < header or int.from_bytes(data[:4], 'big') != magic:
        raise ConfigError(f'{path}: not an idx file of {dims}-d uint8 data (magic number {magic} expected)')
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(dims)]
    if len(data) != header + int(np.prod(shape)):
        raise ConfigError(f'{path}: truncated or padded: header says {shape}, the file holds {len(data) - header} '
                          f'bytes of data')
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST (Xiao et al. 2017: 60000 training and 10000 test images, 28x28 grayscale, 10 classes) read
    from its standard idx files, never downloaded; ``find_fashion_mnist`` says where they are looked for.

    Images are resized to ``img_size`` (bilinear), normalised with the training set's mean and std and repeated
    over ``in_chans`` channels, so 3-channel ImageNet models take them. ``split`` is 'train' (the 60000) or
    'test' ('validation' is the same 10000 test images, as finetune's default val_split names them). ``classes``
    keeps those classes, relabelled 0..len(classes)-1; ``limit`` keeps the first N images (after the class subset);
    ``per_class`` then keeps that many training images of each class, drawn by ``seed`` (few-shot; the test split
    is never subsampled).
    """

    mean, std = _FASHION_MNIST_MEAN, _FASHION_MNIST_STD

    def __init__(self, split: str = 'train', data_dir: Optional[Union[str, Path]] = None,
                 classes: Optional[Sequence[int]] = None, img_size: int = 32, in_chans: int = 3,
                 limit: Optional[int] = None, per_class: Optional[int] = None, seed: int = 0) -> None:
        if split not in ('train', 'validation', 'test'):
            raise ConfigError(f"Fashion-MNIST split must be 'train', 'validation' or 'test', got {split!r}")
        folder = find_fashion_mnist(data_dir)
        image_stem, label_stem = _FASHION_MNIST_FILES['train' if split == 'train' else 'test']
        images = _read_idx(_idx_file(folder, image_stem), 2051, 3)
        labels = _read_idx(_idx_file(folder, label_stem), 2049, 1)
        if len(images) != len(labels) or labels.max(initial=0) > 9:
            raise ConfigError(f'{folder}: {split} images and labels do not match ({len(images)} images, '
                              f'{len(labels)} labels, largest label {labels.max(initial=0)})')
        classes = list(range(10)) if classes is None else [int(c) for c in classes]
        keep = np.flatnonzero(np.isin(labels, classes))[:limit]
        if per_class is not None and split == 'train':
            keep = _draw_per_class(keep, labels[keep], per_class, seed)
        x = torch.from_numpy(images[keep].copy()).unsqueeze(1).float().div_(255.0)
        if img_size != x.shape[-1]:
            x = nn.functional.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False)
        self.images = x.sub_(self.mean).div_(self.std)
        self.in_chans = in_chans
        remap = {c: i for i, c in enumerate(classes)}
        self.targets = torch.tensor([remap[int(t)] for t in labels[keep]])
        self.classes = [FASHION_MNIST_CLASSES[c] for c in classes]
        self.num_classes = len(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.images[index].expand(self.in_chans, -1, -1), int(self.targets[index])

    def batch(self, indices: Union[slice, torch.Tensor]) -> torch.Tensor:
        """The images at ``indices`` as one (N, in_chans, H, W) tensor, without a loader."""
        return self.images[indices].expand(-1, self.in_chans, -1, -1).contiguous()

def build_datasets(cfg: Dict[str, Any], model: Optional[nn.Module]) -> Tuple[Any, Any, int]:
    """The training and validation datasets and the number of classes.

    The validation set takes the training set's class indices; a validation class that training lacks is an error.
    """
    if cfg['dataset'] == 'sklearn/digits':
        size = cfg['img_size'] or 32
        train_set = DigitsDataset('train', cfg['classes'], size, cfg['in_chans'], cfg['train_per_class'], cfg['seed'],
                                  cfg['train_limit'])
        val_set = DigitsDataset('validation', cfg['classes'], size, cfg['in_chans'], limit=cfg['val_limit'])
        return train_set, val_set, train_set.num_classes
    if cfg['dataset'] == FASHION_MNIST:
        size = cfg['img_size'] or 32
        train_set = FashionMNIST(cfg['train_split'], cfg['data_dir'], cfg['classes'], size, cfg['in_chans'],
                                 cfg['train_limit'], cfg['train_per_class'], cfg['seed'])
        val_set = FashionMNIST(cfg['val_split'], cfg['data_dir'], cfg['classes'], size, cfg['in_chans'],
                               cfg['val_limit'])
        return train_set, val_set, train_set.num_classes
    from timm.data import create_dataset, create_transform, resolve_data_config

    if cfg['data_dir'] and not Path(cfg['data_dir']).exists() and not cfg['download']:
        raise ConfigError(f"dataset path {cfg['data_dir']} does not exist")
    if not cfg['data_dir'] and not cfg['dataset'].startswith(('hfds/', 'hfids/')):
        raise ConfigError(f"dataset {cfg['dataset']!r} needs data_dir")
    data_config = _timm_data_config(cfg, model)

    def open_split(split: str, training: bool, class_map: Optional[Dict[str, int]] = None) -> Any:
        try:
            return create_dataset(cfg['dataset'], root=cfg['data_dir'], split=split, is_training=training,
                                  download=cfg['download'], batch_size=cfg['batch_size'],
                                  **({'class_map': class_map} if class_map else {}))
        except Exception as e:
            raise ConfigError(f"cannot open dataset {cfg['dataset']!r} split {split!r} in {cfg['data_dir']}: {e}") from None

    train_set = open_split(cfg['train_split'], True)
    val_set = open_split(cfg['val_split'], False)
    class_to_idx = _class_to_idx(train_set)
    if class_to_idx is not None:  # folders and tar files: indices come from the class names each split finds
        unknown = sorted(set(_class_to_idx(val_set) or {}) - set(class_to_idx))
        if unknown:
            raise ConfigError(f"validation split {cfg['val_split']!r} has classes the training split "
                              f"{cfg['train_split']!r} lacks: {unknown[:10]}")
        val_set = open_split(cfg['val_split'], False, class_to_idx)
    for dataset, training in ((train_set, True), (val_set, False)):
        if cfg['crop_padding'] is not None:
            dataset.transform = _padded_crop_transform(data_config, training, cfg)
        else:
            dataset.transform = create_transform(**data_config, is_training=training, hflip=cfg['hflip'],
                                                 **({'scale': tuple(cfg['scale'])} if cfg['scale'] else {}))
    num_classes = len(getattr(train_set, 'classes', None) or class_to_idx or []) or cfg['num_classes']
    return train_set, val_set, num_classes


def _timm_data_config(cfg: Dict[str, Any], model: Optional[nn.Module]) -> Dict[str, Any]:
    """The preprocessing of timm's datasets: the model's, at ``img_size`` where the config sets one."""
    from timm.data import resolve_data_config

    return resolve_data_config({'input_size': (cfg['in_chans'], cfg['img_size'], cfg['img_size'])}
                               if cfg['img_size'] else {}, model=model)


def data_config_of(cfg: Dict[str, Any], dataset: Any, model: Optional[nn.Module]) -> Dict[str, Any]:
    """The preprocessing ``build_datasets`` gave ``dataset`` for ``cfg``, as timm names it (input_size,
    interpolation, crop_pct, crop_mode, mean, std), for exports to record, so that timm's and transformers'
    transforms feed a trained model as training did."""
    if isinstance(dataset, (DigitsDataset, FashionMNIST)):  # resized whole (bilinear), never cropped
        size = cfg['img_size'] or 32
        return {'input_size': (cfg['in_chans'], size, size), 'interpolation': 'bilinear', 'crop_pct': 1.0,
                'crop_mode': 'center', 'mean': (dataset.mean,) * cfg['in_chans'],
                'std': (dataset.std,) * cfg['in_chans']}
    data_config = dict(_timm_data_config(cfg, model))
    if cfg['crop_padding'] is not None:  # evaluation centre-crops img_size from images of that size
        data_config['crop_pct'] = 1.0
    return data_config


def label_names(dataset: Any) -> Optional[List[str]]:
    """The class names of ``dataset`` in label order (folders: by their class index), or None where it has none."""
    classes = getattr(dataset, 'classes', None)
    if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    class_to_idx = _class_to_idx(dataset)
    if class_to_idx and sorted(class_to_idx.values()) == list(range(len(class_to_idx))):
        return [name for name, _ in sorted(class_to_idx.items(), key=lambda item: item[1])]
    return None


def _class_to_idx(dataset: Any) -> Optional[Dict[str, int]]:
    return getattr(getattr(dataset, 'reader', None), 'class_to_idx', None) or None


def _padded_crop_transform(data_config: Dict[str, Any], training: bool, cfg: Dict[str, Any]):
    """Random crop with padding and horizontal flip (the paper's CIFAR augmentation), then normalise."""
    from torchvision import transforms

    size = data_config['input_size'][-1]
    steps = [transforms.RandomCrop(size, padding=cfg['crop_padding']), transforms.RandomHorizontalFlip(cfg['hflip'])] \
        if training else [transforms.CenterCrop(size)]
    return transforms.Compose(steps + [transforms.ToTensor(),
                                       transforms.Normalize(data_config['mean'], data_config['std'])])


def build_loader(dataset: Any, cfg: Dict[str, Any], training: bool, device: torch.device, epoch_seed: int,
                 distributed: bool = False) -> torch.utils.data.DataLoader:
    """A loader of ``dataset`` as ``cfg`` says; with ``distributed``, each rank reads its own shard."""
    sampler = None
    generator = torch.Generator().manual_seed(epoch_seed)
    if distributed:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=training, seed=cfg['seed'])
    workers = 0 if isinstance(dataset, (DigitsDataset, FashionMNIST)) else cfg['workers']  # tensors in memory
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg['batch_size'], shuffle=training and sampler is None, sampler=sampler,
        generator=generator, num_workers=workers, pin_memory=cfg['pin_mem'] and device.type == 'cuda',
        drop_last=training and len(dataset) > cfg['batch_size'])
