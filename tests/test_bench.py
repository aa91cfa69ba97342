"""The benchmark command: quick mode end to end, and clear refusals of bad arguments."""
import json
import subprocess
import sys
from unittest.mock import patch

import pytest
import torch

from fastforeach import bench
from fastforeach.bench import train_table
from fastforeach.bench.experiments import memory as memory_experiment
from fastforeach.bench.experiments.memory import MEMORY_SETUPS


def test_quick_mode_writes_table_json_png_text_and_summary(tmp_path, capsys):
    prefix, threads = tmp_path / 'r', torch.get_num_threads()
    assert bench.main(['--quick', '--out', str(prefix)]) == 0
    text = (tmp_path / 'r.txt').read_text()
    assert capsys.readouterr().out.endswith(text)  # after the progress bar
    table = text.split('\n\n')[1]
    assert 'ms/step' in table and 'speed-up' in table and 'torch_fused' in table and ' fused ' in table and '/ AdamW' in table
    assert torch.get_num_threads() == threads  # as it was before: the command ran in this process
    result = json.loads((tmp_path / 'r.json').read_text())
    assert {'command', 'torch', 'fastai', 'threads', 'machine'} <= set(result['info']) and result['info']['threads'] == 2
    assert result['info']['command'] == f"fastforeach-bench --quick --out {prefix}"
    rows = result['rows']
    assert {(r['model'], r['optimizer']) for r in rows} == {(m, o) for m in bench.QUICK_MODELS for o in bench.QUICK_OPTIMIZERS}
    for r in rows:
        assert r['ms'] > 0 and r['adamw_ms'] > 0
        if r['impl'] in ('foreach', 'fused'): assert r['max_rel_diff'] < 1e-4  # equal to fastai, up to float32 rounding
    for model in bench.QUICK_MODELS:  # torch's fused AdamW timed once per optimizer, in the same rounds
        assert len({r['adamw_ms'] for r in rows if r['model'] == model}) == len(bench.QUICK_OPTIMIZERS)
    assert (tmp_path / 'r.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    summary = (tmp_path / 'r.md').read_text()
    assert summary == bench.summary_table(result)
    # The torch face beside torch's own optimizers (quick mode leaves out the peers: see the next test).
    assert '| torch foreach ms | torch fused ms | fastforeach.optim foreach ms | fastforeach.optim fused ms |\n' in summary
    assert '| AdamW | MLP |' in summary and '| SGD | MLP |' in summary
    assert not any(r['impl'].startswith(bench.harness.PEER) for r in rows)
    adam_mlp = next(r for r in rows if (r['model'], r['optimizer'], r['impl']) == ('mlp', 'Adam', 'fused'))
    assert f"| Adam | {rows[rows.index(adam_mlp) - 1]['speedup']:.2f}x | **{adam_mlp['speedup']:.2f}x** | " \
           f"{adam_mlp['ms'] / adam_mlp['adamw_ms']:.2f} |" in summary
    assert result['info']['command'] in summary


def test_peers_step_beside_the_torch_face():
    "Other libraries' optimizers where installed (torch-optimi comes with the tests): a column of the torch-face table."
    from fastforeach.bench.harness import PEER, implementations
    from fastforeach.bench.report import torch_face_table
    impls = implementations('Adam', ('optimi',))
    assert PEER + 'optimi' in impls and 'optim_fused' in impls
    rows = [{'model': 'mlp', 'optimizer': 'Adam', 'impl': impl, 'ms': float(i + 1)}
            for i, impl in enumerate(('torch_foreach', 'torch_fused', 'optim_foreach', 'optim_fused', PEER + 'optimi'))]
    assert torch_face_table(rows).splitlines()[2] == '| AdamW | MLP | 1.00 | 2.00 | 3.00 | 4.00 | 5.00 |'
    assert torch_face_table(rows).splitlines()[0].endswith('| optimi ms |')


def test_train_table_trains_each_implementation():
    result = train_table(epochs=1, optimizers=('Adam',))
    assert [r['impl'] for r in result['rows']] == ['native', 'foreach', 'fused']
    native, *others = result['rows']
    for other in others: assert abs(native['loss'] - other['loss']) < 1e-3
    assert 'accuracy' in result['table']


def test_compile_times_cold_and_warm(tmp_path, capsys):
    "Only compiled optimizers are timed; a warm cache makes the first step faster than a cold one."
    assert bench.compiled_optimizers(['SGD', 'Adam', 'RMSProp', 'ranger']) == ['RMSProp', 'ranger']
    out_json = tmp_path / 'r.json'
    assert bench.main(['--models', 'mlp', '--optimizers', 'SGD', 'RMSProp', '--steps', '2', '--check-steps', '2',
                       '--threads', '1', '--compile-times', '--json', str(out_json)]) == 0
    assert 'cold first step' in capsys.readouterr().out
    (row,) = json.loads(out_json.read_text())['compile_times']
    assert row['optimizer'] == 'RMSProp' and row['warm_s'] < row['cold_s'] and row['step_ms'] > 0


def test_compile_times_with_state_format_time_every_optimizer_in_it(monkeypatch):
    """With `state_format`, each optimizer named is timed (its fused step compiles the few-bit loop, even where
    its float32 step is PyTorch's kernel), its first steps made with that format (the fresh processes stubbed)."""
    import subprocess
    from types import SimpleNamespace
    from fastforeach.bench.experiments.compile_times import compile_times
    codes = []
    monkeypatch.setattr(subprocess, 'run', lambda args, **kw: (codes.append(args[-1]), SimpleNamespace(stdout='2.0 0.01'))[1])
    (row,) = compile_times(['Adam'], model='mlp', state_format='8bit-companded')
    assert row['optimizer'] == 'Adam 8bit-companded' and row['cold_s'] == 2.0 and len(codes) == 2
    assert all("'state_format': '8bit-companded'" in code and "make('fused'" in code for code in codes)


def test_memory_floor_times_plain_passes_beside_sgd(tmp_path, capsys):
    out_json = tmp_path / 'r.json'
    assert bench.main(['--models', 'mlp', '--optimizers', 'SGD', '--steps', '2', '--check-steps', '2',
                       '--threads', '1', '--memory', '--json', str(out_json)]) == 0
    assert 'fastai SGD / this' in capsys.readouterr().out
    rows = json.loads(out_json.read_text())['memory']
    assert [(r['what'], r['reads']) for r in rows] == [('pass reading 1', 1), ('pass reading 2', 2), ('pass reading 3', 3),
                                                       ('fastai SGD', None), ('fused SGD', 3), ('torch fused SGD', 3)]
    assert all(r['model'] == 'mlp' and r['ms'] > 0 for r in rows)
    assert next(r for r in rows if r['what'] == 'fastai SGD')['fastai_over_this'] == 1


def test_distributed_mode_times_fsdp2_steps_and_halves_the_state(tmp_path, capsys):
    "FSDP2's layout over 2 ranks: every optimizer beside torch's AdamW, each rank holding half the state."
    out_json = tmp_path / 'r.json'
    assert bench.main(['--models', 'mlp', '--optimizers', 'Adam', 'Lamb', '--steps', '2', '--warmup', '1',
                       '--check-steps', '2', '--distributed', '--json', str(out_json)]) == 0
    assert 'state MB/rank' in capsys.readouterr().out
    rows = json.loads(out_json.read_text())['distributed']
    assert {(r['optimizer'], r['impl']) for r in rows} == {
        (o, i) for o in ('Adam', 'Lamb') for i in ('foreach', 'fused', 'torch AdamW foreach', 'torch AdamW fused')}
    for r in rows:
        assert r['ms'] > 0
        assert r['state_bytes'] / r['one_process_state_bytes'] == pytest.approx(0.5, abs=0.01)  # 64-row tensors split evenly


@pytest.mark.parametrize('args,message', [
    (['--models', 'resnet1000'], 'unknown model resnet1000'),
    (['--optimizers', 'Adamax'], 'unknown optimizer Adamax'),
    (['--threads', '0'], '--threads must be >= 1'),
    (['--device', 'tpu'], "unknown device 'tpu'"),
    (['--distributed', '1'], '--distributed needs 2 ranks or more'),
    (['--compile-times', 'Adamax'], 'unknown optimizer Adamax'),
])
def test_bad_arguments_exit_with_a_message(args, message, capsys):
    "Refused by the command's parser, with a usage message and no traceback (in this process: the same parser)."
    with pytest.raises(SystemExit) as exit: bench.main(args)
    assert exit.value.code != 0
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_the_command_runs_as_a_module():
    "`python -m fastforeach.bench` is the command `fastforeach-bench`: a bad argument exits non-zero, saying why."
    proc = subprocess.run([sys.executable, '-m', 'fastforeach.bench', '--threads', '0'], capture_output=True, text=True)
    assert proc.returncode == 2 and '--threads must be >= 1' in proc.stderr and 'Traceback' not in proc.stderr


@pytest.mark.parametrize('model', ['mlp', 'transformer', 'xresnet18'])
def test_memory_table_counts_every_setup(model):
    """Bytes per param, counted: Adam 16 in float32, 12 in pure bf16 with Kahan (float32 buffer), 10 with a
    bf16 buffer, 9 with 24-bit masters, 8 with stochastic rounding; with 8-bit averages (either format) at most 4 + 4 + 2.1 (companded:
    2 + 2 + 2.1 in bf16) on the models with large params (the MLP's are all small: full precision), 4-bit ones
    1.1 for the state, as
    bitsandbytes' and torchao's (where installed); fastforeach's own buffers at most 2% of the param bytes,
    with the CPU's pack threshold and with CUDA's (which packs far more)."""
    # The fused steps with bitsandbytes' format hold what its foreach step holds, and compile for most of a minute
    # (with 24-bit masters too; their 4/8-bit state is counted in tests/test_lowbit.py). torchao compiles a graph
    # per param shape: 145 s cold on xresnet18's, so its bytes are compared on the transformer's.
    setups = [s for s in MEMORY_SETUPS if not s[0].startswith(('fused, 8-bit state', 'fused, stochastic, 8-bit state',
                                                               'fused, 24-bit masters, '))
              and not (model == 'xresnet18' and s[0] == 'torchao')]
    with patch.object(memory_experiment, 'MEMORY_SETUPS', setups):
        rows = {r['setup']: r for r in bench.memory_table(model, steps=2, warmup=1)}
    assert rows['Adam float32 fastai native']['total'] == rows['Adam float32 fused']['total'] == 16
    assert rows['Adam bfloat16 fused, Kahan']['total'] == 12
    assert rows['Adam bfloat16 fused, Kahan bf16']['total'] == 10
    assert rows['Adam bfloat16 fused, stochastic']['total'] == 8
    assert rows['Adam bfloat16 fused, 24-bit masters']['total'] == rows['Adam bfloat16 foreach rule, 24-bit masters']['total'] == 9
    if model != 'mlp':
        assert rows['Adam float32 8-bit state']['total'] <= 10.1 and rows['Adam float32 4-bit state']['state'] <= 1.1
        assert rows['Adam float32 fused, 8-bit companded state']['total'] <= 10.1
        assert rows['Adam bfloat16 fused, stochastic, 8-bit companded']['total'] <= 6.1
        for peer in ('AdamW8bit float32 bitsandbytes', 'AdamW8bit float32 torchao'):
            if peer in rows: assert abs(rows[peer]['state'] - rows['Adam float32 8-bit state']['state']) < 0.02, peer
    assert all(r['extra_share'] <= 0.02 for r in rows.values()), {k: r['extra_share'] for k, r in rows.items()}


@pytest.mark.parametrize('model', ['mlp', 'xresnet18'])
def test_release_table_counts_peak_gradient_bytes(model):
    """Without release every gradient is alive at the end of backward; with it, at most a bucket (25 MiB) and
    the largest param's gradient: on xresnet18 (45 MiB of gradients) that is well under all of them."""
    normal, released = bench.release_table(model, steps=2, warmup=1)
    net = bench.MODELS[model]()
    grads = sum(p.nbytes for p in net.parameters())
    assert (normal['release'], released['release']) == (False, True)
    assert normal['peak_grad_bytes'] == grads and normal['peak_share'] == 1
    bound = (25 << 20) + max(p.nbytes for p in net.parameters())
    assert released['peak_grad_bytes'] <= min(bound, grads)
    if grads > bound: assert released['peak_share'] < 0.8
    assert normal['step_ms'] > 0 and released['step_ms'] > 0
    assert 'peak grad MB' in bench.format_release_table([normal, released])


def test_newton_schulz_table_times_and_measures_each_method():
    "Every kernel of the default route, three methods; fastforeach's standard iteration has torch's error."
    rows = bench.newton_schulz_table('xresnet18', steps=1, warmup=0, batches=2)
    assert [r['method'] for r in rows] == ["torch's", 'standard', 'gram']
    torchs, standard, gram = rows
    assert all(r['kernels'] == 22 and r['ms'] > 0 for r in rows)
    assert abs(standard['median_error'] - torchs['median_error']) < 0.01
    assert gram['median_error'] < torchs['median_error'] + 0.05 and gram['max_error'] < torchs['max_error'] + 0.05
    assert "Muon's orthogonalisation" in bench.format_newton_schulz_table(rows)


@pytest.mark.cuda
def test_cuda_rows_carry_host_time_kernels_and_peak_memory(tmp_path):
    "On CUDA every row has the host's share of its time, its device operations per step and its peak memory."
    out_json = tmp_path / 'r.json'
    assert bench.main(['--device', 'cuda', '--models', 'mlp', '--optimizers', 'SGD', 'Adam', '--steps', '2',
                       '--warmup', '1', '--check-steps', '2', '--json', str(out_json)]) == 0
    rows = json.loads(out_json.read_text())['rows']
    for r in rows:
        assert 0 < r['host_ms'] <= r['ms'] and r['kernels'] >= 1 and r['peak_mb'] > 0, r
    fused = next(r for r in rows if (r['optimizer'], r['impl']) == ('Adam', 'fused'))
    native = next(r for r in rows if (r['optimizer'], r['impl']) == ('Adam', 'native'))
    assert fused['kernels'] < native['kernels']  # one multi-tensor kernel, not a chain per param
