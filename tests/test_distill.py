"""Distillation as a fine-tuning mode: the KL to a frozen teacher, alone or mixed with the label loss; resume,
exports, unlabeled folders, bad input; and healing (convert --distill-steps) running the same loop."""
import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

from timm_momentum.tools import finetune
from timm_momentum.tools.convert import convert
from timm_momentum.tools.data import DigitsDataset
from timm_momentum.tools.errors import ConfigError
from timm_momentum.tools.finetune import DEFAULTS, describe_result, load_config, train
from timm_momentum.tools.loop import Distillation, Teacher, evaluate, kl_to_teacher, teacher_dtype, train_one_epoch

CLASSES = [0, 1, 2, 3, 4]
CONFIGS = Path(__file__).parent.parent / 'configs'


@pytest.fixture(scope='module')
def upstream(tmp_path_factory):
    """A plain resnet18 trained 1 epoch on digits 0-4 at 16x16 (a real source), its weights file, and its
    conversion to momentum_resnet18 at gamma 0.9, which computes another function."""
    work = tmp_path_factory.mktemp('upstream')
    torch.manual_seed(0)
    result = train(dict(DEFAULTS, model='resnet18', dataset='sklearn/digits', classes=CLASSES, img_size=16,
                        batch_size=32, epochs=1, opt='adamw', lr=2e-3, weight_decay=0.01, progress=False,
                        plots=False, checkpoints=False, output=str(work / 'run')))
    weights = work / 'resnet18_digits.safetensors'
    save_file({k: v.contiguous() for k, v in result['model'].state_dict().items()}, str(weights))
    folder = convert(str(weights), work / 'momentum', gamma=0.9, img_size=16).out_dir
    return {'model': result['model'].eval(), 'weights': weights, 'folder': folder}


def _heal_cfg(tmp_path, upstream, name='heal', **overrides):
    cfg = dict(DEFAULTS, model=f"local-dir:{upstream['folder']}", pretrained=True, dataset='sklearn/digits',
               classes=CLASSES, img_size=16, batch_size=32, epochs=2, opt='adamw', lr=1e-3, weight_decay=0.0,
               distill_weight=1.0, progress=False, plots=False, output=str(tmp_path / name))
    cfg.update(overrides)
    return cfg


def _val_loader():
    return torch.utils.data.DataLoader(DigitsDataset('validation', CLASSES, 16), batch_size=128)


def _rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_distillation_lowers_the_kl_to_the_source_and_records_the_healing(tmp_path, upstream):
    start = timm.create_model(f"local-dir:{upstream['folder']}", pretrained=True)
    teacher = Teacher(copy.deepcopy(upstream['model']), torch.device('cpu'))
    before = evaluate(start, _val_loader(), torch.device('cpu'), None, teacher=teacher)
    assert before['kl'] > 0.05, before  # gamma 0.9 drifted from the source: something to heal

    result = train(_heal_cfg(tmp_path, upstream))
    rows = _rows(tmp_path / 'heal' / 'metrics.csv')
    assert {'train_label_loss', 'train_kl', 'train_agreement', 'val_kl', 'val_agreement'} <= set(rows[0])
    after = float(rows[-1]['val_kl'])
    assert after < 0.5 * before['kl'], (before['kl'], after)
    # the labels exist, so both losses are recorded, though only the KL is trained on (distill_weight 1)
    assert all(math.isfinite(float(r['train_label_loss'])) and float(r['train_label_loss']) > 0 for r in rows)
    assert float(rows[-1]['train_loss']) == pytest.approx(float(rows[-1]['train_kl']))
    # what metrics.csv says of the final weights is what they compute
    final = timm.create_model(f"local-dir:{tmp_path / 'heal' / 'final'}", pretrained=True)
    measured = evaluate(final, _val_loader(), torch.device('cpu'), None, teacher=teacher)
    assert measured['kl'] == pytest.approx(after, rel=1e-4)
    assert list(final.momentum_cfg['gamma']) == [0.9] * 4  # healed at the gamma it trains at, not moved to 0

    verify = json.loads((tmp_path / 'heal' / 'final' / 'verify.json').read_text())
    healing = verify['healing']
    assert healing['method'] == 'distillation' and healing['distill_weight'] == 1.0 and not healing['labels_used']
    assert 'starting weights at gamma 0 (its source ResNet)' in healing['teacher']
    assert healing['epochs'] == 2 and healing['steps'] == 2 * result['steps_per_epoch']
    drift = verify['drift_at_gamma']
    assert drift['after_healing'] and drift['kl_source_to_converted'] == pytest.approx(after)
    assert drift['top1_agreement'] == pytest.approx(float(rows[-1]['val_agreement']) / 100)
    card = (tmp_path / 'heal' / 'final' / 'README.md').read_text()
    assert 'Healed by distillation' in card and 'the KL alone' in card
    assert 'agreement with the teacher' in describe_result(result)


def test_the_default_teacher_is_the_source_resnet_itself(tmp_path, upstream):
    cfg = finetune.validate_config(_heal_cfg(tmp_path, upstream))
    student = finetune._build_model(cfg, len(CLASSES))
    teacher, description = finetune._build_teacher(cfg, student, len(CLASSES))
    x = DigitsDataset('validation', CLASSES, 16).images[:16]
    with torch.no_grad():
        assert torch.allclose(teacher.eval()(x), upstream['model'](x), atol=1e-4)
    assert list(student.momentum_cfg['gamma']) == [0.9] * 4  # the student keeps its own gamma
    # a checkpoint file of the source names the same teacher
    named = finetune._build_teacher(dict(cfg, distill_from=str(upstream['weights'])), student, len(CLASSES))[0]
    with torch.no_grad():
        assert torch.allclose(named.eval()(x), upstream['model'](x), atol=1e-4)


def test_the_teacher_gets_no_gradients_and_keeps_its_norm_statistics(upstream):
    model = copy.deepcopy(upstream['model']).train()  # even left in train mode, a Teacher runs it in eval mode
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    student = timm.create_model(f"local-dir:{upstream['folder']}", pretrained=True)
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    data = DigitsDataset('train', CLASSES, 16)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    cfg = dict(DEFAULTS, progress=False)
    distillation = Distillation(Teacher(model, torch.device('cpu')), weight=0.5, eval_norms=True)
    out = train_one_epoch(0, student, student, loader, torch.optim.SGD(student.parameters(), lr=0.01),
                          nn.CrossEntropyLoss(), cfg, torch.device('cpu'), None, distillation=distillation)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not model.training
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())
    # eval_norms: the student's BatchNorm statistics stayed, its weights moved
    after = student.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in after if k.endswith(('running_mean', 'running_var')))
    assert any(not torch.equal(weights[k], after[k]) for k in after if k.endswith('conv1.weight'))
    assert out['images'] == len(data) and 0 <= out['agreement'] <= 100
    assert out['loss'] == pytest.approx(0.5 * out['label_loss'] + 0.5 * out['kl'], rel=1e-5)


def test_resume_mid_distillation_is_exact(tmp_path, upstream, monkeypatch):
    unbroken = train(_heal_cfg(tmp_path, upstream, 'unbroken', distill_weight=0.5, distill_temperature=2.0))
    real_epoch = finetune._train_epoch

    def stop_in_epoch_1(run, epoch):
        if epoch == 1:
            raise KeyboardInterrupt('killed mid-run')
        return real_epoch(run, epoch)

    monkeypatch.setattr(finetune, '_train_epoch', stop_in_epoch_1)
    cfg = _heal_cfg(tmp_path, upstream, 'broken', distill_weight=0.5, distill_temperature=2.0)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(finetune, '_train_epoch', real_epoch)
    resumed = train(dict(cfg, resume=True))
    assert resumed['start_epoch'] == 1
    assert _rows(tmp_path / 'unbroken' / 'metrics.csv') == [
        {**r, 'images_per_s': u['images_per_s'], 'peak_memory_mib': u['peak_memory_mib']}
        for r, u in zip(_rows(tmp_path / 'broken' / 'metrics.csv'), _rows(tmp_path / 'unbroken' / 'metrics.csv'))]
    a, b = unbroken['model'].state_dict(), resumed['model'].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the teacher is what the run distils toward: it cannot change mid-run
    with pytest.raises(ConfigError, match='cannot resume .* with another distill_from'):
        train(dict(cfg, resume=True, epochs=3, distill_from=str(upstream['weights'])))


def test_kl_only_distillation_trains_on_an_unlabeled_folder(tmp_path, upstream):
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        (tmp_path / 'images' / split).mkdir(parents=True)
        for i in range(12):  # images right in the split folder: no class folders, so no labels
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype('uint8')).save(tmp_path / 'images' / split / f'{i}.png')
    cfg = _heal_cfg(tmp_path, upstream, dataset='', data_dir=str(tmp_path / 'images'), classes=None, batch_size=4,
                    workers=0, epochs=1)
    with pytest.raises(ConfigError, match="the data has one class .* set num_classes to the teacher's"):
        train(cfg)
    result = train(dict(cfg, num_classes=5))
    row = _rows(tmp_path / 'heal' / 'metrics.csv')[0]
    assert row['val_acc'] == 'nan' and row['train_acc'] == 'nan' and float(row['val_kl']) >= 0
    assert float(row['val_loss']) == float(row['val_kl'])  # the objective, where there is no label loss
    assert (tmp_path / 'heal' / 'best' / 'model.safetensors').is_file()  # chosen by agreement with the teacher
    assert 'agreement with the teacher' in describe_result(result)
    config = json.loads((tmp_path / 'heal' / 'final' / 'config.json').read_text())
    assert 'label_names' not in config.get('model_config', {})  # the folder's one '' class names nothing
    with pytest.raises(ConfigError, match='num_classes=5 but the dataset has 1 classes .* distill_weight 1'):
        train(dict(cfg, num_classes=5, distill_weight=0.5, output=str(tmp_path / 'mixed')))


def test_bad_distillation_settings_are_refused_naming_the_key(tmp_path, upstream):
    with pytest.raises(ConfigError, match='distill_from names a teacher .* but distill_weight is 0'):
        load_config(None, ['--distill-from', 'resnet18'])
    with pytest.raises(ConfigError, match=r'distill_weight must be in \[0, 1\], got 1.5'):
        load_config(None, ['--distill-weight', '1.5'])
    with pytest.raises(ConfigError, match='distill_temperature must be > 0'):
        load_config(None, ['--distill-weight', '1', '--distill-temperature', '0'])
    with pytest.raises(ConfigError, match='model starts from random weights .* name a teacher with distill_from'):
        train(dict(_heal_cfg(tmp_path, upstream), model='momentum_resnet18', pretrained=False))
    ten = tmp_path / 'ten.safetensors'
    save_file({k: v.contiguous() for k, v in timm.create_model('resnet18', num_classes=10).state_dict().items()},
              str(ten))
    teacher = convert(str(ten), tmp_path / 'ten', gamma=0.0, img_size=16).out_dir
    with pytest.raises(ConfigError, match='the teacher .* predicts 10 classes and the model 5'):
        train(_heal_cfg(tmp_path, upstream, distill_from=f'local-dir:{teacher}', output=str(tmp_path / 'b')))
    with pytest.raises(ConfigError, match='distill_from: cannot load the teacher .*no_such_model'):
        train(_heal_cfg(tmp_path, upstream, distill_from='no_such_model', output=str(tmp_path / 'c')))
    wrong = tmp_path / 'wrong.safetensors'
    save_file({'fc.weight': torch.zeros(5, 3)}, str(wrong))
    with pytest.raises(ConfigError, match=f'distill_from {wrong}: cannot load it into'):
        train(_heal_cfg(tmp_path, upstream, distill_from=str(wrong), output=str(tmp_path / 'd')))
    assert not any((tmp_path / name).exists() for name in ('heal', 'b', 'c', 'd'))  # nothing left behind


def test_the_teacher_runs_in_bfloat16_on_cuda_only(monkeypatch):
    assert teacher_dtype(torch.device('cpu')) is None
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    assert teacher_dtype(torch.device('cuda', 0)) is torch.bfloat16
    logits = torch.randn(4, 5)
    assert float(kl_to_teacher(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_teacher(logits, logits * 3, temperature=2.0)) > 0


def test_converter_healing_runs_finetunes_loop(monkeypatch, upstream, tmp_path):
    from timm_momentum.tools import loop

    calls = []
    real = loop.train_one_epoch

    def spy(*args, **kwargs):
        calls.append(kwargs['distillation'])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, 'train_one_epoch', spy)
    result = convert(str(upstream['weights']), tmp_path / 'healed', gamma=0.9, img_size=16,
                     heal_images='sklearn/digits', distill_steps=3)
    assert len(calls) == 1 and calls[0].weight == 1.0 and calls[0].eval_norms
    assert result.verify['healing']['distill_steps'] == 3


def test_the_imagenet_healing_config_loads():
    cfg = load_config(str(CONFIGS / 'heal_imagenet_momentum_resnet50.yaml'))
    assert cfg['model'] == 'momentum_resnet50.a1_in1k' and cfg['pretrained'] and cfg['gamma'] == 0.9
    assert cfg['distill_weight'] == 1.0 and cfg['distill_from'] == 'resnet50.a1_in1k'
    assert cfg['amp'] == 'bf16' and cfg['memory_efficient']


def _ddp_worker(rank, port, cfg, results):
    import hashlib
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE='2')
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        result = train(cfg)
        digest = hashlib.sha256()
        for value in result['model'].state_dict().values():
            digest.update(value.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        results[rank] = (digest.hexdigest(), result['rows'][-1]['val_kl'], result['rows'][-1]['val_agreement'])
    finally:
        dist.destroy_process_group()


def test_distillation_under_ddp_ends_with_identical_weights_and_one_validation(tmp_path, upstream):
    import os

    import torch.multiprocessing as mp

    cfg = _heal_cfg(tmp_path, upstream, epochs=1, distill_weight=0.5)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(29700 + os.getpid() % 100, cfg, results), nprocs=2)
        results = dict(results)
    assert results[0] == results[1]  # same weights, and the validation KL and agreement summed over both ranks
    row = _rows(tmp_path / 'heal' / 'metrics.csv')[0]
    assert float(row['val_kl']) == pytest.approx(results[0][1]) and float(row['val_agreement']) == results[0][2]
