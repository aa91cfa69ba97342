"""Every Python code block of README.md and docs/ runs as a test (Sybil), one namespace per file, top to
bottom. A block that cannot run here is marked in the Markdown, invisibly, with a reason:
`<!-- skip: next "needs a download" -->`, or `<!-- skip: next if(not cuda, reason="needs a CUDA GPU") -->`
to run it where there is a GPU."""
import pytest
import torch
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser


def _setup(namespace):
    namespace['cuda'] = torch.cuda.is_available()


pytest_collect_file = Sybil(parsers=[PythonCodeBlockParser(), SkipParser()], patterns=['README.md', 'docs/*.md', 'docs/*/*.md'],
                            setup=_setup).pytest()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    "A document's blocks share one namespace, top to bottom: one worker runs all of them (see pytest.ini)."
    for item in items:
        if item.path.suffix == '.md': item.add_marker(pytest.mark.xdist_group(f'doc:{item.path}'))
