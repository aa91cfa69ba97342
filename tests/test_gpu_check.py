"""The GPU check (`scripts/gpu-check.sh`) and the `cuda` marker: without a GPU the check stops at once and
says why, and with FASTFOREACH_REQUIRE_CUDA=1 a CUDA test cannot pass by skipping."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA device")
def test_gpu_check_fails_loudly_without_cuda(tmp_path):
    proc = subprocess.run(['bash', str(ROOT / 'scripts' / 'gpu-check.sh'), str(tmp_path / 'cuda')],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'torch sees no CUDA device' in proc.stderr and 'nothing was checked' in proc.stderr
    assert not list(tmp_path.iterdir())  # no test ran, no benchmark was written


def test_required_cuda_tests_cannot_pass_by_skipping(tmp_path):
    "A test marked `cuda` skips without a device, unless FASTFOREACH_REQUIRE_CUDA=1, where a skip is a failure."
    test = tmp_path / 'test_marked.py'
    test.write_text("import pytest\n\n@pytest.mark.cuda\ndef test_needs_a_gpu():\n"
                    "    pytest.skip('a reason of its own')\n")
    (tmp_path / 'conftest.py').write_text((ROOT / 'tests' / 'conftest.py').read_text())
    (tmp_path / 'pytest.ini').write_text("[pytest]\nmarkers =\n    cuda: needs a CUDA device\n")
    def run(**env):
        return subprocess.run([sys.executable, '-m', 'pytest', str(test), '-p', 'no:cacheprovider', '-p', 'no:xdist', '-rA'],
                              capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env}, timeout=300)
    plain = run(FASTFOREACH_REQUIRE_CUDA='0')
    assert '1 skipped' in plain.stdout
    required = run(FASTFOREACH_REQUIRE_CUDA='1')
    assert required.returncode == 1 and '1 failed' in required.stdout
    assert 'skipped where FASTFOREACH_REQUIRE_CUDA=1' in required.stdout and 'a reason of its own' in required.stdout
