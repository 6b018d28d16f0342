"""The ``timm-momentum`` command line. It only parses arguments and calls library functions.

Each feature module that offers a subcommand defines ``register_cli(subparsers)``, which adds its
parser and sets ``func`` (a callable taking the parsed namespace and returning an exit code). Every option
gets a one-line ``help``; each subcommand's ``--help`` shows the defaults (``tests/test_cli.py`` checks both).
"""
import argparse
import importlib
import sys
from typing import List, Optional

# Modules whose register_cli adds a subcommand, in the order they show in --help.
_SUBCOMMAND_MODULES = ('finetune', 'demo', 'example', 'convert', 'bench', 'study')


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, unless the help already says it or the option is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or 'default' in (action.help or ''):
            return action.help or ''
        return super()._get_help_string(action)


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its ``--help`` shows each option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault('formatter_class', _DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog='timm-momentum',
        description='Invertible Momentum ResNets for timm (Sander et al., ICML 2021, arXiv:2102.07870).')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', parser_class=_SubcommandParser)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f'timm_momentum.tools.{name}')
        except ModuleNotFoundError as e:
            if e.name == f'timm_momentum.tools.{name}':
                continue
            raise
        module.register_cli(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``timm-momentum`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, 'accepts_overrides', False):
            parser.error(f'unrecognized arguments: {" ".join(extra)}')
        args.overrides = list(getattr(args, 'overrides', [])) + extra
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
