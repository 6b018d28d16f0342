"""Where timm models go, momentum models go too: gamma travels with the weights (state dicts, a bare
model.safetensors, train.py checkpoints), transformers loads the folders, timm's scripts run through the wrapper,
torch.hub loads from a clone, and exports say how training preprocessed and labelled. All offline."""
import argparse
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import timm_momentum
from timm_momentum import RECORD_KEYS, read_record, resnet_state_dict
from timm_momentum.tools.convert import convert
from timm_momentum.tools.errors import ConfigError
from timm_momentum.tools.finetune import DEFAULTS, train
from timm_momentum.tools.loading import from_folder

ROOT = Path(__file__).parent.parent
REVISION = 'b' * 40


def _model(gamma=None, num_classes=3, **kwargs):
    torch.manual_seed(0)
    kwargs = dict(kwargs, **({} if gamma is None else {'gamma': gamma}))
    return timm.create_model('momentum_resnet18', num_classes=num_classes, zero_init_last=False, **kwargs).eval()


def _logits(model, size=32, in_chans=3):
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(2, in_chans, size, size))


# --- gamma travels with the weights -------------------------------------------------------------------------------

def test_the_state_dict_records_gamma_and_block_fn_after_the_resnet_keys():
    model = _model(gamma=[0.0, 0.5, 0.6, 0.7])
    state = model.state_dict()
    assert list(state)[-2:] == list(RECORD_KEYS)
    assert read_record(state) == {'gamma': [0.0, 0.5, 0.6, 0.7], 'block_fn': 'dropin'}
    assert state['momentum_gamma'].dtype == torch.float64
    model.half()  # buffers are cast, the record is not: it comes from the exact values
    assert read_record(model.state_dict())['gamma'] == [0.0, 0.5, 0.6, 0.7]
    paper = timm.create_model('momentum_mresnet18', num_classes=3)
    assert read_record(paper.state_dict())['block_fn'] == 'paper'


def test_loading_takes_the_recorded_gamma_unless_one_was_given():
    trained = _model(gamma=0.5)
    state = trained.state_dict()
    fresh = _model()  # no gamma given: the default 0.9, replaced by what the weights record
    assert fresh.momentum_cfg['gamma'] == [0.9] * 4
    fresh.load_state_dict(state)
    assert fresh.momentum_cfg['gamma'] == [0.5] * 4 and torch.equal(_logits(fresh), _logits(trained))
    given = _model(gamma=0.8)
    with pytest.warns(UserWarning, match=r'trained at gamma \[0.5, 0.5, 0.5, 0.5\].*but gamma \[0.8, 0.8, 0.8, 0.8\] '
                                         r'was given; keeping'):
        given.load_state_dict(state)
    assert given.momentum_cfg['gamma'] == [0.8] * 4
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the same gamma given: nothing to warn about
        _model(gamma=0.5).load_state_dict(state)
    # a paper-block checkpoint into a model left at its default block function takes 'paper'
    paper = timm.create_model('momentum_mresnet18', num_classes=3, gamma=0.5)
    dropin = timm.create_model('momentum_resnet18', num_classes=3)
    dropin.load_state_dict(paper.state_dict())
    assert dropin.momentum_cfg['block_fn'] == 'paper' and dropin.momentum_cfg['gamma'] == [0.5] * 4


def test_a_plain_resnet_state_dict_loads_strictly_and_keeps_the_settings():
    plain = timm.create_model('resnet18', num_classes=3)
    model = _model(gamma='auto')
    model.load_state_dict(plain.state_dict(), strict=True)
    assert model.momentum_cfg['gamma'] == [0.0] * 4
    # the other way, the record must go: a plain ResNet computes the momentum net only at gamma 0, drop-in
    with pytest.raises(RuntimeError, match='momentum_gamma'):
        plain.load_state_dict(model.state_dict())
    plain.load_state_dict(resnet_state_dict(model.state_dict()))
    assert torch.equal(_logits(plain), _logits(model))


def test_a_malformed_record_is_an_error_naming_it():
    state = _model().state_dict()
    with pytest.raises(RuntimeError, match='layer2: .*gamma must be in'):
        _model().load_state_dict({**state, 'momentum_gamma': torch.tensor([0.5, 1.5, 0.0, 0.0], dtype=torch.float64)})
    with pytest.raises(RuntimeError, match='momentum_gamma: the recorded gamma must be 4'):
        _model().load_state_dict({**state, 'momentum_gamma': torch.tensor([0.5], dtype=torch.float64)})
    with pytest.raises(RuntimeError, match="momentum_block_fn: .*one of \\['dropin', 'paper'\\]"):
        _model().load_state_dict({**state, 'momentum_block_fn': torch.tensor(list(b'nope\0\0\0\0'), dtype=torch.uint8)})
    # a recorded gamma the model cannot invert in memory-efficient mode says so
    long_chain = timm.create_model('momentum_resnet101', num_classes=3, gamma=0.0)
    with pytest.raises(RuntimeError, match='which this model cannot take: layer3: gamma=0.0 cannot be inverted'):
        timm.create_model('momentum_resnet101', num_classes=3, memory_efficient=True).load_state_dict(
            long_chain.state_dict())


def test_a_bare_model_safetensors_remembers_its_gamma(tmp_path):
    folder = tmp_path / 'folder'
    trained = _model(gamma=[0.0, 0.5, 0.5, 0.6])
    from timm_momentum.tools.convert import write_model_folder
    write_model_folder(folder, trained, {'gamma': trained.momentum_cfg['gamma']}, {'input_size': (3, 32, 32)})
    with safe_open(str(folder / 'model.safetensors'), 'pt') as f:
        metadata = f.metadata()
    assert json.loads(metadata['momentum_gamma']) == [0.0, 0.5, 0.5, 0.6]
    assert metadata['momentum_block_fn'] == 'dropin' and metadata['architecture'] == 'momentum_resnet18'
    # timm's pretrained_cfg_overlay file= path reads only the tensors: the record in them sets gamma
    loaded = timm.create_model('momentum_resnet18', pretrained=True, num_classes=3,
                               pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors'), num_classes=3))
    assert loaded.momentum_cfg['gamma'] == [0.0, 0.5, 0.5, 0.6]
    assert torch.equal(_logits(loaded), _logits(trained))
    # and timm's load_checkpoint, as validate.py uses it
    from timm.models import load_checkpoint
    again = _model()
    load_checkpoint(again, str(folder / 'model.safetensors'))
    assert again.momentum_cfg['gamma'] == [0.0, 0.5, 0.5, 0.6]


# --- train.py, validate.py and the converter ----------------------------------------------------------------------

# What timm's train.py does with a model: create_model by name with --model-kwargs, a few optimizer steps, a
# checkpoint as its CheckpointSaver writes it (args as an argparse.Namespace). validate.py then creates the model
# by name without the training kwargs and loads the checkpoint with timm's load_checkpoint.
TRAIN_SCRIPT = '''
import argparse, sys
import timm, torch
from timm.models import load_checkpoint
from timm.utils import ParseKwargs

parser = argparse.ArgumentParser()
parser.add_argument('--model')
parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
parser.add_argument('--output')
parser.add_argument('--validate', action='store_true')
args = parser.parse_args()
torch.manual_seed(0)
x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
if args.validate:
    model = timm.create_model(args.model, num_classes=3)
    load_checkpoint(model, args.output)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        gamma = model.momentum_cfg['gamma']
        model.set_momentum(gamma=0.9)  # what validate.py ran at before the weights recorded their gamma
        torch.save({'gamma': gamma, 'logits': logits, 'at_0.9': model(x)}, args.output + '.val')
    sys.exit(0)
model = timm.create_model(args.model, num_classes=3, zero_init_last=False, **args.model_kwargs)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
model.train()
for _ in range(2):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
torch.save({'epoch': 0, 'arch': args.model, 'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'version': 2, 'args': args, 'metric': 0.5}, args.output)
model.eval()
with torch.no_grad():
    torch.save({'logits': model(x)}, args.output + '.train')
'''


def _run_wrapped(tmp_path, *args):
    script = tmp_path / 'train_like.py'
    script.write_text(TRAIN_SCRIPT)
    return subprocess.run([sys.executable, '-m', 'timm_momentum.tools.run', str(script), *args], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)


def test_the_wrapper_runs_train_and_validate_and_the_trained_gamma_comes_back(tmp_path):
    checkpoint = tmp_path / 'model_best.pth.tar'
    trained = _run_wrapped(tmp_path, '--model', 'momentum_resnet18', '--model-kwargs', 'memory_efficient=True',
                           'gamma=0.5', '--output', str(checkpoint))
    assert trained.returncode == 0, trained.stderr
    validated = _run_wrapped(tmp_path, '--model', 'momentum_resnet18', '--output', str(checkpoint), '--validate')
    assert validated.returncode == 0, validated.stderr
    result = torch.load(str(checkpoint) + '.val')
    assert result['gamma'] == [0.5] * 4  # not the default 0.9
    assert torch.allclose(result['logits'], torch.load(str(checkpoint) + '.train')['logits'], atol=1e-6)
    assert (result['at_0.9'] - result['logits']).abs().max() > 1e-2  # so gamma matters to these logits
    # the converter reads the same checkpoint (its args are an argparse.Namespace) at its recorded gamma
    folder = convert(str(checkpoint), tmp_path / 'converted', img_size=32).out_dir
    config = json.loads((folder / 'config.json').read_text())
    assert config['model_args']['gamma'] == [0.5] * 4 and config['provenance']['layout'] == 'timm-momentum'
    verify = json.loads((folder / 'verify.json').read_text())
    assert verify['drift_at_gamma']['max_abs_logit_diff'] == 0.0 and verify['source']['gamma'] == [0.5] * 4
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), result['logits'], atol=1e-6)
    with pytest.raises(Exception, match='records the gamma it was trained at, 0.5'):
        convert(str(checkpoint), tmp_path / 'other', img_size=32, source_gamma=0.9)


def test_the_converter_takes_train_py_kwargs_where_the_state_dict_records_nothing(tmp_path):
    model = _model(gamma=0.6)
    args = argparse.Namespace(model='momentum_resnet18', model_kwargs={'gamma': 0.6})
    torch.save({'state_dict': resnet_state_dict(model.state_dict()), 'args': args, 'arch': 'momentum_resnet18'},
               tmp_path / 'older.pth.tar')
    result = convert(str(tmp_path / 'older.pth.tar'), tmp_path / 'out', img_size=32)
    assert result.model_args['gamma'] == [0.6] * 4 and result.verify['drift_at_gamma']['max_abs_logit_diff'] == 0.0


def test_the_wrapper_says_what_is_wrong(tmp_path):
    missing = subprocess.run([sys.executable, '-m', 'timm_momentum.tools.run', str(tmp_path / 'nope.py')],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and 'no such script' in missing.stderr
    script = tmp_path / 'unknown.py'
    script.write_text("import timm\ntimm.create_model('momentum_resnet19')\n")
    unknown = subprocess.run([sys.executable, '-m', 'timm_momentum.tools.run', str(script)], capture_output=True,
                             text=True, timeout=120)
    assert unknown.returncode != 0 and 'needs a newer timm-momentum' in unknown.stderr
    exits = tmp_path / 'exits.py'
    exits.write_text("import sys, timm\nassert 'momentum_resnet50' in timm.list_models('momentum_*')\n"
                     "assert sys.argv[1:] == ['--flag', 'x']\nsys.exit(3)\n")
    ran = subprocess.run([sys.executable, '-m', 'timm_momentum.tools.run', str(exits), '--flag', 'x'], capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 3, ran.stderr


# --- transformers ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    """A tiny fine-tuning run on three digit classes, at gamma 0.5: its best/ and final/ folders."""
    out = tmp_path_factory.mktemp('digits') / 'run'
    cfg = dict(DEFAULTS, model='momentum_resnet18', dataset='sklearn/digits', classes=[3, 5, 7], img_size=16,
               batch_size=32, epochs=1, opt='adamw', lr=2e-3, progress=False, plots=False, gamma=0.5,
               memory_efficient=True, output=str(out))
    train(cfg)
    return out


def test_finetune_exports_describe_their_own_preprocessing_and_labels(digits_run):
    for name in ('best', 'final'):
        config = json.loads((digits_run / name / 'config.json').read_text())
        cfg = config['pretrained_cfg']
        assert cfg['mean'] == [0.5] * 3 and cfg['std'] == [0.5] * 3  # DigitsDataset's, not ImageNet's
        assert cfg['input_size'] == [3, 16, 16] and cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear'
        assert config['label_names'] == ['3', '5', '7'] and config['num_classes'] == 3
        assert config['model_args']['gamma'] == [0.5] * 4 and 'num_classes' not in config['model_args']
        assert 'memory_efficient' not in config['model_args']  # how it trained, not what it is
        for key in ('global_pool', 'num_features'):
            assert key in config
        for key in ('fixed_input_size', 'custom_load', 'pool_size', 'first_conv', 'classifier'):
            assert key in cfg
        assert 'pipeline_tag: image-classification' in (digits_run / name / 'README.md').read_text()
    # timm's data config, as validate.py resolves it, is the one training used
    model = timm.create_model(f'local-dir:{digits_run / "final"}', pretrained=True)
    data = timm.data.resolve_data_config({}, model=model)
    assert tuple(data['mean']) == (0.5,) * 3 and tuple(data['input_size']) == (3, 16, 16) and data['crop_pct'] == 1.0


def test_transformers_loads_converted_and_finetuned_folders(tmp_path, digits_run):
    transformers = pytest.importorskip('transformers')
    from PIL import Image

    state = timm.create_model('resnet18', num_classes=3, zero_init_last=False).state_dict()
    save_file(state, tmp_path / 'r18.safetensors')
    converted = convert(str(tmp_path / 'r18.safetensors'), tmp_path / 'converted', img_size=32,
                        gamma=[0.0, 0.5, 0.5, 0.6]).out_dir
    for folder, size in ((converted, 32), (digits_run / 'best', 16), (digits_run / 'final', 16)):
        ours = timm.create_model(f'local-dir:{folder}', pretrained=True)
        theirs = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
        assert theirs.timm_model.momentum_cfg['gamma'] == ours.momentum_cfg['gamma']
        torch.manual_seed(0)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(theirs(pixel_values=x).logits, ours.eval()(x))
    classify = transformers.pipeline('image-classification', model=str(digits_run / 'final'))
    answer = classify(Image.new('RGB', (40, 40), (200, 200, 200)))
    assert sorted(a['label'] for a in answer) == ['3', '5', '7']  # real class names, not LABEL_0


def test_transformers_and_timm_load_a_pushed_repo_from_the_cache(tmp_path, digits_run, monkeypatch):
    transformers = pytest.importorskip('transformers')
    cache = tmp_path / 'hub'
    repo = cache / 'models--org--digits-momentum'
    snapshot = repo / 'snapshots' / REVISION
    snapshot.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(REVISION)
    for name in ('config.json', 'model.safetensors', 'README.md'):
        (snapshot / name).write_bytes((digits_run / 'final' / name).read_bytes())
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    ours = timm.create_model('hf-hub:org/digits-momentum', pretrained=True).eval()
    theirs = transformers.AutoModelForImageClassification.from_pretrained('org/digits-momentum',
                                                                          cache_dir=str(cache)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(theirs(pixel_values=x).logits, ours(x))
    assert ours.momentum_cfg['gamma'] == [0.5] * 4 and theirs.config.id2label == {0: '3', 1: '5', 2: '7'}


# --- torch.hub and errors that name the fix -------------------------------------------------------------------------

def test_torch_hub_loads_from_a_clone(tmp_path, digits_run):
    # what torch.hub.list finds on GitHub: hubconf.py's public callables (list itself takes no local source)
    import importlib.util
    spec = importlib.util.spec_from_file_location('hubconf', ROOT / 'hubconf.py')
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith('_')]
    assert set(entries) == {'from_folder', *timm.list_models('momentum_*')}
    assert hubconf.dependencies == ['torch', 'timm']
    model = torch.hub.load(str(ROOT), 'momentum_resnet18', source='local', num_classes=3, gamma=0.5)
    assert model.num_classes == 3 and model.momentum_cfg['gamma'] == [0.5] * 4
    folder = torch.hub.load(str(ROOT), 'from_folder', str(digits_run / 'final'), source='local')
    reference = timm.create_model(f'local-dir:{digits_run / "final"}', pretrained=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(folder.eval()(x), reference.eval()(x))


def test_unknown_architectures_name_the_fix(tmp_path):
    folder = tmp_path / 'newer'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps({'architecture': 'momentum_resnet19', 'num_classes': 3,
                                                    'pretrained_cfg': {}}))
    with pytest.raises(ConfigError, match=r"momentum_resnet19.*import timm_momentum.*needs a newer timm-momentum"):
        from_folder(folder)
    (folder / 'config.json').write_text(json.dumps({'architecture': 'notanet9', 'pretrained_cfg': {}}))
    with pytest.raises(ConfigError, match=r'knows no model .notanet9.*pip install -U timm'):
        from_folder(folder)
    with pytest.raises(ConfigError, match='no such folder'):
        from_folder(tmp_path / 'absent')
    with pytest.raises(ConfigError, match='model: .*momentum_resnet19.*newer timm-momentum'):
        (folder / 'config.json').write_text(json.dumps({'architecture': 'momentum_resnet19', 'pretrained_cfg': {}}))
        train(dict(DEFAULTS, model=f'local-dir:{folder}', dataset='sklearn/digits', output=str(tmp_path / 'run')))
    assert timm_momentum.__version__  # the message names this version


def test_label_names_of_image_folders_follow_their_class_indices(tmp_path):
    from PIL import Image
    from timm.data import create_dataset

    from timm_momentum.tools.data import DigitsDataset, label_names
    for name in ('zebra', 'ant', 'moth'):
        (tmp_path / name).mkdir()
        Image.new('RGB', (8, 8)).save(tmp_path / name / 'a.png')
    folder = create_dataset('', root=str(tmp_path))
    assert label_names(folder) == ['ant', 'moth', 'zebra']  # timm sorts class folders by name
    assert label_names(DigitsDataset('validation', classes=[9, 2], img_size=8)) == ['9', '2']
    assert label_names(torch.utils.data.TensorDataset(torch.zeros(2, 3))) is None


def test_finetune_starts_from_a_train_py_checkpoint_at_its_gamma(tmp_path):
    import yaml

    trained = _model(gamma=0.6, num_classes=2)
    args = argparse.Namespace(model='momentum_resnet18', model_kwargs={'gamma': 0.6}, lr=0.1)
    torch.save({'epoch': 3, 'arch': 'momentum_resnet18', 'state_dict': trained.state_dict(), 'args': args},
               tmp_path / 'model_best.pth.tar')
    cfg = dict(DEFAULTS, model='momentum_resnet18', dataset='sklearn/digits', classes=[0, 1], img_size=16,
               batch_size=32, epochs=1, progress=False, plots=False, checkpoints=False,
               initial_checkpoint=str(tmp_path / 'model_best.pth.tar'), output=str(tmp_path / 'run'))
    result = train(cfg)
    assert result['model'].momentum_cfg['gamma'] == [0.6] * 4  # the checkpoint's, not the from-scratch 0.9
    assert yaml.safe_load((tmp_path / 'run' / 'args.yaml').read_text())['gamma'] == [0.6] * 4
