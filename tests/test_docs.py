"""The docs stay true: the site builds with `mkdocs build --strict` (broken links, missing pages and API
names that do not exist fail it), and each optimizer page's table of defaults is the factory's signature.
(Every Python block of README.md and docs/ runs as a test of its own: see conftest.py at the root.)"""
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastforeach
from fastforeach.registry import SWITCHES

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strictly(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(tmp_path / 'site')],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})
    assert proc.returncode == 0, proc.stderr[-5000:]
    api = (tmp_path / 'site' / 'api' / 'index.html').read_text()
    for name in fastforeach.OWN + fastforeach.MODERN + ('ForEachOptimizer', 'ScheduleFree'): assert f'id="fastforeach.{name}"' in api, name


def documented_defaults(page: Path) -> dict[str, dict[str, str]]:
    "Factory name -> {argument: default as written} from the tables under each '## `Name`' heading."
    tables, name = {}, None
    for line in page.read_text().splitlines():
        heading = re.match(r"## `(\w+)`", line)
        if heading: name = heading[1]; tables[name] = {}
        row = re.match(r"\| `(\w+)` \| ([^|]+) \|", line)
        if row and name: tables[name][row[1]] = row[2].strip().strip('`')
    return {k: v for k, v in tables.items() if v}


PAGES = sorted((ROOT / 'docs' / 'optimizers').glob('*.md'))


@pytest.mark.parametrize('page', PAGES, ids=[p.stem for p in PAGES])
def test_optimizer_pages_state_the_factories_defaults(page):
    for name, table in documented_defaults(page).items():
        params = {k: p for k, p in inspect.signature(getattr(fastforeach, name)).parameters.items()
                  if k not in ('params', 'opt', *SWITCHES)}  # the switches every factory has: documented once
        assert list(table) == list(params), f"{page.name}: {name}'s table lists {list(table)}"
        for k, p in params.items():
            assert table[k] == ('required' if p.default is p.empty else repr(p.default)), f"{page.name}: {name}.{k}"


def test_every_factory_has_a_page():
    documented = {name for page in PAGES for name in documented_defaults(page)}
    assert documented == set(fastforeach.OWN + fastforeach.MODERN)


DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').rglob('*.md'))]


def test_readme_shows_the_committed_benchmark_run():
    "The README's results table is the summary the benchmark wrote (`--out bench-results/cpu-2threads`)."
    summary = (ROOT / 'bench-results' / 'cpu-2threads.md').read_text()
    assert summary in (ROOT / 'README.md').read_text()
    assert (ROOT / 'bench-results' / 'cpu-2threads.png').exists()


def test_readme_shows_the_committed_gpu_run():
    "The README's GPU table is the one the GPU check's benchmark wrote (`bench-results/cuda-h200.md`)."
    summary = (ROOT / 'bench-results' / 'cuda-h200.md').read_text()
    assert summary.split('\n\n')[0] in (ROOT / 'README.md').read_text()
    assert (ROOT / 'scripts' / 'gpu-check.sh').exists()


def test_readme_is_short():
    assert len((ROOT / 'README.md').read_text().splitlines()) <= 150


# History belongs in commit messages, not in what users read.
DIARY = re.compile(r"\bissue \d+|\bissue #?\d+|#\d{1,3}\b|\b(this|last|earlier|previous) (run|session)s?\b|"
                   r"\b(two|three) sessions\b", re.IGNORECASE)


@pytest.mark.parametrize('page', DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_docs_tell_no_history(page):
    found = [m[0] for m in DIARY.finditer(page.read_text())]
    assert not found, found


def test_changelog_and_version_agree():
    "The version is the same in pyproject.toml and the package, the CHANGELOG has its section, and types ship."
    version = re.search(r'^version = "([^"]+)"', (ROOT / 'pyproject.toml').read_text(), re.MULTILINE)[1]
    assert version == fastforeach.__version__
    assert f"\n## {version}\n" in (ROOT / 'CHANGELOG.md').read_text()
    assert (ROOT / 'fastforeach' / 'py.typed').exists()
