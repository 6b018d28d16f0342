"""Memory targets of memory-efficient mode, and the measures themselves (benchmarks/MEASURE.md)."""
import pytest
import torch

from timm_momentum.tools.memory import (MiB, build_model, peak_step_memory, reset_peak_rss, saved_tensor_bytes,
                                  vm_hwm_bytes)


def _activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes saved for backward, less the classifier weight that autograd keeps by reference."""
    return saved_tensor_bytes(model, x) - model.fc.weight.untyped_storage().nbytes()


def test_saved_bytes_do_not_grow_with_depth():
    x = torch.randn(2, 3, 64, 64)
    saved = {depth: saved_tensor_bytes(build_model(f'momentum_resnet{depth}', 'memory_efficient'), x)
             for depth in (50, 152)}
    activations = {depth: _activation_bytes(build_model(f'momentum_resnet{depth}', 'memory_efficient'), x)
                   for depth in (50, 152)}
    plain = saved_tensor_bytes(build_model('resnet152', 'plain'), x)
    print(f'saved MiB: momentum 50 {saved[50] / MiB:.2f}, 152 {saved[152] / MiB:.2f}; plain 152 {plain / MiB:.1f}')
    assert saved[152] <= 1.1 * saved[50]
    assert activations[152] <= 1.1 * activations[50]
    assert saved[152] < 0.1 * plain


def test_standard_mode_saves_what_resnet_saves():
    x = torch.randn(2, 3, 64, 64)
    momentum = saved_tensor_bytes(build_model('momentum_resnet50', 'plain'), x)
    resnet = saved_tensor_bytes(build_model('resnet50', 'plain'), x)
    assert resnet <= momentum <= 1.3 * resnet  # the rule adds only the velocity and position sums


def test_peak_step_memory_against_plain_and_checkpointing():
    # the setting: one SGD training step at batch 16, 224x224, fresh subprocesses on CPU
    plain = peak_step_memory('resnet101', 'plain', batch_size=16, img_size=224)
    checkpointing = peak_step_memory('resnet101', 'checkpoint', batch_size=16, img_size=224)
    momentum = peak_step_memory('momentum_resnet101', 'memory_efficient', batch_size=16, img_size=224)
    print(f'peak MiB: plain {plain / MiB:.0f}, timm checkpointing {checkpointing / MiB:.0f}, '
          f'momentum memory-efficient {momentum / MiB:.0f} ({momentum / plain:.3f}x plain)')
    assert momentum <= 0.4 * plain
    assert momentum < checkpointing


def test_peak_step_memory_rejects_bad_mode_and_amp_before_starting_a_subprocess():
    with pytest.raises(ValueError, match="amp must be one of \\['bf16', 'fp16'\\]"):
        peak_step_memory('resnet18', 'plain', amp='fp8')
    with pytest.raises(ValueError, match='mode must be one of plain, checkpoint'):
        peak_step_memory('resnet18', 'fastest')


def test_peak_rss_resets_after_a_warm_up():
    import mmap

    reset_peak_rss()  # this process's earlier peak (other tests) would hide the 64 MiB below
    before = vm_hwm_bytes()
    # fresh pages from the kernel, written so they are resident: a tensor could reuse pages the allocator kept
    # resident from earlier tests, which raise no peak (CI saw that once)
    block = mmap.mmap(-1, 64 * MiB)
    for offset in range(0, 64 * MiB, mmap.PAGESIZE):
        block[offset] = 1
    block.close()
    assert vm_hwm_bytes() >= before + 60 * MiB
    reset_peak_rss()
    assert vm_hwm_bytes() < before + 60 * MiB  # what compiling a model leaves behind is not a step's peak

