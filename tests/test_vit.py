"""Momentum Vision Transformers: timm's ViT with its blocks as one momentum chain (issue 23).

Small ViTs (32x32 images, 8x8 patches, 16 tokens and a class token, depth <= 8) keep these fast on CPU.
"""
import copy
from unittest import mock

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from timm_momentum import RECORD_KEYS, source_state_dict
from timm_momentum.core import chain
from timm_momentum.core.chain import faithful_gamma
from timm_momentum.core.models import MomentumBlocks, MomentumVisionTransformer, vit_family
from timm_momentum.tools.memory import saved_tensor_bytes

from conftest import relative_error
from test_loading import hub_cache  # noqa: F401  (a fixture)

SOURCE = 'vit_tiny_patch16_224'
NAME = 'momentum_' + SOURCE
SMALL = dict(img_size=32, patch_size=8, num_classes=5)


def _pair(depth: int = 4, **kwargs):
    """A small timm ViT and its momentum ViT with the same weights."""
    source = timm.create_model(SOURCE, depth=depth, **SMALL, **{k: v for k, v in kwargs.items()
                                                                if k not in ('gamma', 'block_fn', 'memory_efficient')})
    model = timm.create_model(NAME, depth=depth, **SMALL, **kwargs)
    model.load_state_dict(source.state_dict(), strict=False)
    return source, model


def _grads(model: torch.nn.Module, x: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def test_the_family_is_timms_block_based_vits():
    sources = vit_family.source_architectures()
    assert SOURCE in sources and 'vit_base_patch16_384' in sources and len(sources) > 100
    assert all(NAME.replace(SOURCE, s) in timm.list_models('momentum_*') for s in sources)
    tags = timm.list_pretrained(NAME + '.*')
    assert tags and all(t.startswith(NAME + '.') for t in tags)
    assert len(tags) == len(timm.list_pretrained(SOURCE + '.*'))


@pytest.mark.parametrize('source, why', [('vit_base_patch16_rpn_224', 'ResPostBlock'),
                                         ('vit_small_patch16_18x2_224', 'ParallelThingsBlock'),
                                         ('resnet50', 'does not build with _create_vision_transformer'),
                                         ('no_such_vit', 'not a timm architecture')])
def test_an_architecture_outside_the_family_is_refused_by_name(source, why):
    with pytest.raises(ValueError, match=why):
        vit_family.check_source(source)


@pytest.mark.parametrize('block_fn', ['dropin', 'split'])
def test_gamma_zero_is_the_source_vit_with_its_keys_loaded_strictly(block_fn):
    source = timm.create_model(SOURCE, depth=3, **SMALL).eval()
    model = timm.create_model(NAME, depth=3, gamma=0.0, block_fn=block_fn, **SMALL).eval()
    assert isinstance(model, MomentumVisionTransformer) and isinstance(model, VisionTransformer)
    assert isinstance(model.blocks, MomentumBlocks)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and set(missing) <= set(RECORD_KEYS)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if block_fn == 'dropin':
            assert torch.equal(model(x), source(x))
        else:
            assert relative_error(model(x), source(x)) < 1e-6
    assert source_state_dict(model.state_dict()).keys() == source.state_dict().keys()
    timm.create_model(SOURCE, depth=3, **SMALL).load_state_dict(source_state_dict(model.state_dict()), strict=True)


def test_the_record_travels_with_the_state_dict_and_bad_values_are_named():
    model = timm.create_model(NAME, depth=2, gamma=0.5, block_fn='split', **SMALL)
    fresh = timm.create_model(NAME, depth=2, **SMALL)
    fresh.load_state_dict(model.state_dict())
    assert fresh.blocks.gamma == 0.5 and fresh.blocks.block_fn == 'split'
    state = model.state_dict()
    state['momentum_block_fn'] = torch.tensor(list(b'paper'), dtype=torch.uint8)  # a ResNet block function
    with pytest.raises(RuntimeError, match="block function must be the ASCII bytes of one of \\['dropin', 'split'\\]"):
        fresh.load_state_dict(state)
    state = model.state_dict()
    state['momentum_gamma'] = torch.tensor([1.5], dtype=torch.float64)
    with pytest.raises(RuntimeError, match='gamma for blocks'):
        fresh.load_state_dict(state)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="block_fn must be one of \\['dropin', 'split'\\]"):
        timm.create_model(NAME, depth=2, block_fn='paper', **SMALL)
    with pytest.raises(ValueError, match='gamma'):
        timm.create_model(NAME, depth=2, gamma=1.0, **SMALL)
    with pytest.raises(TypeError, match='memory_efficient must be True or False'):
        timm.create_model(NAME, depth=2, memory_efficient='yes', **SMALL)
    model = timm.create_model(NAME, depth=2, **SMALL)
    with pytest.raises(ValueError, match='block_fn must be one of'):
        model.set_momentum(gamma=0.5, block_fn='paper', memory_efficient=True)
    assert model.blocks.gamma == 0.9 and not model.blocks.memory_efficient  # nothing changed


def test_pretrained_loads_the_source_weights_strictly_at_the_faithful_gamma(tmp_path):
    source = timm.create_model(SOURCE, **SMALL)
    path = tmp_path / 'vit.pth'
    torch.save(source.state_dict(), path)
    model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    assert model.gamma_policy == 'auto' and model.blocks.gamma == faithful_gamma(12) == 0.63
    # every tensor unchanged but the classifier, which timm leaves new for another number of classes
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items() if k != 'head.weight')
    split = timm.create_model(NAME, pretrained=True, block_fn='split', pretrained_cfg_overlay=dict(file=str(path)),
                              **SMALL)
    assert split.blocks.gamma == faithful_gamma(24)


@pytest.mark.parametrize('block_fn', ['dropin', 'split'])
def test_memory_efficient_gradients_are_exact_with_dropout_and_drop_path(block_fn, standard_matches_memory_efficient):
    kwargs = dict(gamma=0.9, block_fn=block_fn, drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1)
    _, standard = _pair(depth=4, **kwargs)
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    x = torch.randn(3, 3, 32, 32)
    out_s, gx_s, gp_s = _grads(standard.train(), x)
    out_e, gx_e, gp_e = _grads(efficient.train(), x)
    assert torch.equal(out_s, out_e)  # the same dropout and drop-path masks, replayed in the recompute
    assert relative_error(gx_e, gx_s) < 1e-5
    assert max(relative_error(a, b) for a, b in zip(gp_e, gp_s)) < 1e-5
    _, _, gp_other = _grads(efficient, x, seed=1)  # and the masks are random: another seed, other gradients
    assert max(relative_error(a, b) for a, b in zip(gp_other, gp_s)) > 1e-3


def _activation_bytes(name: str, x: torch.Tensor, **kwargs) -> int:
    """Bytes saved for backward, less the parameters that autograd keeps by reference."""
    return saved_tensor_bytes(timm.create_model(name, **SMALL, **kwargs).train(), x, parameters=False)


def test_stored_bytes_are_flat_in_depth():
    x = torch.randn(2, 3, 32, 32)
    # (a chain of 2 stores its two float32 inputs, cheaper than the float64 state a longer one carries)
    saved = {depth: _activation_bytes(NAME, x, depth=depth, memory_efficient=True) for depth in (4, 12)}
    plain = _activation_bytes(SOURCE, x, depth=12)
    standard = _activation_bytes(NAME, x, depth=12)
    assert saved[12] <= 1.05 * saved[4]
    assert saved[12] < 0.05 * plain
    assert plain <= standard <= 1.3 * plain


def test_eval_and_no_grad_run_the_plain_loop():
    model = timm.create_model(NAME, depth=3, memory_efficient=True, **SMALL)
    x = torch.randn(2, 3, 32, 32)
    with mock.patch.object(chain._InvertibleMomentum, 'apply', wraps=chain._InvertibleMomentum.apply) as apply:
        with torch.no_grad():
            model.train()(x)
        model.eval()(x)
        assert apply.call_count == 0
        model.train()(x).sum().backward()
        assert apply.call_count == 1


def test_meta_device_and_torchscript():
    with torch.device('meta'):
        model = timm.create_model(NAME, depth=2, memory_efficient=True, **SMALL)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    x = torch.randn(2, 3, 32, 32)
    for block_fn in ('dropin', 'split'):
        model = timm.create_model(NAME, depth=2, block_fn=block_fn, **SMALL).eval()
        with torch.no_grad():
            assert torch.equal(torch.jit.script(model)(x), model(x))


def test_forward_intermediates_features_only_and_pruning():
    model = timm.create_model(NAME, depth=4, block_fn='split', **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, indices=[1, 3])
        assert torch.equal(final, model.forward_features(x))
        assert [tuple(y.shape) for y in intermediates] == [(2, 192, 4, 4)] * 2
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], intermediates[0])
        features = timm.create_model(NAME, depth=4, features_only=True, out_indices=(1, 3), block_fn='split', **SMALL)
        features.model.load_state_dict(model.state_dict(), strict=False)
        assert all(torch.equal(a, b) for a, b in zip(features.eval()(x), intermediates))
    model.prune_intermediate_layers(indices=[1], prune_head=True)
    assert len(model.blocks) == 2 and isinstance(model.blocks, MomentumBlocks)
    assert (model.blocks.gamma, model.blocks.block_fn) == (0.9, 'split')


def test_fx_feature_extraction_keeps_the_memory_efficient_backward():
    from timm.models import create_feature_extractor, get_graph_node_names

    model = timm.create_model(NAME, depth=3, memory_efficient=True, **SMALL).train()
    train_nodes, _ = get_graph_node_names(model)
    assert 'blocks' in train_nodes and not any(n.startswith('blocks.') for n in train_nodes)  # one leaf call
    extractor = create_feature_extractor(model, return_nodes={'norm': 'features', 'head': 'logits'})
    x = torch.randn(2, 3, 32, 32)
    with mock.patch.object(chain._InvertibleMomentum, 'apply', wraps=chain._InvertibleMomentum.apply) as apply:
        out = extractor(x)
        out['logits'].square().mean().backward()
        assert apply.call_count == 1
    traced = [p.grad for p in extractor.parameters()]
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    assert max(relative_error(a, p.grad) for a, p in zip(traced, model.parameters())) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize('memory_efficient', [False, True])
def test_torch_compile_trains_with_the_eager_gradients(memory_efficient):
    model = timm.create_model(NAME, depth=2, memory_efficient=memory_efficient, **SMALL).train()
    compiled = torch.compile(copy.deepcopy(model), backend='aot_eager', fullgraph=False)
    x = torch.randn(2, 3, 32, 32)
    _, _, eager = _grads(model, x)
    _, _, graph = _grads(compiled, x)
    assert max(relative_error(a, b) for a, b in zip(graph, eager)) < 1e-5


def test_a_timm_vit_tag_loads_from_the_hub_and_converts_at_the_faithful_gamma(hub_cache, tmp_path):
    """pretrained=True on a mirrored tag reads the source's Hub repo (a hand-built offline cache), and the converter
    takes the same tag, writes a folder timm and transformers load, and says what it did."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForImageClassification

    from test_loading import _add_repo
    from timm_momentum.tools.convert import convert

    tag = 'vit_tiny_patch16_224.augreg_in21k_ft_in1k'
    source = timm.create_model(SOURCE).eval()
    state = source.state_dict()
    _add_repo(hub_cache, timm.models.get_pretrained_cfg(tag).hf_hub_id,
              {'model.safetensors': lambda p: save_file(state, p)})
    model = timm.create_model('momentum_' + tag, pretrained=True).eval()
    assert model.gamma_policy == 'auto' and model.blocks.gamma == 0.63
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    result = convert(tag, tmp_path / 'out')
    assert result.arch == NAME and result.model_args['gamma'] == [0.63]
    assert result.verify['equivalence']['passed'] and result.verify['drift_at_gamma']['against'] == \
        f'the source ViT, run as timm {SOURCE}'
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert 'Momentum Vision Transformer' in card and 'momentum-vit' in card and 'source ResNet' not in card
    assert json.loads((tmp_path / 'out' / 'config.json').read_text())['architecture'] == NAME
    loaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    wrapped = AutoModelForImageClassification.from_pretrained(tmp_path / 'out').eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(wrapped(pixel_values=x).logits, model(x))


def test_a_vit_file_without_metadata_converts_by_its_keys_and_shapes(tmp_path):
    from safetensors.torch import save_file

    from timm_momentum.tools.convert import convert

    source = timm.create_model('vit_small_patch16_224', img_size=32, num_classes=7).eval()
    save_file(source.state_dict(), tmp_path / 'vit.safetensors')
    result = convert(str(tmp_path / 'vit.safetensors'), tmp_path / 'out', gamma=0.0)
    assert result.arch == 'momentum_vit_small_patch16_224'  # not flexivit_small: its grid has no class token
    assert result.model_args == {'num_classes': 7, 'img_size': 32, 'block_fn': 'dropin', 'gamma': [0.0]}
    loaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_the_converter_refuses_a_vit_outside_the_family_by_name(tmp_path):
    from timm_momentum.tools.convert import ConversionError, convert

    with pytest.raises(ConversionError, match='vit_base_patch16_rpn_224.*ResPostBlock'):
        convert('vit_base_patch16_rpn_224', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_a_momentum_vit_fine_tunes_memory_efficiently_and_its_export_loads_in_timm_and_transformers(tmp_path):
    from transformers import AutoModelForImageClassification

    from timm_momentum.tools.finetune import DEFAULTS, train

    result = train(dict(DEFAULTS, model=NAME, dataset='sklearn/digits', classes=[0, 1, 2], img_size=32,
                        batch_size=32, epochs=1, train_limit=96, val_limit=64, opt='adamw', lr=1e-3, gamma=0.9,
                        progress=False, plots=False, checkpoints=False, workers=0, output=str(tmp_path / 'run')))
    assert result['metrics']['epoch'] == 0
    final = tmp_path / 'run' / 'final'
    model = timm.create_model(f'local-dir:{final}', pretrained=True).eval()
    assert isinstance(model, MomentumVisionTransformer) and model.pretrained_cfg['architecture'] == NAME
    assert model.momentum_cfg['gamma'] == [0.9] and model.num_classes == 3
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)
    wrapped = AutoModelForImageClassification.from_pretrained(final).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(wrapped(pixel_values=x).logits, model(x))


# What timm's train.py and validate.py do with a ViT: train.py creates the model by name with --model-kwargs and
# saves a checkpoint as its CheckpointSaver does; validate.py creates it by name alone and loads that checkpoint
# with timm's load_checkpoint. Both run through timm_momentum.tools.run, as README says to run timm's scripts.
VIT_TRAIN_SCRIPT = '''
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
x, y = torch.randn(2, 3, 160, 160), torch.randint(0, 3, (2,))
if args.validate:
    model = timm.create_model(args.model, num_classes=3)
    load_checkpoint(model, args.output)
    with torch.no_grad():
        torch.save({'cfg': model.momentum_cfg, 'logits': model.eval()(x)}, args.output + '.val')
    sys.exit(0)
model = timm.create_model(args.model, num_classes=3, **args.model_kwargs).train()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(2):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
torch.save({'epoch': 0, 'arch': args.model, 'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'version': 2, 'args': args, 'metric': 0.5}, args.output)
with torch.no_grad():
    torch.save({'logits': model.eval()(x)}, args.output + '.train')
'''


def test_a_train_py_checkpoint_of_a_momentum_vit_validates_at_its_trained_settings(tmp_path):
    import subprocess
    import sys

    script = tmp_path / 'train_like.py'
    script.write_text(VIT_TRAIN_SCRIPT)
    checkpoint = tmp_path / 'model_best.pth.tar'

    def run(*args):
        done = subprocess.run([sys.executable, '-m', 'timm_momentum.tools.run', str(script), '--model',
                               'momentum_test_vit', '--output', str(checkpoint), *args], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr

    run('--model-kwargs', 'memory_efficient=True', 'gamma=0.7', 'block_fn=split')
    run('--validate')
    result = torch.load(str(checkpoint) + '.val')
    assert result['cfg']['gamma'] == [0.7] and result['cfg']['block_fn'] == 'split'  # not the defaults 0.9, dropin
    torch.testing.assert_close(result['logits'], torch.load(str(checkpoint) + '.train')['logits'], rtol=0, atol=1e-6)
