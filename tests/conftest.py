import os

import pytest
import torch

# One thread, as the spawned ranks have: compiled CPU kernels are specialised to the thread count,
# so the suite and its ranks then share one compile cache entry per graph.
torch.set_num_threads(1)

# `@pytest.mark.cuda`: a test that needs a CUDA device, skipped without one, unless FASTFOREACH_REQUIRE_CUDA=1
# (scripts/gpu-check.sh sets it), where a skip of any kind is a failure: a GPU check must not pass by skipping.
REQUIRE_CUDA = os.environ.get('FASTFOREACH_REQUIRE_CUDA') == '1'


def pytest_sessionfinish(session, exitstatus):
    "A run in which no test passed is a failure, even when everything was skipped."
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    passed = len(reporter.stats.get('passed', [])) if reporter else 1
    if exitstatus == 0 and passed == 0: session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


# Modules whose tests start processes of their own (ranks of a spawned world, benchmark subprocesses).
STARTS_PROCESSES = ('test_distributed.py', 'test_bench.py')


def pytest_collection_modifyitems(items):
    """Tests that start processes run last: by then the suite has compiled the fused updates they step (in
    inductor's on-disk cache), where two ranks starting cold would each compile every one, at once.
    Tests marked `cuda` skip where there is no CUDA device (see `REQUIRE_CUDA`)."""
    items.sort(key=lambda item: item.path.name in STARTS_PROCESSES)
    if REQUIRE_CUDA or torch.cuda.is_available(): return
    for item in items:
        if item.get_closest_marker('cuda'): item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    "With FASTFOREACH_REQUIRE_CUDA=1, a skipped test is reported as failed, with the reason it gave."
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_CUDA and report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = 'failed', f"skipped where FASTFOREACH_REQUIRE_CUDA=1: {reason}"


@pytest.fixture(autouse=True)
def foreach_steps_16bit_params_by_its_rule(request):
    """Tests that compare an 'foreach' implementation (an `impl` parameter) test the foreach rule's own path:
    for them, 16-bit params are not handed to the rule's fused form, as they are by default
    (`fused.FUSED_16BIT`; `tests/test_precision.py` tests that routing)."""
    from contextlib import nullcontext

    from fastforeach.fused import foreach_for_16bit
    callspec = getattr(request.node, 'callspec', None)
    with foreach_for_16bit() if callspec is not None and callspec.params.get('impl') == 'foreach' else nullcontext():
        yield
