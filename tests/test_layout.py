"""The package's layout: the core (``timm_momentum.core``) imports nothing from the tools
(``timm_momentum.tools``); all modules import each other as a tree (no cycles, lazy imports inside functions
included); what one module takes from another is public there (no leading underscore); the command line
(``timm_momentum_cli``) imports only the standard library when it is imported, and the tools only inside its
handlers; and the modules that moved still import, and run, from their old names with a FutureWarning."""
import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

import timm_momentum
import timm_momentum_cli

PACKAGE = Path(timm_momentum.__file__).parent
CLI_PACKAGE = Path(timm_momentum_cli.__file__).parent

# old module name -> where it lives now
MOVED = {
    'kernels': 'core.kernels', 'invertible': 'core.chain', 'momentum_resnet': 'core.models.momentum_resnet',
    **{name: f'tools.{name}' for name in ('bench', 'cli', 'convert', 'data', 'demo', 'errors', 'example', 'files',
                                          'finetune', 'heal', 'loading', 'memory', 'run', 'study')},
}


def _module_name(path: Path, root: Path) -> str:
    """Dotted name of ``path`` relative to the package root: 'core.chain', 'core' for core/__init__.py."""
    parts = list(path.relative_to(root).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def _is_package(path: Path) -> bool:
    return path.name == '__init__.py'


def _resolve(name: str, root: Path) -> str:
    """``name`` if it is a module or package under root, else its parent (``from pkg import NAME`` of a value)."""
    as_path = root.joinpath(*name.split('.')) if name else root
    if as_path.with_suffix('.py').exists() or (as_path / '__init__.py').exists():
        return name
    return name.rpartition('.')[0]


def _imports(path: Path, root: Path) -> List[Tuple[str, List[str], int]]:
    """(imported module, relative to the package; names taken from it; line) for every import in the file,
    at any depth, with relative imports resolved."""
    here = _module_name(path, root)
    package = here if _is_package(path) else here.rpartition('.')[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split('.') if package else []
                parts = parts[:len(parts) - (node.level - 1)]
                base = '.'.join(parts + ([node.module] if node.module else []))
            elif (node.module or '').split('.')[0] == 'timm_momentum':
                base = node.module.partition('.')[2]
            else:
                continue
            names = [a.name for a in node.names]
            submodules = [n for n in names if _resolve(f'{base}.{n}'.strip('.'), root) == f'{base}.{n}'.strip('.')]
            for name in submodules:
                found.append((f'{base}.{name}'.strip('.'), [], node.lineno))
            values = [n for n in names if n not in submodules]
            if values or not submodules:
                found.append((base, values, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split('.')
                if parts[0] == 'timm_momentum':
                    found.append(('.'.join(parts[1:]), [], node.lineno))
    return found


def _graph(root: Path = None) -> Dict[str, Set[str]]:
    root = root or PACKAGE
    return {_module_name(path, root): {module for module, _, _ in _imports(path, root)}
            for path in root.rglob('*.py')}


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """A cycle of imports in ``graph`` (module -> modules it imports), or [] when there is none. A package's
    ``__init__`` importing its own submodules is not a cycle; a submodule importing its package's ``__init__`` is."""
    visiting: List[str] = []
    done: Set[str] = set()

    def visit(module: str) -> List[str]:
        if module in visiting:
            return visiting[visiting.index(module):] + [module]
        if module in done:
            return []
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported)
            if cycle:
                return cycle
        visiting.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return []


def _shims(root: Path) -> Set[str]:
    return {_module_name(path, root) for path in root.glob('*.py') if 'alias(globals()' in path.read_text()}


def _core_reaches_tools(graph: Dict[str, Set[str]], shims: Set[str]) -> List[str]:
    """'core.x -> tools.y' (or -> a shim, which stands for a tool) for each import from the core outward."""
    return [f'{module} -> {imported}' for module, imports in sorted(graph.items())
            if module == 'core' or module.startswith('core.')
            for imported in sorted(imports)
            if imported == 'tools' or imported.startswith('tools.') or imported in shims
            or not (imported == 'core' or imported.startswith('core.') or imported == '_moved')]


def test_the_core_imports_nothing_from_the_tools():
    graph = _graph()
    assert {'core.chain', 'core.kernels', 'core.models.momentum_resnet', 'tools.convert', 'tools.cli'} <= set(graph)
    assert _core_reaches_tools(graph, _shims(PACKAGE)) == []


def test_the_import_graph_is_a_tree():
    graph = _graph()
    cycle = _cycle({module: {i for i in imports if i != ''} for module, imports in graph.items()})
    assert cycle == [], 'import cycle: ' + ' -> '.join(cycle)
    # the package's __init__ is the public face: only the core may sit under it, never a tool
    assert not [i for i in graph[''] if i.startswith('tools')], graph['']


def test_no_module_takes_a_private_name_from_another():
    private = [f'{path.relative_to(PACKAGE)}:{line} takes {name} from {module or "timm_momentum"}'
               for path in PACKAGE.rglob('*.py') for module, names, line in _imports(path, PACKAGE)
               for name in names if name.startswith('_') and not name.startswith('__')]
    assert not private, private


def test_the_checker_sees_a_cycle_a_private_import_and_the_core_reaching_a_tool(tmp_path):
    """The checks above fail where they should: on a lazy import that closes a cycle, on a private name, and on
    a core module that imports a tool (directly, or through an old name's shim)."""
    (tmp_path / '__init__.py').write_text('')
    (tmp_path / 'a.py').write_text('from .b import thing\n')
    (tmp_path / 'b.py').write_text('def f():\n    from timm_momentum.a import _hidden\n')
    (tmp_path / 'old.py').write_text("from ._moved import alias\nalias(globals(), 'timm_momentum.tools.t')\n")
    for folder in ('core', 'core/models', 'tools'):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / '__init__.py').write_text('')
    (tmp_path / 'tools' / 't.py').write_text('')
    (tmp_path / 'core' / 'models' / 'm.py').write_text('from ...tools import t\nfrom ... import old\n'
                                                        'from ..chain import x\n')
    (tmp_path / 'core' / 'chain.py').write_text('x = 1\n')
    graph = _graph(tmp_path)
    assert _cycle(graph) == ['a', 'b', 'a']
    assert [names for _, names, _ in _imports(tmp_path / 'b.py', tmp_path)] == [['_hidden']]
    assert _core_reaches_tools(graph, _shims(tmp_path)) == ['core.models.m -> old', 'core.models.m -> tools.t']


def _imports_by_when(path: Path) -> Tuple[List[Tuple[str, List[str], int]], List[Tuple[str, List[str], int]]]:
    """The imports of the file, as (absolute module, or '.module' for a relative one; names taken; line), in two
    lists: those that run when the file is imported (outside any function) and those inside functions."""
    on_import, in_functions = [], []

    def visit(node: ast.AST, inside_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            found = in_functions if inside_function else on_import
            if isinstance(child, ast.Import):
                found.extend((alias.name, [], child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append(('.' * child.level + (child.module or ''), [a.name for a in child.names], child.lineno))
            visit(child, inside_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return on_import, in_functions


def _cli_import_problems(cli: Path, package: Path) -> List[str]:
    """What breaks the command line's rules: an import outside the standard library (torch, timm, timm_momentum)
    that runs when the CLI is imported; a handler's import of anything but a public name of a tool; a module of
    the package that imports the CLI, other than ``tools/cli.py``, its old home (the CLI sits on top)."""
    problems = []
    for path in sorted(cli.rglob('*.py')):
        on_import, in_functions = _imports_by_when(path)
        for module, _, line in on_import:
            if not module.startswith('.') and module.split('.')[0] not in sys.stdlib_module_names:
                problems.append(f'{path.relative_to(cli)}:{line} imports {module} when imported')
        for module, names, line in in_functions:
            if module.split('.')[0] == 'timm_momentum':
                if not module.startswith('timm_momentum.tools.'):
                    problems.append(f'{path.relative_to(cli)}:{line} runs {module}, not a tool')
                problems += [f'{path.relative_to(cli)}:{line} takes {name} from {module}'
                             for name in names if name.startswith('_')]
    for path in sorted(package.rglob('*.py')):
        on_import, in_functions = _imports_by_when(path)
        if path.relative_to(package) != Path('tools', 'cli.py'):
            problems += [f'{path.relative_to(package)}:{line} imports the command line'
                         for module, _, line in on_import + in_functions if module.split('.')[0] == cli.name]
    return problems


def test_the_command_line_imports_only_the_standard_library_until_a_subcommand_runs():
    assert (CLI_PACKAGE / '__init__.py').exists() and CLI_PACKAGE.parent == PACKAGE.parent
    assert _cli_import_problems(CLI_PACKAGE, PACKAGE) == []


def test_the_checker_sees_the_command_line_import_a_tool_too_early(tmp_path):
    cli, package = tmp_path / 'timm_momentum_cli', tmp_path / 'timm_momentum'
    (package / 'tools').mkdir(parents=True)
    cli.mkdir()
    (cli / '__init__.py').write_text('import argparse\nfrom . import parsers\nimport torch.nn\n'
                                     'class Parser:\n    from timm_momentum.tools import bench\n'
                                     'def run(args):\n    from timm_momentum.tools.bench import run_cli, _run\n'
                                     '    from timm_momentum.core import chain\n    import torch\n')
    (package / 'tools' / 'cli.py').write_text('from timm_momentum_cli import main\n')
    (package / 'tools' / 'bench.py').write_text('def f():\n    import timm_momentum_cli\n')
    assert _cli_import_problems(cli, package) == [
        '__init__.py:3 imports torch.nn when imported', '__init__.py:5 imports timm_momentum.tools when imported',
        '__init__.py:7 takes _run from timm_momentum.tools.bench', '__init__.py:8 runs timm_momentum.core, not a tool',
        'tools/bench.py:2 imports the command line']


@pytest.mark.parametrize('old', sorted(MOVED))
def test_a_moved_module_still_imports_from_its_old_name(old):
    new = importlib.import_module(f'timm_momentum.{MOVED[old]}')
    sys.modules.pop(f'timm_momentum.{old}', None)
    with pytest.warns(FutureWarning, match=f'timm_momentum.{old} moved to timm_momentum.{MOVED[old]}'):
        shim = importlib.import_module(f'timm_momentum.{old}')
    assert shim is new
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert getattr(timm_momentum, old) is new  # the package attribute is the moved module too


@pytest.mark.slow
def test_a_moved_module_still_runs_from_its_old_name():
    """``python -m timm_momentum.run`` (in cards already on the Hub) runs the moved module, warning once."""
    done = subprocess.run([sys.executable, '-m', 'timm_momentum.run'], capture_output=True, text=True)
    assert done.returncode == 2, done
    assert 'usage: python -m timm_momentum.tools.run SCRIPT' in done.stdout
    assert done.stderr.count('FutureWarning: timm_momentum.run moved to timm_momentum.tools.run') == 1
