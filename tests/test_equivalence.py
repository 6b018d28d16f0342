"""With gamma = 0 the drop-in models are the source ResNet."""
import pytest
import timm
import torch


@pytest.mark.parametrize('depth', (18, 34, 50, 101, 152))
def test_gamma_zero_equals_timm_resnet(depth):
    reference = timm.create_model(f'resnet{depth}', num_classes=10, zero_init_last=False)
    model = timm.create_model(f'momentum_resnet{depth}', num_classes=10, gamma=0.0)
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    for mode in ('eval', 'train'):
        getattr(reference, mode)()
        getattr(model, mode)()
        assert (model(x) - reference(x)).abs().max().item() <= 1e-5, mode
    assert torch.equal(model.layer3[1].bn1.running_mean, reference.layer3[1].bn1.running_mean)


def test_gamma_zero_cannot_run_memory_efficient():
    with pytest.raises(ValueError, match='cannot be inverted'):
        timm.create_model('momentum_resnet101', gamma=0.0, memory_efficient=True)
    # a 5-block chain keeps its inputs at gamma 0 instead (20 bytes per element against an inverse's 16)
    timm.create_model('momentum_resnet50', gamma=0.0, memory_efficient=True)
