"""finetune never overwrites an earlier run, resumes only what it can continue and checks, and one line names
every bad input, leaving no args.yaml behind (issue 20). Tiny runs: 8 digits at 16 px, one epoch."""
import csv
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from timm_momentum.tools.cli import main
from timm_momentum.tools.errors import ConfigError
from timm_momentum.tools.files import folder_lock
from timm_momentum.tools.finetune import DEFAULTS, load_config, train

TINY = ['--model', 'momentum_resnet18', '--classes', '[0,1]', '--train_per_class', '4', '--img_size', '16',
        '--batch_size', '4', '--epochs', '1', '--opt', 'sgd', '--lr', '0.01', '--progress', 'false', '--plots', 'false']


def _cfg(output: Path, **overrides) -> dict:
    cfg = dict(DEFAULTS, model='momentum_resnet18', classes=[0, 1], train_per_class=4, img_size=16, batch_size=4,
               epochs=1, opt='sgd', lr=0.01, progress=False, plots=False, output=str(output))
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory) -> Path:
    """A one-epoch run's folder; tests copy it."""
    out = tmp_path_factory.mktemp('runs') / 'run'
    train(_cfg(out))
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / 'run'))


def _contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_a_second_run_into_the_same_output_is_refused_and_the_first_kept(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path)
    before = _contents(out)
    assert main(['finetune', *TINY, '--output', str(out)]) == 2
    err = capsys.readouterr().err
    assert f'output {out} is not empty' in err and '--resume true' in err and 'new --output' in err
    assert _contents(out) == before
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('mine')
    with pytest.raises(ConfigError, match='not empty'):
        train(_cfg(tmp_path / 'mine'))
    with pytest.raises(ConfigError, match='holds no checkpoint .* not empty'):
        train(_cfg(tmp_path / 'mine', resume=True))
    assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'mine'


def test_the_default_output_is_a_new_timestamped_folder_per_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pattern = r'output/finetune/\d{8}-\d{6}-%s(-1)?'
    first = load_config(None, ['--model', 'momentum_resnet18'])['output']
    assert re.fullmatch(pattern % 'momentum_resnet18', first), first
    Path(first).mkdir(parents=True)  # taken: a run in the same second gets the name with -1
    second = load_config(None, ['--model', 'momentum_resnet18'])['output']
    assert second != first and re.fullmatch(pattern % 'momentum_resnet18', second), second
    (tmp_path / 'converted').mkdir()
    (tmp_path / 'converted' / 'config.json').write_text('{}')
    local = load_config(None, ['--model', f"local-dir:{tmp_path / 'converted'}"])['output']
    assert re.fullmatch(pattern % 'converted', local), local
    with pytest.raises(ConfigError, match='resume: true continues the run in output, so output must name'):
        load_config(None, ['--resume', 'true'])


def test_resume_with_a_key_that_cannot_change_mid_run_is_refused_naming_it(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path)
    before = _contents(out)
    assert main(['finetune', *TINY, '--output', str(out), '--resume', 'true', '--gamma', '0.5',
                 '--classes', '[0,2]']) == 2
    err = capsys.readouterr().err
    assert 'with another gamma, classes' in err and 'gamma [0.9, 0.9, 0.9, 0.9] in the checkpoint, 0.5 now' in err
    assert _contents(out) == before  # args.yaml too: it still describes the checkpoint


def test_resume_applies_a_changed_schedule_and_says_so(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path)
    with open(out / 'metrics.csv', 'a', newline='') as f:  # a run killed after logging epoch 1, before its checkpoint
        f.write('1,0.5,50.0,0.5,50.0,0.0,1.0,1.0\r\n')
    # cosine over 2 epochs from lr 0.5: epoch 1 trains at 0.25; the checkpoint's 1-epoch schedule ends at 0.0
    assert main(['finetune', *TINY, '--output', str(out), '--resume', 'true', '--epochs', '2', '--lr', '0.5',
                 '--memory_efficient', 'false']) == 0
    printed = capsys.readouterr().out
    assert 'resume: applying the changed keys memory_efficient True -> False, epochs 1 -> 2, lr 0.01 -> 0.5' \
        in printed
    rows = list(csv.DictReader(open(out / 'metrics.csv')))  # the stray epoch 1 dropped, the one trained now kept
    assert [int(r['epoch']) for r in rows] == [0, 1] and float(rows[1]['lr']) == pytest.approx(0.25)
    assert rows[0] == list(csv.DictReader(open(finished_run / 'metrics.csv')))[0]
    args = yaml.safe_load((out / 'args.yaml').read_text())
    assert (args['lr'], args['epochs'], args['memory_efficient']) == (0.5, 2, False)
    state = torch.load(out / 'last.pth.tar', weights_only=True)
    assert state['optimizer']['param_groups'][0]['initial_lr'] == 0.5


def _flip_bytes_inside_a_tensor(path: Path, count: int = 64) -> None:
    """Flip ``count`` bytes in the middle of the largest tensor stored in a torch.save zip file."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack('<HH', data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_checkpoint_is_not_resumed(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path)
    _flip_bytes_inside_a_tensor(out / 'last.pth.tar')
    torch.load(out / 'last.pth.tar', weights_only=True)  # torch reads it without a word
    assert main(['finetune', *TINY, '--output', str(out), '--resume', 'true', '--epochs', '2']) == 2
    assert 'it is corrupt, its contents do not match the checksum' in capsys.readouterr().err
    assert (out / 'metrics.csv').read_text().count('\n') == 2  # the header and epoch 0: nothing trained


def test_resume_true_without_a_checkpoint_says_it_starts_a_new_run(tmp_path, capsys):
    assert main(['finetune', *TINY, '--output', str(tmp_path / 'new'), '--resume', 'true']) == 0
    assert f"resume: no checkpoint (last.pth.tar) in {tmp_path / 'new'}, so this is a new run" in capsys.readouterr().out


def test_a_run_into_a_folder_another_run_is_writing_is_refused(tmp_path):
    with folder_lock(tmp_path / 'run', 'timm-momentum finetune'):
        with pytest.raises(ConfigError, match='is being written by another process'):
            train(_cfg(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


def _bomb_png(path: Path, side: int = 40000) -> None:
    """A valid PNG header for a side x side RGB image, with almost no data: PIL refuses it on open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    header = struct.pack('>IIBBBBB', side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
                     + chunk(b'IEND', b''))


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for split in ('train', 'validation'):
        for name in ('a', 'b'):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new('RGB', (20, 20), (40 * i, 80, 120)).save(root / split / name / f'{i}.png')
    return root


@pytest.mark.parametrize('case', ['not_utf8', 'seed', 'local_dir', 'under_a_file', 'batch_of_one', 'bomb',
                                  'alias_bomb'])
def test_bad_input_is_one_line_and_leaves_no_args_yaml(tmp_path, capsys, case):
    out = tmp_path / 'parent' / 'run'
    argv = ['finetune', *TINY, '--output', str(out)]
    if case == 'not_utf8':
        (tmp_path / 'c.yaml').write_bytes(b'lr: 0.1\nmodel: r\xe9snet\n')
        argv += ['--config', str(tmp_path / 'c.yaml')]
        message = 'is not UTF-8 text (byte 16 is 0xe9)'
    elif case == 'seed':
        argv += ['--seed', str(2 ** 64)]
        message = 'seed must be in [0, 4294967295], got 18446744073709551616'
    elif case == 'local_dir':
        argv += ['--model', 'local-dir:/nonexistent']
        message = 'model: local-dir:/nonexistent: no such folder'
    elif case == 'under_a_file':
        (tmp_path / 'parent').write_text('a file')
        message = f"output: {tmp_path / 'parent'} is a file"
    elif case == 'batch_of_one':
        argv += ['--batch_size', '1']
        message = 'batch_size 1: a batch of 1 image(s) leaves BatchNorm one value per channel'
    elif case == 'bomb':
        root = _image_folder(tmp_path / 'data')
        for name in ('a', 'b'):  # every training image: timm's dataset skips no image it cannot open
            for i in range(2):
                _bomb_png(root / 'train' / name / f'{i}.png')
        argv += ['--dataset', '', '--data_dir', str(root), '--classes', 'null', '--train_per_class', 'null',
                 '--workers', '0']
        message = "split 'train' in " + str(root) + ' holds an image too large to open safely: Image size'
    elif case == 'alias_bomb':
        lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f'{chr(98 + i)}: &{chr(98 + i)} [{",".join(["*" + chr(97 + i)] * 9)}]' for i in range(8)]
        (tmp_path / 'bomb.yaml').write_text('\n'.join(lines) + '\nclasses: *i\n')
        argv += ['--config', str(tmp_path / 'bomb.yaml')]
        message = 'aliases (*a) are not allowed in configs'
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert len(err) < 600
    assert not out.exists() and (case == 'under_a_file' or not (tmp_path / 'parent').exists())


def test_an_empty_override_is_the_empty_string_and_long_values_are_clipped(capsys):
    assert load_config(None, ['--dataset', '', '--data_dir', '/tmp'])['dataset'] == ''
    assert main(['finetune', '--lr', 'x' * 10000]) == 2
    err = capsys.readouterr().err
    assert 'lr must be a number' in err and len(err) < 300
    assert main(['finetune', '--classes', '*a']) == 2
    assert 'aliases (*a) are not allowed' in capsys.readouterr().err


def test_the_demo_and_the_study_refuse_a_folder_that_holds_an_earlier_one(tmp_path, capsys):
    (tmp_path / 'earlier' / 'upstream').mkdir(parents=True)
    (tmp_path / 'earlier' / 'upstream' / 'metrics.csv').write_text('epoch\n0\n')
    for argv in (['demo', '--output', str(tmp_path / 'earlier')], ['study', '--quick', '--out', str(tmp_path / 'earlier')]):
        assert main(argv) == 2
        assert 'is not empty: it holds an earlier' in capsys.readouterr().err
    assert (tmp_path / 'earlier' / 'upstream' / 'metrics.csv').read_text() == 'epoch\n0\n'


def test_the_root_folder_is_no_output(capsys):
    with pytest.raises(ConfigError, match="output must be a run's folder, not the root folder /"):
        load_config(None, ['--output', '/'])
