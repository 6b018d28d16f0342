"""The package's layout: its modules import each other as a tree (no cycles, lazy imports inside functions
included), and what one module takes from another is public there (no leading underscore)."""
import ast
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import timm_momentum

PACKAGE = Path(timm_momentum.__file__).parent


def _imports(path: Path) -> List[Tuple[str, List[str], int]]:
    """(imported timm_momentum module, names taken from it, line) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ''
            elif node.level == 0 and (node.module or '').split('.')[0] == 'timm_momentum':
                base = node.module[len('timm_momentum.'):] if '.' in node.module else ''
            else:
                continue
            names = [a.name for a in node.names]
            if base:
                found.append((base, names, node.lineno))
            else:  # ``from . import x``: x is a module, or a name of the package's __init__
                for name in names:
                    module = name if (PACKAGE / f'{name}.py').exists() else '__init__'
                    found.append((module, [] if module == name else [name], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split('.')
                if parts[0] == 'timm_momentum':
                    found.append(('.'.join(parts[1:]) or '__init__', [], node.lineno))
    return found


def _graph() -> Dict[str, Set[str]]:
    return {path.stem: {module for module, _, _ in _imports(path)} for path in PACKAGE.glob('*.py')}


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """A cycle of imports in ``graph`` (module -> modules it imports), or [] when there is none."""
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


def test_the_import_graph_is_a_tree():
    graph = _graph()
    assert {'data', 'heal', 'demo', 'errors', 'finetune', 'convert'} <= set(graph)
    assert _cycle(graph) == [], 'import cycle: ' + ' -> '.join(_cycle(graph))


def test_no_module_takes_a_private_name_from_another():
    private = [f'{path.name}:{line} takes {name} from {module}'
               for path in PACKAGE.glob('*.py') for module, names, line in _imports(path)
               for name in names if name.startswith('_') and not name.startswith('__')]
    assert not private, private


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The two checks above fail where they should: on a lazy import that closes a cycle, and on a private name."""
    (tmp_path / 'a.py').write_text('from .b import thing\n')
    (tmp_path / 'b.py').write_text('def f():\n    from timm_momentum.a import _hidden\n')
    monkeypatch.setattr(sys.modules[__name__], 'PACKAGE', tmp_path)
    assert _cycle(_graph()) == ['a', 'b', 'a']
    assert [names for _, names, _ in _imports(tmp_path / 'b.py')] == [['_hidden']]
