"""CUDA-only checks, run by benchmarks/gpu_check.sh on a device machine. The same code paths have CPU
tests in test_invertible.py; CI has no GPU, so these skip there."""
import copy

import pytest
import timm
import torch

from conftest import relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def _grads(model, x, seed=0):
    torch.manual_seed(seed)
    out = model(x)
    out.float().logsumexp(-1).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize('dtype', [None, torch.bfloat16, torch.float16])
def test_cuda_gradients_match_standard_backprop(dtype):
    standard = timm.create_model('momentum_resnet50', drop_path_rate=0.2, zero_init_last=False).cuda()
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    x = torch.randn(8, 3, 64, 64, device='cuda')
    results = []
    for model in (standard, efficient):
        with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None):
            results.append(_grads(model, x))
    (out_s, g_s), (out_e, g_e) = results
    assert torch.isfinite(out_e).all()
    tol = 1e-4 if dtype is None else 8 * torch.finfo(dtype).eps
    assert relative_error(out_e, out_s) <= tol
    assert max(relative_error(a, b) for a, b in zip(g_e, g_s)) <= max(tol, 1e-4)
    for (name, a), b in zip(standard.named_buffers(), efficient.buffers()):
        if name.endswith('num_batches_tracked'):
            assert torch.equal(a, b)


def test_cuda_memory_efficient_uses_less_memory():
    def peak(memory_efficient):
        model = timm.create_model('momentum_resnet101', memory_efficient=memory_efficient).cuda()
        x = torch.randn(16, 3, 224, 224, device='cuda')
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            model(x).float().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    assert peak(True) <= 0.4 * peak(False)


def test_largest_batch_search_stops_at_its_cap():
    from timm_momentum.tools.bench import largest_batch
    found = largest_batch('resnet18', 'plain', 32, 'bf16', limit=48, seconds=60)
    assert found['max_batch'] == 48 and found['max_batch_search'] == 'capped at 48'
    assert found['throughput_batch'] == 48 and found['throughput_img_s'] > 0


def test_cuda_bench_measures_compiled_rows_in_process():
    from timm_momentum.tools.bench import run_benchmark
    results = run_benchmark(['momentum_resnet18'], batch_size=4, img_size=32, device='cuda', amp='bf16',
                            time_batch_size=4, warmup=1, steps=2, max_batch=False, compiled=['standard'],
                            compile_backend='aot_eager')
    by = {r['config']: r for r in results['rows']}
    assert all('failed' not in r for r in results['rows'] if r['config'] != 'official momentumnet')
    assert by['momentum, compiled']['peak_bytes'] > 0 and by['momentum memory-efficient']['peak_bytes'] > 0
