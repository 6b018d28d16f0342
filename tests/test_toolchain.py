"""The tools timm users train with: the meta device, TorchScript, fx feature extraction, torch.compile."""
import copy
import csv
import math
from pathlib import Path

import timm
import torch
import torch.nn as nn
from torchvision.models.feature_extraction import create_feature_extractor

import pytest

from timm_momentum.tools.finetune import load_config, train
from timm_momentum.core.chain import momentum_chain
from timm_momentum.tools.memory import saved_tensor_bytes
from timm_momentum.core.models.momentum_resnet import BLOCK_FNS

from conftest import relative_error

CONFIGS = Path(__file__).parent.parent / 'configs'


def _autograd_node_names(out: torch.Tensor):
    names, stack, seen = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize('name', ['momentum_resnet50', 'momentum_mresnet18_cifar'])
@pytest.mark.parametrize('memory_efficient', [False, True])
def test_meta_device_trains_with_grad(name, memory_efficient):
    # deferred-init tools build and run models on the meta device; autocast does not exist there
    with torch.device('meta'):
        model = timm.create_model(name, memory_efficient=memory_efficient).train()
        out = model(torch.randn(2, 3, 64, 64))
        out.sum().backward()
    assert out.device.type == 'meta' and out.shape == (2, model.num_classes)
    assert all(p.grad is not None for p in model.parameters())


def test_eval_with_grad_never_enters_the_autograd_function():
    model = timm.create_model('momentum_resnet50', memory_efficient=True).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    names = _autograd_node_names(model(x))
    assert not [n for n in names if 'Invertible' in n or 'Checkpoint' in n], names
    assert 'LerpBackward0' in names  # the plain momentum arithmetic, differentiated as usual


@pytest.mark.parametrize('name', ['momentum_resnet50', 'momentum_mresnet50'])
def test_plain_forward_is_the_chain_forward(name):
    # forward_plain spells the paper block function out again for TorchScript; it must not drift
    model = timm.create_model(name, gamma=0.8).eval()
    stage = model.layer3
    x = torch.randn(2, 512, 8, 8)
    with torch.no_grad():
        expected = momentum_chain(stage[0](x), list(stage)[1:], stage.gamma, BLOCK_FNS[stage.block_fn])
        assert torch.equal(stage.forward_plain(x), expected)


@pytest.mark.parametrize('name', ['momentum_resnet18', 'momentum_mresnet18_cifar'])
@pytest.mark.parametrize('memory_efficient', [False, True])
def test_torchscript_gives_the_eager_outputs(name, memory_efficient):
    model = timm.create_model(name, memory_efficient=memory_efficient).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(scripted(x), model(x))
    with torch.no_grad():
        assert torch.equal(scripted.forward_features(x), model.forward_features(x))


class _LastFeature(nn.Module):
    """Pooled last feature map of a feature extractor, so that saved_tensor_bytes can take a logsumexp."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.extractor(x)
        if isinstance(features, dict):
            features = features['layer4']
        elif isinstance(features, list):
            features = features[-1]
        return features.mean((2, 3))


def _extractors(memory_efficient: bool):
    torch.manual_seed(0)
    model = timm.create_model('momentum_resnet50', memory_efficient=memory_efficient).train()
    torchvision_fx = create_feature_extractor(model, ['layer2', 'layer4'])  # traces through the stages
    timm_fx = timm.create_model('momentum_resnet50', memory_efficient=memory_efficient, features_only=True,
                                feature_cls='fx').train()  # keeps the stages as leaf modules
    return model, torchvision_fx, timm_fx


def test_fx_feature_extractors_train_and_keep_the_memory_saving():
    x = torch.randn(2, 3, 64, 64)
    saved = {}
    for memory_efficient in (False, True):
        model, torchvision_fx, timm_fx = _extractors(memory_efficient)
        model.reset_classifier(0, '')  # the model's output is then layer4's feature map
        saved[memory_efficient] = {
            'eager': saved_tensor_bytes(_LastFeature(model), x),
            'torchvision': saved_tensor_bytes(_LastFeature(torchvision_fx), x),
            'timm': saved_tensor_bytes(_LastFeature(timm_fx), x),
        }
        features = timm_fx(x)
        sum(f.sum() for f in features).backward()
        assert all(p.grad is not None for p in timm_fx.parameters())
    model = timm.create_model('momentum_resnet50').train()
    stem_bytes = saved_tensor_bytes(_LastFeature(nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)), x)
    print(saved, stem_bytes)
    standard, efficient = saved[False], saved[True]
    assert standard['torchvision'] == standard['eager'] == standard['timm']
    # traced extractors keep the chains' and transitions' saving; only the stem, whose act1 output is a
    # feature node for timm, is stored rather than checkpointed
    assert efficient['torchvision'] == efficient['timm']
    assert efficient['eager'] < efficient['torchvision'] <= efficient['eager'] + stem_bytes
    assert efficient['torchvision'] < 0.1 * standard['torchvision']


def test_fx_extractor_gradients_match_the_eager_model():
    x = torch.randn(2, 3, 64, 64)
    model, torchvision_fx, _ = _extractors(memory_efficient=True)
    torch.manual_seed(1)
    model.forward_features(x).sum().backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    torchvision_fx(x)['layer4'].sum().backward()
    fx_grads = {name: p.grad for name, p in torchvision_fx.named_parameters() if p.grad is not None}
    assert fx_grads.keys() <= eager_grads.keys() and len(fx_grads) > 100
    for name, grad in fx_grads.items():
        assert torch.equal(grad, eager_grads[name]), name


def _graph_breaks(model: nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(x).graph_break_count


def test_graph_breaks():
    model = timm.create_model('momentum_resnet18', num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    # standard mode, with or without timm's checkpointing, and eval: one graph, nothing data-dependent
    assert _graph_breaks(model.train(), x) == 0
    model.set_grad_checkpointing()
    assert _graph_breaks(model, x) == 0
    assert _graph_breaks(model.eval(), x) == 0
    model.set_momentum(memory_efficient=True)
    assert _graph_breaks(model, x) == 0  # eval is plain in either memory mode
    # memory-efficient training: each of the 4 chains is one eager call (torch.compiler.disable), so dynamo
    # breaks the graph around it; it meets the first one twice, once while inlining the stage into the
    # model's frame and once more compiling the stage's own frame
    assert _graph_breaks(model.train(), x) == 4 + 1


@pytest.mark.parametrize('grad_checkpointing', [False, True])
def test_compiled_training_gives_the_eager_gradients(grad_checkpointing):
    # momentum_resnet50's layer3 chain (5 blocks, fp32) really inverts; aot_eager runs dynamo and
    # AOTAutograd as inductor does, without inductor's own rounding (measured apart: see the report)
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = timm.create_model('momentum_resnet50', memory_efficient=not grad_checkpointing, num_classes=10).train()
    eager.set_grad_checkpointing(grad_checkpointing)
    compiled = copy.deepcopy(eager)
    x = torch.randn(2, 3, 32, 32)
    torch.compile(compiled, backend='aot_eager')(x).square().mean().backward()
    eager(x).square().mean().backward()
    grads = {name: torch.cat([p.grad.flatten() for p in m.parameters()]) for name, m in
             (('eager', eager), ('compiled', compiled))}
    assert relative_error(grads['compiled'], grads['eager']) <= 1e-4
    # norm statistics updated once, as in eager
    assert torch.equal(compiled.layer3[3].bn1.num_batches_tracked, eager.layer3[3].bn1.num_batches_tracked)
    assert torch.allclose(compiled.layer3[3].bn1.running_var, eager.layer3[3].bn1.running_var)


def test_finetune_compiles_the_digits_config(tmp_path):
    # the digits demo's config (memory-efficient, gamma 0.9) with compile on, at a tiny size: inductor
    cfg = load_config(str(CONFIGS / 'digits_finetune.yaml'), [
        '--model', 'momentum_resnet18', '--pretrained', 'false', '--img-size', '16', '--epochs', '1',
        '--compile', 'true', '--progress', 'false', '--workers', '0', '--output', str(tmp_path / 'run')])
    torch._dynamo.reset()
    result = train(cfg)
    rows = list(csv.DictReader(open(result['output'] / 'metrics.csv')))
    assert len(rows) == 1 and math.isfinite(float(rows[0]['train_loss']))
    assert cfg['memory_efficient'] and cfg['compile']
