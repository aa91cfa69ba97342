"""The shape of the package, read from its source: imports run one way, the core needs no fastai, and the
fastai face stays thin. Imports are read with `ast`, module-level and inside functions alike."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / 'fastforeach'


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {module_name(p): p for p in ROOT.rglob('*.py')}


def imports_of(name: str) -> set[str]:
    "The modules (of fastforeach, or outside it) that module `name` imports, anywhere in its source."
    path = MODULES[name]
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            found.add(base)
            # `from . import paths` imports a module, not a name
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return found


def own_imports(name: str) -> set[str]:
    "The fastforeach modules `name` imports, without the packages that merely contain them."
    return {m for m in imports_of(name) if m in MODULES and m != name and not name.startswith(m + '.')}


def closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for m in own_imports(todo.pop()):
            if m not in seen and m != 'fastforeach': seen.add(m); todo.append(m)
    return seen


def test_no_import_runs_in_a_circle():
    cycles = sorted(m for m in MODULES if m != 'fastforeach' and m in closure(m))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_the_core_needs_no_fastai():
    "What the core (and everything it imports) imports from outside fastforeach: no fastai, no fastcore."
    core = [m for m in MODULES if m.startswith('fastforeach.core')]
    reached = set(core) | {m for c in core for m in closure(c)}
    outside = {i.split('.')[0] for m in reached for i in imports_of(m) if not i.startswith('fastforeach')}
    assert not outside & {'fastai', 'fastcore'}, sorted(reached)
    assert 'fastforeach.fastai' not in reached


@pytest.mark.parametrize('name, most', [('fastforeach.fastai', 150)])
def test_the_fastai_face_is_thin(name, most):
    assert len(MODULES[name].read_text().splitlines()) < most


def test_the_runtime_never_imports_test_or_benchmark_support():
    runtime = [m for m in MODULES if not m.startswith(('fastforeach.testing', 'fastforeach.bench'))]
    wrong = {m: sorted(i for i in own_imports(m) if i.startswith(('fastforeach.testing', 'fastforeach.bench')))
             for m in runtime}
    assert not {m: i for m, i in wrong.items() if i}


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long
