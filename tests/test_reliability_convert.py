"""convert never deletes what it did not write, refuses weights that are not floating point, and one line names
every bad input (issue 20). Tiny inputs: resnet18 at 32 px."""
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from timm_momentum.tools.cli import main
from timm_momentum.tools.convert import convert
from timm_momentum.tools.errors import ConversionError
from timm_momentum.tools.files import MARKER, folder_lock


def _source(folder: Path, name: str = 'x.safetensors') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(timm.create_model('resnet18', num_classes=3).state_dict(), folder / name)
    return folder / name


def _tree(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))


def test_force_never_replaces_the_working_directory_given_as_an_absolute_path(tmp_path, monkeypatch, capsys):
    source = _source(tmp_path / 'src')
    (tmp_path / 'notes.txt').write_text('mine')
    (tmp_path / 'sub').mkdir()
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    for out in (str(tmp_path), '.', str(tmp_path.parent)):
        assert main(['convert', str(source), '--out', out, '--force', '--img-size', '32']) == 2
        err = capsys.readouterr().err
        assert 'refusing to replace' in err and 'working directory' in err, err
    assert _tree(tmp_path) == before and (tmp_path / 'notes.txt').read_text() == 'mine'


def test_force_never_replaces_the_folder_that_holds_the_source(tmp_path, capsys):
    source = _source(tmp_path / 'src')
    (tmp_path / 'src' / 'config.json').write_text('{}')
    before = _tree(tmp_path)
    for argv in ([str(source), '--out', str(tmp_path / 'src')],
                 ['local-dir:' + str(tmp_path / 'src'), '--out', str(tmp_path / 'src')],
                 [str(source), '--out', str(tmp_path)]):
        assert main(['convert', *argv, '--force', '--img-size', '32']) == 2
        err = capsys.readouterr().err
        assert 'refusing to replace' in err and 'the source' in err, err
    assert _tree(tmp_path) == before
    assert main(['convert', str(source), '--out', '/', '--force']) == 2
    assert 'it is the root folder' in capsys.readouterr().err


def test_force_replaces_only_folders_that_convert_wrote(tmp_path, capsys):
    source = _source(tmp_path / 'src')
    out = tmp_path / 'out'
    convert(str(source), out, img_size=32)
    assert json.loads((out / MARKER).read_text())['files'] == ['README.md', 'config.json', 'model.safetensors',
                                                               'verify.json']
    convert(str(source), out, img_size=32, force=True)  # ours: replaced
    (out / 'my_notes.txt').write_text('mine')  # a file the user added is not ours to delete
    assert main(['convert', str(source), '--out', str(out), '--force', '--img-size', '32']) == 2
    assert 'did not write (my_notes.txt)' in capsys.readouterr().err
    assert (out / 'my_notes.txt').read_text() == 'mine'
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'thesis.tex').write_text('years of work')
    assert main(['convert', str(source), '--out', str(mine), '--force', '--img-size', '32']) == 2
    assert f'was not written by timm-momentum (it has no {MARKER})' in capsys.readouterr().err
    assert (mine / 'thesis.tex').read_text() == 'years of work'
    (tmp_path / 'file').write_text('mine')
    assert main(['convert', str(source), '--out', str(tmp_path / 'file'), '--force']) == 2
    assert 'exists and is not a folder' in capsys.readouterr().err and (tmp_path / 'file').read_text() == 'mine'


def test_force_replaces_a_folder_an_earlier_convert_wrote_without_the_marker(tmp_path):
    source = _source(tmp_path / 'src')
    out = tmp_path / 'out'
    convert(str(source), out, img_size=32)
    (out / MARKER).unlink()  # as the converter wrote folders before the marker
    convert(str(source), out, img_size=32, force=True)
    assert (out / MARKER).exists()
    (out / MARKER).unlink()
    config = json.loads((out / 'config.json').read_text())
    config['provenance']['converter'] = 'someone else'
    (out / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ConversionError, match='not written by timm-momentum'):
        convert(str(source), out, img_size=32, force=True)


def test_a_second_convert_to_the_same_folder_stops_with_a_message(tmp_path, capsys):
    source = _source(tmp_path / 'src')
    out = tmp_path / 'out'
    with folder_lock(out, 'timm-momentum convert'):  # what a running convert holds
        live_temp = tmp_path / '.out.tmp-live'
        live_temp.mkdir()  # the running convert's folder in the making
        assert main(['convert', str(source), '--out', str(out), '--img-size', '32']) == 2
        err = capsys.readouterr().err
        assert 'is being written by another process (timm-momentum convert, pid' in err and 'Traceback' not in err
        assert live_temp.is_dir()
    assert not (tmp_path / '.out.lock').exists()
    convert(str(source), out, img_size=32)  # the lock went with its holder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.out.')]


@pytest.mark.parametrize('dtype', [torch.int32, torch.bool, torch.complex64])
def test_weights_that_are_not_floating_point_are_refused(tmp_path, capsys, dtype):
    state = timm.create_model('resnet18', num_classes=3).state_dict()
    state = {k: v if k.endswith('num_batches_tracked') else v.to(dtype) for k, v in state.items()}
    torch.save(state, tmp_path / 'w.pth')
    assert main(['convert', str(tmp_path / 'w.pth'), '--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert f"entry 'conv1.weight' has dtype {dtype}" in err and 'floating point' in err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('kind', ['meta', 'sparse'])
def test_meta_and_sparse_tensors_are_refused(tmp_path, capsys, kind):
    state = timm.create_model('resnet18', num_classes=3).state_dict()
    weight = state['fc.weight']
    state['fc.weight'] = torch.empty(weight.shape, device='meta') if kind == 'meta' else weight.to_sparse()
    torch.save(state, tmp_path / 'w.pth')
    assert main(['convert', str(tmp_path / 'w.pth'), '--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert "entry 'fc.weight' is a" in err and ('meta tensor' in err or 'sparse' in err) and 'Traceback' not in err


@pytest.mark.parametrize('input_size, message', [
    ('3x224x224', 'input_size must be [channels, height, width] of positive integers'),
    (224, 'input_size must be [channels, height, width]'),
    ([3, -5, -5], 'of positive integers'),
    ([3, 40000, 40000], 'has a side over 2048 px'),
])
def test_bad_input_size_in_the_source_config_is_one_line(tmp_path, capsys, input_size, message):
    _source(tmp_path / 'src', 'model.safetensors')
    (tmp_path / 'src' / 'config.json').write_text(json.dumps({'pretrained_cfg': {'input_size': input_size}}))
    assert main(['convert', f"local-dir:{tmp_path / 'src'}", '--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_an_image_size_too_large_to_verify_on_is_refused_before_the_source_is_read(tmp_path, capsys):
    assert main(['convert', str(tmp_path / 'absent.pth'), '--out', str(tmp_path / 'out'), '--img-size', '40000']) == 2
    assert 'img_size 40000 has a side over 2048 px' in capsys.readouterr().err


def test_an_unknown_timm_tag_is_one_line(tmp_path, capsys):
    assert main(['convert', 'resnet18.bogus', '--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert 'resnet18.bogus: timm has no pretrained weights under this tag' in err and 'resnet18.a1_in1k' in err


def test_the_weights_only_refusal_does_not_advise_running_the_code(tmp_path, capsys):
    class RunsCode:
        def __reduce__(self):
            return print, ('ran',)

    torch.save({'conv1.weight': RunsCode()}, tmp_path / 'code.pth')
    assert main(['convert', str(tmp_path / 'code.pth'), '--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert 'holds objects other than tensors' in err and 'print' in err
    assert 'False' not in err and 'trust' not in err and 'add_safe_globals' not in err


def test_a_lock_that_cannot_be_written_is_exit_2_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    source = _source(tmp_path / 'src')
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith('.lock'):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, 'open', read_only)
    assert main(['convert', str(source), '--out', str(tmp_path / 'new' / 'out'), '--img-size', '32']) == 2
    err = capsys.readouterr().err
    assert 'read-only file system' in err and 'nothing was written' in err and 'Traceback' not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['src']
