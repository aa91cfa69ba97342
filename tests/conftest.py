import pytest
import torch

# One thread, as the spawned ranks have: compiled CPU kernels are specialised to the thread count,
# so the suite and its ranks then share one compile cache entry per graph.
torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_sessionfinish(session, exitstatus):
    "A run in which no test passed is a failure, even when everything was skipped."
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    passed = len(reporter.stats.get('passed', [])) if reporter else 1
    if exitstatus == 0 and passed == 0: session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


# Modules whose tests start processes of their own (ranks of a spawned world, benchmark subprocesses).
STARTS_PROCESSES = ('test_distributed.py', 'test_bench.py')


def pytest_collection_modifyitems(items):
    """Tests that start processes run last: by then the suite has compiled the fused updates they step (in
    inductor's on-disk cache), where two ranks starting cold would each compile every one, at once."""
    items.sort(key=lambda item: item.path.name in STARTS_PROCESSES)
