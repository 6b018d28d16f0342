"""Run a Python script with the momentum models registered with timm: timm's own train.py, validate.py or
inference.py, or your own.

    python -m timm_momentum.tools.run train.py /data --model momentum_resnet50 --model-kwargs memory_efficient=True
    torchrun --nproc_per_node 8 -m timm_momentum.tools.run train.py ...

It imports ``timm_momentum`` and then runs the script as ``python SCRIPT ARGS`` would (as ``__main__``, its folder
first on ``sys.path``). timm's train.py and validate.py can do the import themselves with
``--device-modules timm_momentum``.
"""
import re
import runpy
import sys
from pathlib import Path
from typing import List, Optional

USAGE = 'usage: python -m timm_momentum.tools.run SCRIPT [ARGS ...]   (e.g. timm\'s train.py or validate.py)'


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``argv[0]`` with ``argv[1:]`` as its arguments, the momentum models registered."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__.strip() + '\n\n' + USAGE)
        return 0 if argv else 2
    script = Path(argv[0])
    if not script.is_file():
        print(f'timm_momentum.tools.run: {script}: no such script. {USAGE}', file=sys.stderr)
        return 2
    import timm_momentum  # noqa: F401  registers the momentum_* models with timm

    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name='__main__')
    except RuntimeError as e:
        unknown = re.search(r'Unknown model \((momentum_\w+)\)', str(e))
        if unknown:
            from .loading import architecture_problem
            print(f'timm_momentum.tools.run: {architecture_problem(unknown.group(1))}', file=sys.stderr)
        raise
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
