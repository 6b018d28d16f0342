"""timm-momentum study: the plain-vs-momentum comparison, and the digits features it needs."""
import numpy as np
import pytest

from timm_momentum.finetune import ConfigError, DEFAULTS, DigitsDataset, validate_config


def test_digits_few_shot_draws_per_class_by_seed_and_leaves_the_test_split_whole():
    full = DigitsDataset('train', [5, 6, 7], 8)
    few = DigitsDataset('train', [5, 6, 7], 8, per_class=4, seed=1)
    again = DigitsDataset('train', [5, 6, 7], 8, per_class=4, seed=1)
    other = DigitsDataset('train', [5, 6, 7], 8, per_class=4, seed=2)
    assert np.bincount(few.targets.numpy()).tolist() == [4, 4, 4]
    assert (few.images == again.images).all()
    assert not (few.images == other.images).all()
    # every drawn image is a training image
    assert all(bool((full.images == image).all(dim=(1, 2, 3)).any()) for image in few.images)
    test = DigitsDataset('validation', [5, 6, 7], 8, per_class=4, seed=1)
    assert len(test) == len(DigitsDataset('validation', [5, 6, 7], 8))
    with pytest.raises(ConfigError, match='train_per_class=1000, but digit 5 has only'):
        DigitsDataset('train', [5, 6, 7], 8, per_class=1000)


def test_train_per_class_is_checked():
    with pytest.raises(ConfigError, match='train_per_class must be >= 1, got 0'):
        validate_config(dict(DEFAULTS, train_per_class=0))
    with pytest.raises(ConfigError, match='train_per_class is supported for sklearn/digits only'):
        validate_config(dict(DEFAULTS, dataset='folder', data_dir='/tmp', train_per_class=5))


def test_grad_checkpointing_key_turns_on_timm_checkpointing(tmp_path):
    from timm_momentum.finetune import train

    result = train(dict(DEFAULTS, model='resnet18', dataset='sklearn/digits', classes=[0, 1], img_size=16,
                        epochs=1, batch_size=32, progress=False, device='cpu', grad_checkpointing=True,
                        output=str(tmp_path / 'run')))
    assert result['model'].grad_checkpointing


def test_plots_and_checkpoints_can_be_turned_off(tmp_path):
    from timm_momentum.finetune import train

    train(dict(DEFAULTS, model='resnet18', dataset='sklearn/digits', classes=[0, 1], img_size=16, epochs=2,
               batch_size=32, progress=False, device='cpu', plots=False, checkpoints=False,
               output=str(tmp_path / 'run')))
    assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['args.yaml', 'final', 'metrics.csv']
    with pytest.raises(ConfigError, match='resume needs checkpoints: true'):
        validate_config(dict(DEFAULTS, resume=True, checkpoints=False))
