"""What the faithful policy's gamma = 0 on a 5-block chain costs: bytes saved for backward in memory-efficient
mode at gamma='auto' against gamma=0.9, float32 and bfloat16 autocast, for resnet34/50 (whose 5-block layer3 keeps
its inputs at gamma 0) and resnet101 (whose policy inverts), at several input sizes. Deterministic counts.

    python benchmarks/zero_gamma_bytes.py
"""
import timm
import torch

import timm_momentum  # noqa: F401
from timm_momentum.tools.memory import saved_tensor_bytes

SIZES = ((32, 16), (64, 16), (224, 8), (512, 2))  # (input size, batch)


def main() -> int:
    print('| model | γ under auto | input, batch | fp32: auto / 0.9 | bf16: auto / 0.9 |')
    print('|---|---|---|---|---|')
    for name in ('momentum_resnet34', 'momentum_resnet50', 'momentum_resnet101'):
        models = {g: timm.create_model(name, gamma=g, memory_efficient=True).train() for g in (0.9, 'auto')}
        for size, batch in SIZES:
            x = torch.randn(batch, 3, size, size)
            ratios = []
            for amp in (False, True):
                with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                    counts = {g: saved_tensor_bytes(m, x) for g, m in models.items()}
                ratios.append(counts['auto'] / counts[0.9])
            print(f"| {name} | {tuple(models['auto'].momentum_cfg['gamma'])} | {size}², {batch} | "
                  f'{ratios[0]:.4f} | {ratios[1]:.4f} |', flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
