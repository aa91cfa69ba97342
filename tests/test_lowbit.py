"""Averages kept in 8 or 4 bits (`state_format`, `lowbit.py`): the plumbing against fastai, the formats' steps
against bitsandbytes' and torchao's optimizers, unbiased rounding, checkpoints, bad input, memory."""
import copy
import importlib.util
import io
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import fastforeach
from fastforeach.core import inner_optimizer, paths
from fastforeach.fused.coded import elementwise
from fastforeach.lowbit import CODES, FORMATS, SCALE, LowBit, StateFormat
from fastforeach.memory import memory_report
from fastforeach.precision import master_value
from fastforeach.registry import REGISTRY
from fastforeach.testing.oracle import Twins, compare_states, oracle_layers
from test_oracle import TOLERANCES

ROOT = Path(__file__).parent.parent


class Lossless(LowBit):
    """A stand-in format that keeps float32 values exactly, as 4 bytes of codes each: the path that decodes,
    steps and encodes, without the rounding of a real format."""
    def encode(self, x, nonnegative):
        return x.float().reshape(-1).view(torch.uint8).clone(), torch.zeros(self.n_scales(x.numel()))

    def decode(self, codes, scales, nonnegative, shape): return codes.view(torch.float32).view(shape)

    def fits(self, numel): return True

    # The fused path's compiled loop codes rows of blocks (see `fused/coded.py`).
    in_rows = True

    def prepare_rows(self, nonnegative, device): pass

    def decode_rows(self, codes, scales, nonnegative): return codes.view(torch.float32)

    def encode_rows(self, x, nonnegative, noise, scale=None):
        return x.float().view(torch.uint8), x.new_zeros(x.shape[0], 1, dtype=torch.float32)


LOSSLESS = Lossless('lossless', 32, 256)
MIN_NUMEL = 1000  # of the oracle's params, some keep their state in few bits and some (biases, norms) do not

CASES = [pytest.param(spec, options, id=f"{name}-{cfg}")
         for name, spec in REGISTRY.items() for cfg, options in spec.configs.items()]


@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('spec,options', CASES)
def test_decoded_steps_equal_fastai(spec, options, impl, monkeypatch):
    """Every optimizer and option, its averages kept in a lossless stand-in format for params of at least
    `MIN_NUMEL` elements: decoded chunk by chunk, stepped, encoded back, beside fastai's native optimizer in
    float32 (the oracle's tolerances); its decoded state (`fastai_state_dict`) equals fastai's."""
    monkeypatch.setitem(FORMATS, 'lossless', LOSSLESS)
    lowbit = StateFormat(LOSSLESS, min_numel=MIN_NUMEL)
    paths_taken = []
    for path in (paths.QUANTIZED, paths.CODED_FUSED):
        monkeypatch.setattr(path, 'step', lambda *a, _step=path.step, _name=path.name: (paths_taken.append((_name, a[1])), _step(*a)))
    twins = Twins(lambda ps: spec.make('native', ps, **options),
                  lambda ps: spec.make(impl, ps, **options, state_format=lowbit), oracle_layers(torch.float32))
    for t in range(1, 26):
        twins.step(spec.lr)
        if t in (1, 2, 25):
            for label, a, b in [*((f"param {w}", pa, pb) for w, pa, pb in twins.pairs()),
                                *compare_states(twins.opt_a.state_dict(), twins.opt_b.fastai_state_dict())]:
                if isinstance(a, torch.Tensor):
                    torch.testing.assert_close(b, a.to(b.dtype), **TOLERANCES[torch.float32], msg=lambda m: f"{label}, step {t}: {m}")
                else: assert a == b, f"{label}, step {t}"
    coded = [s for s in twins.opt_b.state_dict()['state'] if any(k.endswith(SCALE) for k in s)]
    # Coded where some stepped param is large enough and its rule keeps an average shaped like it (not
    # Adafactor's: its matrices' row and column statistics stay whole, its vectors are small here).
    inner = inner_optimizer(twins.opt_b)
    assert bool(coded) == any(lowbit.keys(inner.core.route_of(pb, inner.state[pb]).rule, pb)
                              for where, _, pb in twins.pairs() if where != twins.no_grad)
    # Fused steps whose update is elementwise code the state in their compiled loop; the others decode chunks.
    assert not coded or paths_taken
    for name, route in paths_taken:
        one_pass = impl == 'fused' and elementwise(route.fused) is not None
        assert name == (paths.CODED_FUSED.name if one_pass else paths.QUANTIZED.name), (name, route.rule.name)


def _averages(spec, options) -> list:
    "The state keys of the optimizer's rules that may be kept in few bits: averages shaped like their params."
    core = inner_optimizer(spec.make('foreach', [nn.Parameter(torch.zeros(2))], **options)).core
    return [k for route in core.routes for k, s in route.rule.state.items() if s.average and not s.weight and s.like_param]


def _pairs(shapes, seed=0):
    torch.manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    return ps, [nn.Parameter(p.detach().clone()) for p in ps]


def _same_gradients(*lists):
    for ps in zip(*lists):
        g = torch.randn_like(ps[0]) * 0.1
        for p in ps: p.grad = g.clone()


@pytest.mark.parametrize('decoupled', [False, True], ids=['Adam8bit', 'AdamW8bit'])
def test_8bit_equals_bitsandbytes(decoupled):
    """8-bit Adam and AdamW (rounded to nearest) beside bitsandbytes' `Adam8bit` / `AdamW8bit` on CPU for 50 steps,
    params of 256-element blocks and not: the codes and absmax of both moments equal bitsandbytes' (all but
    1 in 1000 codes, where the two absmax differ in their last bit), params within bitsandbytes' own test
    tolerance for its 8-bit optimizers (atol 3e-3, rtol 1e-3)."""
    bnb = pytest.importorskip('bitsandbytes', reason='bitsandbytes does not install here')
    ps, qs = _pairs([(64, 128), (256, 33), (5000,)])
    wd = 1e-2 if decoupled else 0.
    theirs = (bnb.optim.AdamW8bit if decoupled else bnb.optim.Adam8bit)(ps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                                                         weight_decay=wd)
    ours = fastforeach.Adam(qs, 1e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=wd,
                            state_format=StateFormat('8bit', rounding='nearest'))
    for t in range(50):
        _same_gradients(ps, qs)
        theirs.step(); ours.step()
        for p, q in zip(ps, qs):
            s, o = theirs.state[p], ours.state[q]
            for k, key in ((1, 'grad_avg'), (2, 'sqr_avg')):
                assert (s[f'state{k}'].reshape(-1) == o[key + CODES].reshape(-1)).float().mean() >= 0.999, (t, key)
                torch.testing.assert_close(o[key + SCALE], s[f'absmax{k}'], rtol=1e-6, atol=0)
        for p, q in zip(ps, qs): torch.testing.assert_close(q, p, atol=3e-3, rtol=1e-3)


@pytest.mark.parametrize('fmt,fused', [('8bit', False), ('4bit', False), ('4bit', True)])
def test_lowbit_equals_torchao(fmt, fused):
    """AdamW with 8-bit or 4-bit averages (rounded to nearest) beside torchao's `AdamW8bit` / `AdamW4bit` on CPU
    for 50 steps. 4 bits: torchao's format, code for code (both moments), params within 1e-5 (fused: all but 1
    in 1000, whose update's last bits put it on the other side of a code's boundary once). 8 bits:
    bitsandbytes' codes, where torchao's rounding differs in a few codes in 100, so params within the
    distance each has from float32 AdamW (bitsandbytes' tolerance, atol 3e-3, rtol 1e-3)."""
    ao = pytest.importorskip('torchao.optim', reason='torchao does not install here')
    ps, qs = _pairs([(64, 128), (256, 32), (8192,)])
    theirs = (ao.AdamW4bit if fmt == '4bit' else ao.AdamW8bit)(ps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                                                 weight_decay=1e-2)
    ours = fastforeach.Adam(qs, 1e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=1e-2,
                            state_format=StateFormat(fmt, rounding='nearest'), fused=fused)
    for t in range(50):
        _same_gradients(ps, qs)
        theirs.step(); ours.step()
    for p, q in zip(ps, qs):
        if fmt == '4bit':
            for theirs_key, key in (('exp_avg', 'grad_avg'), ('exp_avg_sq', 'sqr_avg')):
                assert torch.equal(theirs.state[p][theirs_key].codes.reshape(-1), ours.state[q][key + CODES].reshape(-1)), key
            if not fused: torch.testing.assert_close(q, p, atol=1e-5, rtol=0)
            else:  # the compiled update's last bits differ from torchao's: a value on a code's boundary may go either way
                assert ((q - p).abs() <= 1e-5).float().mean() >= 0.999 and (q - p).abs().max() <= 1e-3
        else: torch.testing.assert_close(q, p, atol=3e-3, rtol=1e-3)


@pytest.mark.parametrize('name,cfg', [('SGD', 'mom'), ('RMSProp', 'mom'), ('Adam', 'default'), ('QHAdam', 'default'),
                                      ('Larc', 'larc'), ('Lamb', 'default'), ('ranger', 'default'),
                                      ('Lookahead', 'k_alpha'), ('Lion', 'default'), ('Adan', 'default'),
                                      ('StableAdam', 'default'), ('ScheduleFreeAdam', 'default'), ('Muon', 'default')])
@pytest.mark.parametrize('fmt', ['8bit', '4bit', '8bit-companded'])
def test_every_optimizer_keeps_its_averages_in_few_bits(name, cfg, fmt):
    """Every optimizer that keeps an average, in each format: its averages of large params are codes and scales
    (uint8, float32), what is not an average (ScheduleFreeAdam's z, Adan's previous gradient) and the state
    of small params stay in full precision; after 30 steps its params stay near the full-precision
    optimizer's (8 bits: within a quarter of the distance moved; Lion's sign flips on the smallest
    differences, hence so large a bound)."""
    spec, options = REGISTRY[name], REGISTRY[name].configs[cfg]
    lowbit = StateFormat(fmt, min_numel=MIN_NUMEL)
    twins = Twins(lambda ps: spec.make('foreach', ps, **options),
                  lambda ps: spec.make('foreach', ps, **options, state_format=lowbit), oracle_layers(torch.float32))
    start = [p.detach().clone() for _, p, _ in twins.pairs()]
    for _ in range(30): twins.step(spec.lr)
    averages, n_coded = _averages(spec, options), 0
    for _, _, pb in twins.pairs():
        state = inner_optimizer(twins.opt_b).state.get(pb, {})
        large = pb.numel() >= MIN_NUMEL and FORMATS[fmt].fits(pb.numel())
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or key.endswith((CODES, SCALE)): continue
            assert value.is_floating_point() and not (key in averages and large), (name, key)
        for key in averages:
            if key + CODES in state:
                assert large and state[key + CODES].dtype == torch.uint8
                assert state[key + SCALE].dtype == FORMATS[fmt].scale_dtype
                n_coded += 1
    assert n_coded
    moved = max((pa.detach() - p0).abs().max().item() for (_, pa, _), p0 in zip(twins.pairs(), start))
    diff = max((pa - pb).abs().max().item() for _, pa, pb in twins.pairs())
    assert diff <= (1.5 if fmt == '4bit' else 0.25) * moved, (diff, moved)


@pytest.mark.parametrize('fmt,dtype', [('8bit', torch.float32), ('8bit', torch.float64), ('8bit', torch.bfloat16),
                                       ('4bit', torch.float32)])
def test_fused_codes_equal_foreach(fmt, dtype):
    """8-bit and 4-bit Adam rounded to nearest, fused (decoded, stepped and coded in one compiled loop) beside foreach
    (chunks decoded, stepped, coded eagerly) for 10 steps, params of whole blocks and not, of one block's
    tail only, and small: the same codes (all but where the two steps' last bits put a value on either side
    of a code's boundary), scales and params as close as the two ways of computing the update leave them (bf16:
    the weights with their Kahan buffers, within 2% of the move; small params' bf16 state is rounded with
    noise hashed from values the two steps compute in their own ways)."""
    torch.manual_seed(0)
    shapes = [(64, 128), (256, 33), (5000,), (300,), (4100,)]
    ps = [nn.Parameter((torch.randn(s) * 0.1).to(dtype)) for s in shapes]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    lowbit = StateFormat(fmt, rounding='nearest', min_numel=1000)
    a, b = (fastforeach.Adam(xs, 1e-3, state_format=lowbit, fused=fused) for xs, fused in ((ps, False), (qs, True)))
    for _ in range(10):
        _same_gradients(ps, qs)
        a.step(); b.step()
    n_coded = 0
    for p, q in zip(ps, qs):
        for key in ('grad_avg', 'sqr_avg'):
            if key + CODES not in a.state[p]: continue
            n_coded += 1
            assert (a.state[p][key + CODES] == b.state[q][key + CODES]).float().mean() >= 0.999, key
            torch.testing.assert_close(b.state[q][key + SCALE], a.state[p][key + SCALE], rtol=1e-5, atol=0)
        torch.testing.assert_close(_weights(b, q), _weights(a, p), atol=1e-5 if dtype != torch.bfloat16 else 2e-4, rtol=0)
    assert n_coded == 2 * sum(p.numel() >= 1000 and FORMATS[fmt].fits(p.numel()) for p in ps) >= 4


def test_fused_params_not_dense_decode_in_chunks(monkeypatch):
    """A channels-last param (its storage not in the order of its flat index) cannot be cut into rows by aliasing:
    its bucket steps by the chunked path, with the same codes as a foreach step."""
    taken = []
    for path in (paths.QUANTIZED, paths.CODED_FUSED):
        monkeypatch.setattr(path, 'step', lambda *a, _step=path.step, _name=path.name: (taken.append(_name), _step(*a)))
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last))]
    qs = [nn.Parameter(ps[0].detach().clone())]
    lowbit = StateFormat('8bit', rounding='nearest')
    a, b = (fastforeach.Adam(xs, 1e-3, state_format=lowbit, fused=fused) for xs, fused in ((ps, False), (qs, True)))
    for _ in range(3):
        _same_gradients(ps, qs)
        a.step(); b.step()
    assert set(taken) == {paths.QUANTIZED.name}
    assert torch.equal(a.state[ps[0]]['grad_avg_codes'], b.state[qs[0]]['grad_avg_codes'])


@pytest.mark.parametrize('fmt,rounding', [('8bit', 'kahan'), ('8bit', 'master24'), ('8bit-companded', 'stochastic')])
def test_fused_bf16_params_code_in_one_pass(fmt, rounding, monkeypatch):
    """bf16 params with 8-bit state, fused: stepped in the one-pass loop (the param written back with Kahan
    summation, 24-bit masters or stochastic rounding, the scales exactly), near the foreach step's params
    after 5 steps: the weights with their buffers within a quarter of the largest move (the state's stochastic codes
    differ); stochastically rounded params, whose every step is a draw, on average within a third of the
    average move (measured: a sixth)."""
    taken = []
    monkeypatch.setattr(paths.CODED_FUSED, 'step', lambda *a, _step=paths.CODED_FUSED.step: (taken.append(1), _step(*a)))
    torch.manual_seed(0)
    ps = [nn.Parameter((torch.randn(s) * 0.1).bfloat16()) for s in [(64, 128), (4100,), (30,)]]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    start = [p.detach().float() for p in ps]
    lowbit = StateFormat(fmt, min_numel=1000)
    a, b = (fastforeach.Adam(xs, 1e-3, state_format=lowbit, fused=fused, rounding=rounding) for xs, fused in ((ps, False), (qs, True)))
    for _ in range(5):
        _same_gradients(ps, qs)
        a.step(); b.step()
    assert taken and b.state[qs[0]]['grad_avg_scale'].dtype == FORMATS[fmt].scale_dtype
    for p, q, p0 in zip(ps, qs, start):
        wp, wq = _weights(a, p), _weights(b, q)
        if rounding != 'stochastic': assert (wq - wp).abs().max() <= 0.25 * (wp - p0).abs().max()
        else: assert (wq - wp).abs().mean() <= (wp - p0).abs().mean() / 3


def _weights(opt, p):
    "`p`'s weights in float32, with its buffer (Kahan's, a 24-bit master's byte) where it has one."
    comp = opt.state[p].get('kahan_comp')
    return master_value(p.detach(), comp) if comp is not None else p.detach().float()


@pytest.mark.parametrize('fmt,fused', [('8bit', False), ('4bit', False), ('8bit-companded', True)])
def test_averages_keep_their_increments(fmt, fused):
    """QHAdam's second moment (β = 0.999) over 1000 steps of gradients 1 ± 0.5: written back stochastically, its
    mean stays within 1% of float64's. Rounded to nearest, increments of 0.1% fall under half a code's
    spacing and vanish: 4 bits end more than 5% off; 8 bits, whose dynamic map is finer there, 0.8% off,
    ten times stochastic rounding's error (fixed seeds)."""
    gen = torch.Generator().manual_seed(0)
    grads = [1 + (torch.rand(4096, generator=gen, dtype=torch.float64) - 0.5) for _ in range(1000)]
    results = {}
    for rounding in ('stochastic', 'nearest', None):
        torch.manual_seed(0)
        p = nn.Parameter(torch.zeros(4096, dtype=torch.float64 if rounding is None else torch.float32))
        opt = fastforeach.QHAdam([p], 1e-9, state_format=StateFormat(fmt, rounding=rounding) if rounding else None,
                                 fused=fused)
        for g in grads:
            p.grad = g.to(p.dtype)
            opt.step()
        results[rounding] = opt.fastai_state_dict()['state'][0]['sqr_avg'].double().mean().item()
    off = {rounding: abs(results[rounding] / results[None] - 1) for rounding in ('stochastic', 'nearest')}
    assert off['stochastic'] < 0.01, results
    assert off['nearest'] > (0.05 if fmt == '4bit' else 5 * off['stochastic']), results


def _step_alike(a, a_params, b, b_params, steps: int) -> None:
    "`steps` steps of `a` and `b` with the same gradients and the same random state; then their params are equal."
    for _ in range(steps):
        _same_gradients(a_params, b_params)
        seed = torch.seed()
        a.step()
        torch.manual_seed(seed)
        b.step()
    for p, q in zip(a_params, b_params): assert torch.equal(p, q)


def _assert_same_states(sd_a: dict, sd_b: dict) -> None:
    "Every value of two fastai-face state dicts equal, key by key."
    for a, b in zip(sd_a['state'], sd_b['state']):
        for k in a: assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


def _assert_within_8bit_rounding(got: torch.Tensor, want: torch.Tensor, nonnegative: bool) -> None:
    "`got` within half the 8-bit map's widest gap of `want`'s largest magnitude: what one encoding may move a value."
    gap = FORMATS['8bit'].map(nonnegative).diff().max().item()
    torch.testing.assert_close(got, want, atol=gap / 2 * want.abs().max().item() * (1 + 1e-5), rtol=0)


def _adam(ps, fmt, rounding='nearest', fused=False):
    return fastforeach.Adam(ps, 1e-3, state_format=StateFormat(fmt, rounding=rounding) if fmt else None, fused=fused)


def _trained(fmt, rounding='nearest', steps=5, seed=0, fused=False):
    ps, _ = _pairs([(64, 128), (300,)], seed)
    opt = _adam(ps, fmt, rounding, fused)
    for _ in range(steps):
        _same_gradients(ps)
        opt.step()
    return ps, opt


@pytest.mark.parametrize('fmt,fused,rounding', [(fmt, fused, rounding) for fmt in ('8bit', '4bit', '8bit-companded')
                                                for rounding in ('nearest', 'stochastic') for fused in (False, True)
                                                if not fused or rounding == 'stochastic' and fmt != '4bit'])
def test_checkpoint_resumes_bit_for_bit(fmt, fused, rounding):
    """A state dict holds codes and scales (about 1 or 0.5 bytes an element), saves and loads with torch.save,
    and a fresh optimizer resumed from it steps as the original does, bit for bit (stochastic rounding:
    given the same random state; the fused step's noise is hashed from the data)."""
    ps, opt = _trained(fmt, rounding, fused=fused)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    state = opt.state_dict()['state'][0]
    assert 'grad_avg' not in state and state['grad_avg_codes'].dtype == torch.uint8
    assert state['grad_avg_codes'].numel() == 64 * 128 * FORMATS[fmt].bits // 8
    twins = [nn.Parameter(p.detach().clone()) for p in ps]
    resumed = _adam(twins, fmt, rounding, fused)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))  # fastai's hypers are an `L`
    _step_alike(opt, ps, resumed, twins, 3)
    _assert_same_states(opt.state_dict(), resumed.state_dict())


def test_checkpoints_cross_formats():
    """An 8-bit checkpoint loads into a full-precision optimizer (decoded), into fastai's own through
    `fastai_state_dict` (decoded, fastai's keys), and into a 4-bit one (decoded, encoded to nearest); a
    full-precision one loads into an 8-bit optimizer (encoded)."""
    import fastai.optimizer as native
    ps, opt = _trained('8bit')
    decoded = opt.fastai_state_dict()
    assert set(decoded['state'][0]) == {'step', 'grad_avg', 'sqr_avg'}
    full = _adam([nn.Parameter(p.detach().clone()) for p in ps], None)
    full.load_state_dict(opt.state_dict())
    for a, b in zip(decoded['state'], full.state_dict()['state']):
        for k in ('grad_avg', 'sqr_avg'): assert torch.equal(a[k], b[k])
    theirs = native.Adam([nn.Parameter(p.detach().clone()) for p in ps], 1e-3)
    theirs.load_state_dict(decoded)
    assert torch.equal(theirs.state[theirs.param_lists[0][0]]['grad_avg'], decoded['state'][0]['grad_avg'])
    four = _adam([nn.Parameter(p.detach().clone()) for p in ps], '4bit')
    four.load_state_dict(opt.state_dict())
    state = four.state_dict()['state'][0]
    assert state['grad_avg_codes'].numel() == 64 * 128 // 2
    widest = FORMATS['4bit'].map(False).diff().max().item()  # the 4-bit map's widest gap, in units of a block's absmax
    torch.testing.assert_close(four.fastai_state_dict()['state'][0]['grad_avg'], decoded['state'][0]['grad_avg'],
                               atol=widest / 2 * decoded['state'][0]['grad_avg'].abs().max().item() * (1 + 1e-5), rtol=0)
    # Encoded again, the values come back to within the 8-bit format's rounding, not code for code: the signed
    # dynamic map has 1 but not -1, so a block whose largest value is negative comes back with a smaller absmax.
    back = _adam([nn.Parameter(p.detach().clone()) for p in ps], '8bit')
    back.load_state_dict(full.state_dict())
    for a, b in zip(decoded['state'], back.fastai_state_dict()['state']):
        for k in ('grad_avg', 'sqr_avg'): _assert_within_8bit_rounding(b[k], a[k], k == 'sqr_avg')


def test_companded_and_bitsandbytes_checkpoints_are_told_apart():
    """Both 8-bit formats keep one byte an element: a checkpoint is known by its scales (bfloat16 per 64, float32
    per 256), and loads into an optimizer of the other format decoded and coded again (within the other's
    rounding), and into a full-precision one decoded."""
    ps, companded = _trained('8bit-companded')
    decoded = companded.fastai_state_dict()['state'][0]
    into_8bit = _adam([nn.Parameter(p.detach().clone()) for p in ps], '8bit')
    into_8bit.load_state_dict(companded.state_dict())
    assert into_8bit.state_dict()['state'][0]['grad_avg_scale'].dtype == torch.float32
    for k in ('grad_avg', 'sqr_avg'): _assert_within_8bit_rounding(into_8bit.fastai_state_dict()['state'][0][k], decoded[k], k == 'sqr_avg')
    full = _adam([nn.Parameter(p.detach().clone()) for p in ps], None)
    full.load_state_dict(companded.state_dict())
    for k in ('grad_avg', 'sqr_avg'): assert torch.equal(full.state_dict()['state'][0][k], decoded[k])
    sd = companded.state_dict()
    sd['state'][0]['grad_avg_scale'] = sd['state'][0]['grad_avg_scale'].float()
    with pytest.raises(ValueError, match=r"scales are torch.float32 of shape \(128,\), expected torch.float32 of shape \(32,\)"):
        companded.load_state_dict(sd)


@pytest.mark.parametrize('breakage,match', [
    (lambda s: s.update(grad_avg_codes=s['grad_avg_codes'].float()),
     r"state 'grad_avg': codes are torch.float32 with 8192 elements, expected uint8 with 8192 elements \(8bit\)"),
    (lambda s: s.update(grad_avg_scale=s['grad_avg_scale'][:-1]), r"scales are torch.float32 of shape \(31,\), expected"),
    (lambda s: s.update(grad_avg_scale=s['grad_avg_scale'].double()), "scales are torch.float64"),
    (lambda s: s.pop('grad_avg_scale'), "scales are NoneType"),
    (lambda s: s.update(sqr_avg_codes=s['sqr_avg_codes'].reshape(-1)[:-2]), "state 'sqr_avg': codes are torch.uint8 with 8190"),
])
def test_bad_checkpoint_changes_nothing(breakage, match):
    "A checkpoint whose codes or scales do not fit (dtype, count, shape) is refused, naming param and key; nothing changes."
    ps, opt = _trained('8bit')
    sd = copy.deepcopy(opt.state_dict())
    breakage(sd['state'][0])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match) as e:
        opt.load_state_dict(sd)
    assert 'param group 0, param 0' in str(e.value)
    _assert_same_states(before, opt.state_dict())


@pytest.mark.parametrize('kwargs,match', [
    ({'state_format': '3bit'}, r"Invalid state_format: '3bit' \(must be one of \('8bit', '4bit', '8bit-companded'"),
    ({'state_format': 8}, "Invalid state_format: 8"),
    ({'state_format': {'exp_avg': '8bit'}}, "keeps no state 'exp_avg'"),
    ({'state_format': {'grad_avg': '2bit'}}, r"Invalid state_format\['grad_avg'\]: '2bit'"),
    ({'state_format': StateFormat('8bit'), 'rounding': 'nearest'}, "state_format with rounding='nearest'"),
    ({'state_format': '8bit', 'foreach': False}, "state_format='8bit' with foreach=False"),
])
def test_bad_state_format_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match): fastforeach.Adam([nn.Parameter(torch.zeros(3))], 1e-3, **kwargs)


def test_bad_state_format_options_are_refused():
    with pytest.raises(ValueError, match="Invalid state rounding: 'up'"): StateFormat('8bit', rounding='up')
    with pytest.raises(ValueError, match="Invalid min_numel: 0"): StateFormat('8bit', min_numel=0)
    with pytest.raises(ValueError, match="ScheduleFreeAdam|schedule_free_adam_step's state 'z' is not an average"):
        fastforeach.ScheduleFreeAdam([nn.Parameter(torch.zeros(3))], 1e-3, state_format={'z': '8bit'})
    with pytest.raises(ValueError, match="'prev_grad' is not an average"):
        fastforeach.Adan([nn.Parameter(torch.zeros(3))], 1e-3, state_format={'prev_grad': '8bit'})
    opt = fastforeach.Adam([nn.Parameter(torch.zeros(3))], 1e-3, state_format='8bit')
    with pytest.raises(ValueError, match="Optimizer accumulation is not defined for AdamForEachOptimizer with state_format"):
        opt.check_accumulation()


@pytest.mark.parametrize('fmt,bytes_per_param', [('8bit', 2.1), ('4bit', 1.1), ('8bit-companded', 2.1)])
def test_memory_counts_codes_and_scales(fmt, bytes_per_param):
    """`memory_report` counts the codes and scales: Adam's two averages on the benchmark's transformer take at most
    2.1 bytes a param in 8 bits (1.1 in 4), its small params' state in full precision included."""
    from fastforeach.bench.models import transformer
    params = [p for p in transformer().parameters()]
    opt = fastforeach.Adam(params, 1e-3, state_format=fmt)
    for p in params: p.grad = torch.zeros_like(p)
    opt.step()
    report = memory_report(params, opt)
    assert report['per_param']['state'] <= bytes_per_param, report['per_param']
    assert report['per_param']['params'] == 4 and report['per_param']['grads'] == 4


@pytest.mark.parametrize('model', ['xresnet50', 'transformer'])
def test_adam_in_bf16_with_24bit_masters_and_few_bit_state_fits_6_6_bytes(model):
    """bf16 params and gradients (2 + 2 bytes), 24-bit masters (1), the first moment in 4 bits and the
    second in 8 (0.53 + 1.02, the small params' state in bf16 included): at most 6.6 bytes a param."""
    from fastforeach.bench import models
    params = [p for p in models.MODELS[model]().bfloat16().parameters()]
    opt = fastforeach.Adam(params, 1e-3, rounding='master24', state_format={'grad_avg': '4bit', 'sqr_avg': '8bit'})
    for p in params: p.grad = torch.zeros_like(p)
    opt.step()
    report = memory_report(params, opt)['per_param']
    assert report['params'] == report['grads'] == 2 and report['total'] <= 6.6, report


def test_torch_face_keeps_codes_under_torchs_names():
    """The torch face's state dicts name the codes and scales after torch's keys (`exp_avg_codes`,
    `exp_avg_scale`), so that torch.optim's AdamW, which would read codes as values, finds no `exp_avg`; they
    load back into the torch face bit for bit (torch's own loading casts state to the param's dtype: the core
    takes it again), and into the fastai face's Adam."""
    from fastforeach import optim
    ps, _ = _pairs([(64, 128), (100,)])
    opt = optim.AdamW(ps, 1e-3, state_format='8bit')
    for _ in range(3):
        _same_gradients(ps)
        opt.step()
    sd, qs = opt.state_dict(), [nn.Parameter(p.detach().clone()) for p in ps]
    assert {'exp_avg_codes', 'exp_avg_scale', 'exp_avg_sq_codes', 'exp_avg_sq_scale'} <= set(sd['state'][0])
    assert 'exp_avg' not in sd['state'][0] and 'exp_avg' in sd['state'][1]  # the small param: full precision
    resumed = optim.AdamW(qs, 1e-3, state_format='8bit')
    resumed.load_state_dict(copy.deepcopy(sd))
    assert resumed.state[qs[0]]['grad_avg_codes'].dtype == torch.uint8
    _step_alike(opt, ps, resumed, qs, 2)
    fastai_face = fastforeach.Adam([nn.Parameter(p.detach().clone()) for p in ps], 1e-3, state_format='8bit')
    decoded = opt.fastai_state_dict()
    fastai_face.load_state_dict(decoded)
    for k in ('grad_avg', 'sqr_avg'):
        _assert_within_8bit_rounding(fastai_face.fastai_state_dict()['state'][0][k], decoded['state'][0][k], k == 'sqr_avg')


def test_eight_bit_averages_train_as_float32():
    """The benchmark's accuracy table on a subset (two seeds, three epochs): Adam with 8-bit averages, with
    float32 params and in pure bf16, with companded 8-bit averages, and in pure bf16 with 24-bit masters and
    averages in 4 and 8 bits, ends within a point of float32 Adam's mean accuracy on digits."""
    from fastforeach.bench.experiments.training import STATE_FORMATS, state_format_table
    setups = [s for s in STATE_FORMATS if s[0] in ('float32', '8-bit, stochastic', 'pure bf16 (Kahan), 8-bit, stochastic',
                                                    '8-bit companded, stochastic', 'pure bf16, 24-bit masters, 4/8-bit')]
    rows = {r['setup']: r for r in state_format_table(seeds=(0, 1), epochs=3, setups=setups)['rows']}
    base = rows.pop('float32')['accuracy']
    assert base > 0.9 and all(abs(r['accuracy'] - base) <= 0.01 for r in rows.values()), (base, rows)


@pytest.mark.skipif(shutil.which('gcc') is None, reason="the bound's C loop is compiled by gcc")
def test_the_hand_written_bound_steps_as_the_companded_step_does(tmp_path):
    """`scripts/few_bit_bound.py` times a C loop as the bound of the fused companded step's speed: it is one only
    while it does the same work, so one step of each from the same state must agree bit for bit."""
    spec = importlib.util.spec_from_file_location('few_bit_bound', ROOT / 'scripts' / 'few_bit_bound.py')
    bound = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bound)
    steps = bound.contenders(bound.build(tmp_path), 4 * 4096, threads=1)  # raises unless they agree
    assert list(steps) == ['torch fused float32 Adam', 'fastforeach fused, 8-bit companded', 'C loop, 8-bit companded']
