"""The benchmark command: quick mode end to end, and clear refusals of bad arguments."""
import json
import subprocess
import sys

import pytest

from fastforeach import bench
from fastforeach.training import train_table


def test_quick_mode_writes_table_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / 'r.json', tmp_path / 'r.png'
    assert bench.main(['--quick', '--json', str(out_json), '--plot', str(out_png)]) == 0
    table = capsys.readouterr().out
    assert 'ms/step' in table and 'speed-up' in table and 'torch_fused' in table
    result = json.loads(out_json.read_text())
    assert {'torch', 'fastai', 'threads', 'machine'} <= set(result['info']) and result['info']['threads'] == 2
    rows = result['rows']
    assert {(r['model'], r['optimizer']) for r in rows} == {(m, o) for m in bench.QUICK_MODELS for o in bench.QUICK_OPTIMIZERS}
    for r in rows:
        assert r['ms'] > 0
        if r['impl'] == 'foreach': assert r['max_rel_diff'] < 1e-4  # equal to fastai, up to float32 rounding
    assert out_png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_train_table_trains_each_implementation():
    result = train_table(epochs=1, optimizers=('Adam',))
    assert [r['impl'] for r in result['rows']] == ['native', 'foreach']
    native, foreach = result['rows']
    assert abs(native['loss'] - foreach['loss']) < 1e-3 and 'accuracy' in result['table']


@pytest.mark.parametrize('args,message', [
    (['--models', 'resnet1000'], 'unknown model resnet1000'),
    (['--optimizers', 'Adamax'], 'unknown optimizer Adamax'),
    (['--threads', '0'], '--threads must be >= 1'),
    (['--device', 'tpu'], "unknown device 'tpu'"),
])
def test_bad_arguments_exit_with_a_message(args, message):
    proc = subprocess.run([sys.executable, '-m', 'fastforeach.bench', *args], capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in proc.stderr and 'Traceback' not in proc.stderr
