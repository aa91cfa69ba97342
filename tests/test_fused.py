"""What `fused=True` adds beyond the oracle: no recompiles, one graph for every layout, odd memory layouts,
a clean fallback when nothing compiles, and the factories' new keyword."""
import contextlib
import inspect
import operator
from functools import partial

import pytest
import torch
from torch import nn

import fastforeach
from fastforeach import fused
from fastforeach.fused import compile as compiling, compiled as compiled_steps, plans as fused_plans
from fastforeach.testing.cases import compiled_optimizers
from fastforeach.testing.oracle import oracle_layers
from fastforeach.core import inner_optimizer
from fastforeach.registry import REGISTRY
from fastforeach.testing.training import digits_learner
from test_oracle import against_fastai, assert_twins_equal


def graphs():
    from torch._dynamo.utils import counters
    return counters['stats']['unique_graphs']


@pytest.mark.parametrize('name', ['RAdam', 'ranger', 'Larc'])
def test_one_cycle_schedule_never_recompiles(name, tmp_path):
    "lr and mom change every batch and the step count grows, all without a new graph after the first step."
    learn = digits_learner(partial(REGISTRY[name].make, 'fused'), path=tmp_path)
    with learn.no_logging(), learn.no_bar():
        learn.fit_one_cycle(1, REGISTRY[name].lr)  # compiles, or finds compiled, on its first step
        before, compiled = graphs(), fused.compile_cache_info()
        learn.fit_one_cycle(2, slice(REGISTRY[name].lr / 10, REGISTRY[name].lr))
    assert learn.opt.hypers[0]['lr'] != learn.opt.hypers[-1]['lr']
    assert graphs() == before and fused.compile_cache_info() == compiled
    assert compiling._CHECKED and all(compiling._CHECKED.values())  # compiled for real, no foreach fallback


def test_one_graph_serves_every_layout():
    "Another model, other shapes and counts of params: the graphs compiled for the first are reused."
    def run(layers):
        opt = fastforeach.RAdam(layers, 1e-3, fused=True)
        for _ in range(3):
            for p in (p for g in layers for p in g): p.grad = torch.randn_like(p)
            opt.step()
    run(oracle_layers(torch.float32))
    before, compiled = graphs(), fused.compile_cache_info()
    run([[nn.Parameter(torch.randn(n, 2 * n + 1)) for n in range(1, 30)], [nn.Parameter(torch.randn(1))]])
    assert graphs() == before and fused.compile_cache_info() == compiled
    assert compiling._CHECKED and all(compiling._CHECKED.values())  # compiled for real, no foreach fallback


def _halve_update(p, g, c):
    "A compiled update of this test's own, so that nothing else has compiled it."
    p.sub_(c[0] * g)


def test_compile_check_with_grad_enabled_serves_the_step():
    """The check compiles under no_grad, as steps run, whatever the caller's grad mode (Lookahead checks its
    sync at the first step, outside the step's no_grad): the step then finds its graph, not a new one."""
    phases, like = ((_halve_update, fused.PLAIN),), torch.ones(3)
    with torch.enable_grad(): assert fused.compiles(phases, like, 2, 1)
    before = graphs()
    p, g = torch.ones(fused.WARMUP_SIZE + 5), torch.ones(fused.WARMUP_SIZE + 5)
    with torch.no_grad(): fused.run_chunks(phases, fused.chunked([[p], [g]]), torch.tensor([0.5]), 1)
    assert graphs() == before and torch.equal(p, torch.full_like(p, 0.5))


def _add_update(p, g, c):
    "A compiled update of this test's own: the param's float32 value plus its gradient, no coefficient."
    p.add_(g)


def test_every_tensor_of_a_chunk_draws_its_noise_from_the_seed():
    """A chunk of bf16 tensors rounded with noise in one compiled call equals, bit for bit, the same update
    run eagerly with the same seed: each tensor's noise comes from the step's seed and its place in the
    chunk, and from nothing else (inductor once read a one-element seed as one seed per element, past its
    end, in the 2nd to 8th tensors: noise from whatever memory lay there, or a crash). 24-bit masters:
    their buffers and the seed both travel with the chunk ('stochastic' takes the seed the same way)."""
    rounding = 'master24'
    phases, n = ((_add_update, fused.PLAIN),), compiling.CHUNK
    gen = torch.Generator().manual_seed(0)
    sizes = [50_000 + 777 * i for i in range(n)]  # past where a seed read per element leaves its allocation
    params = [torch.randn(k, generator=gen).to(torch.bfloat16) for k in sizes]
    grads = [torch.randn(k, generator=gen).to(torch.bfloat16) * 1e-3 for k in sizes]
    comps = [torch.randint(-128, 128, (k,), generator=gen, dtype=torch.int8) for k in sizes]
    originals = [p.clone() for p in params]
    dtypes = (torch.bfloat16, torch.bfloat16, torch.int8)
    with torch.no_grad():
        assert fused.compiles(phases, params[0], len(dtypes), 1, n, rounding, dtypes)
        eager = [[t.clone() for t in xs] for xs in (params, grads, comps)]
        torch.manual_seed(1)
        compiling._runner(_add_update, fused.PLAIN, rounding)([*eager, compiling._seeds(params[0], n)], torch.zeros(1))
        torch.manual_seed(1)
        fused.run_chunks(phases, fused.chunked([params, grads, comps]), torch.zeros(1), n, rounding)
    assert all(torch.equal(a, b) for a, b in zip(params, eager[0]))
    assert not any(torch.equal(a, b) for a, b in zip(params, originals))
    assert all(torch.equal(a, b) for a, b in zip(comps, eager[2]))


@pytest.mark.parametrize('name', ['SGD', 'Adam', 'RMSProp', 'Lamb', 'ranger'])
def test_odd_memory_layouts(name):
    "A channels-last param, a strided param with gaps, gradients laid out unlike their param: as fastai."
    spec = REGISTRY[name]
    torch.manual_seed(0)
    conv, wide, lin = torch.randn(8, 3, 3, 3), torch.randn(6, 10), torch.randn(4, 5)

    def layers():
        return [nn.Parameter(conv.clone().contiguous(memory_format=torch.channels_last)),
                nn.Parameter(wide.clone()[:, ::2]), nn.Parameter(lin.clone()), nn.Parameter(torch.ones(5))]
    native, fast = layers(), layers()
    assert not fused.is_dense(fast[1]) and fused.is_dense(fast[0]) and not fast[0].is_contiguous()
    opts = [spec.make('native', native, wd=0.01), spec.make('fused', fast, wd=0.01)]
    for _ in range(12):
        grads = [torch.randn_like(p, memory_format=torch.contiguous_format) for p in native]
        for ps in (native, fast):
            for p, g in zip(ps, grads): p.grad = g.clone()
        fast[2].grad = fast[2].grad.t().contiguous().t()  # same values, column-major
        for opt in opts: opt.step()
    assert fast[0].is_contiguous(memory_format=torch.channels_last) and fast[1].stride() == (10, 2)
    for a, b in zip(native, fast): torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_fallback_when_nothing_compiles(monkeypatch):
    "No compiler: one warning, then the foreach rule, with the same result; nothing half-applied."
    def no_compiler(*args, **kwargs): raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(compiling, '_CHECKED', {})
    monkeypatch.setattr(compiling, '_COMPILED', {})
    monkeypatch.setattr(torch, 'compile', no_compiler)
    spec = REGISTRY['Lamb']
    twins = against_fastai(spec, 'fused', oracle_layers(torch.float64))
    with pytest.warns(RuntimeWarning, match="could not compile the fused lamb_norms and lamb_apply") as record:
        for _ in range(5): twins.step(spec.lr)
    assert len([w for w in record if 'could not compile' in str(w.message)]) == 1
    assert_twins_equal(twins, torch.float64, 5)


def test_sizes_traced_another_way_when_the_first_fails(monkeypatch):
    "A PyTorch that cannot lower size-oblivious graphs (2.11) compiles with sizes 0 and 1 specialised: no fallback."
    tried = []

    @contextlib.contextmanager
    def unlowerable():
        tried.append('oblivious')
        yield
        raise RuntimeError("LoweringException: KeyError: 'unbacked_bindings'")

    @contextlib.contextmanager
    def specialised():
        tried.append('specialised')
        yield
    monkeypatch.setattr(compiling, '_CHECKED', {})
    monkeypatch.setattr(compiling, '_size_configs', lambda: (unlowerable, specialised))
    spec = REGISTRY['RMSProp']
    twins = against_fastai(spec, 'fused', oracle_layers(torch.float64))
    for _ in range(5): twins.step(spec.lr)  # a fallback warning would be an error (pytest.ini)
    assert tried == ['oblivious', 'specialised'] and all(compiling._CHECKED.values())
    assert_twins_equal(twins, torch.float64, 5)


def test_factories_take_fused():
    for name, spec in REGISTRY.items():
        if not spec.factory: continue
        factory = getattr(fastforeach, name)
        p = inspect.signature(factory).parameters['fused']
        assert p.kind is p.KEYWORD_ONLY and p.default is False
        layers = oracle_layers()
        opt = factory(layers, 1e-3, fused=True)
        steps = inner_optimizer(opt).fused_steps
        assert steps and all(isinstance(f, fused.FusedStep) for f in steps), name
        assert getattr(factory(layers, 1e-3), 'fused', None) in (None, False), name
    with pytest.raises(ValueError, match="fused=True with foreach=False"): fastforeach.Adam(oracle_layers(), 1e-3, foreach=False, fused=True)
    with pytest.raises(ValueError, match="Invalid fused: 'yes'"): fastforeach.Adam(oracle_layers(), 1e-3, fused='yes')


def test_lookahead_fused_sync(monkeypatch):
    """Lookahead's slow-weight sync: compiled for the param above the pack threshold, foreach for the rest;
    its compiling is checked at the first step, not left to the first sync."""
    from fastforeach import lookahead
    synced, checked = [], []
    def spy(phases, chunks, c, n):
        synced.append(n)
        return run_chunks(phases, chunks, c, n)
    def compiles_spy(*args):
        checked.append(twins.opt_b.count)
        return compiles(*args)
    run_chunks, compiles = lookahead.run_chunks, lookahead.compiles
    monkeypatch.setattr(lookahead, 'run_chunks', spy)
    monkeypatch.setattr(lookahead, 'compiles', compiles_spy)
    spec = REGISTRY['Lookahead']
    twins = against_fastai(spec, 'fused', oracle_layers(torch.float64), k=2)
    twins.step(spec.lr)
    assert checked and checked[0] == 0  # before the first step's count
    for _ in range(8): twins.step(spec.lr)
    assert twins.opt_b.fused and twins.opt_b.count == 9
    assert synced == [1] * 4  # the oracle's one large conv, at steps 2, 4, 6 and 8
    assert_twins_equal(twins, torch.float64, 9)


def test_lookahead_loaded_checks_its_sync_at_its_first_step(monkeypatch):
    "A fused Lookahead that loads slow weights from a state dict checks its compiled sync at its own first step."
    from fastforeach import lookahead
    spec, layers = REGISTRY['Lookahead'], oracle_layers(torch.float64)
    def stepped(opt, n):
        for _ in range(n):
            for p in (p for g in layers for p in g): p.grad = torch.randn_like(p)
            opt.step()
        return opt
    sd = stepped(spec.make('fused', layers, k=6), 3).state_dict()
    resumed = spec.make('fused', layers, k=6)
    resumed.load_state_dict(sd)
    checked = []
    def compiles_spy(*args):
        checked.append(resumed.count)
        return compiles(*args)
    compiles = lookahead.compiles
    monkeypatch.setattr(lookahead, 'compiles', compiles_spy)
    stepped(resumed, 1)
    assert checked == [3]  # before the first step's count, not at the sync at count 6


@pytest.mark.parametrize('name', ['Adam', 'RAdam'])
def test_fused_refuses_bad_input_before_anything_changes(name):
    layers = oracle_layers(torch.float64)
    opt = REGISTRY[name].make('fused', layers)
    for p in (p for g in layers for p in g): p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for g in layers for p in g]
    opt.hypers[0]['lr'] = float('nan')
    with pytest.raises(ValueError, match="Invalid lr"): opt.step()
    opt.hypers[0]['lr'] = 1e-3
    layers[1][0].grad = layers[1][0].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"): opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, (p for g in layers for p in g)))
    assert all(opt.state[p]['step'] == 1 for p in layers[0])


@pytest.mark.parametrize('name', ['SGD', 'RMSProp', 'ranger'])
def test_fused_optimizers_release_their_params(name):
    "Fused steps are shared module-wide; what one optimizer caches between steps must die with it."
    import gc
    import weakref
    p = nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    opt = getattr(fastforeach, name)([p], 1e-3, fused=True)
    opt.step()
    ref = weakref.ref(p)
    del opt, p
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize('options', [{'mom': 0.9}, {'mom': 0.9, 'wd': 0.01}, {'mom': 0.9, 'wd': 0.01, 'decouple_wd': False}])
def test_sgd_momentum_scheduled_to_zero(options):
    "PyTorch's SGD kernel skips the buffer at momentum 0; fastai sets it to the gradient. Same as fastai here."
    spec = REGISTRY['SGD']
    twins = against_fastai(spec, 'fused', oracle_layers(torch.float64), **options)
    for t in range(6):
        for opt in (twins.opt_a, twins.opt_b): opt.set_hyper('mom', 0. if t % 2 else 0.9)
        twins.step(spec.lr, vary_mom=False)
    assert_twins_equal(twins, torch.float64, 6)


def test_nan_in_a_pass_does_not_recompile():
    """LAMB's first pass hands its norms to the second; a NaN norm (a NaN param) must not mean a new graph.
    (Handed over as 0-d tensors, dynamo read them as floats and recompiled on every NaN.)"""
    p = nn.Parameter(torch.randn(1, dtype=torch.float64))
    opt = fastforeach.Lamb([p], 0.0625, mom=0., sqr_mom=0., eps=1e-8, fused=True)
    p.grad = torch.randn_like(p)
    opt.step()
    before = graphs()
    for i in range(6):
        p.grad = torch.zeros_like(p) if i % 2 else torch.randn_like(p)
        with torch.no_grad(): p.fill_(float('nan') if i % 3 == 0 else 1.)
        opt.step()
    assert graphs() == before


@pytest.mark.parametrize('options', [{'wd': 0.01}, {'mom': 0.9, 'wd': 0.01}])
def test_sgd_decoupled_decay_on_large_tensors_is_compiled(options, monkeypatch):
    "Large tensors with decoupled decay: SGD's compiled one-pass update, still equal to fastai."
    ran, run_chunks = [], fused.run_chunks
    def spy(phases, *args):
        ran.extend(update.__name__ for update, _ in phases)
        return run_chunks(phases, *args)
    monkeypatch.setattr(compiled_steps, 'run_chunks', spy)
    spec = REGISTRY['SGD']
    torch.manual_seed(0)
    layers = [[nn.Parameter(torch.randn(150, 150)) for _ in range(3)] + [nn.Parameter(torch.randn(150))]]
    twins = against_fastai(spec, 'fused', layers, **options)
    for t in range(1, 6): twins.step(spec.lr)
    assert_twins_equal(twins, torch.float32, 5)
    update = 'momentum_sgd_update' if options.get('mom') else 'sgd_update'
    assert ran.count(update) >= 5  # one call per step at least, not the kernel


def _state_buffers(opt, params, key):
    "The 1-d alias over the `key` state of `params` when it lies end to end, else None."
    return fused.end_to_end([opt.state[p][key] for p in params])


@pytest.mark.parametrize('name', compiled_optimizers())
def test_small_params_are_stepped_as_one_pack(name, monkeypatch):
    """Compiled updates step every small param of a (group, do_wd) split as one pack, over state that lives
    end to end, in one compiled call per phase; a large param gets calls of its own. Equal to fastai."""
    calls, compiled = [], compiling._compiled
    def spy(*key):  # records the size of the first real tensor of every compiled call
        fn = compiled(*key)
        def call(tensors, c):
            first = tensors[0][0] if isinstance(tensors[0], list) else tensors[0]
            if first.numel() != fused.WARMUP_SIZE: calls.append(first.numel())  # not compiling on dummies
            return fn(tensors, c)
        return call
    monkeypatch.setattr(compiling, '_compiled', spy)
    spec = REGISTRY[name]
    torch.manual_seed(0)
    small = [nn.Parameter(torch.randn(3 + i % 5, 7)) for i in range(30)]
    large = nn.Parameter(torch.randn(fused.PACK_MAX_NUMEL['cpu'] + 1))
    norms = [nn.Parameter(torch.randn(5)) for _ in range(4)]  # 1-d: do_wd=False in Twins
    groups = [small[:10] + [large] + norms, small[10:] + [nn.Parameter(torch.randn(2))]]
    twins = against_fastai(spec, 'fused', groups, wd=0.01)
    step = inner_optimizer(twins.opt_b).fused
    # Larc's pack skips its L2 phase: the decay here is decoupled.
    calls_per_pack = 1 if name == 'Larc' else len(step.pack_phases) or 1
    calls_per_large = 2 if step.then else 1
    # Group 0's small params with decay, its norms without, its large param alone; group 1's small params
    # (its last param has no gradient).
    packs = [sum(p.numel() for p in ps) for ps in (small[:10], norms, small[10:])]
    expected = sorted(packs * calls_per_pack + [large.numel()] * calls_per_large)
    built = []
    class CountedPack(fused.Pack):
        __slots__ = ()
        def __init__(self, *args):
            built.append(self)
            super().__init__(*args)
    monkeypatch.setattr(fused_plans, 'Pack', CountedPack)
    for t in range(1, 6):
        calls.clear()
        twins.step(spec.lr)
        assert sorted(calls) == expected
        # Built on the first step, which moves the new state in, and the second, which finds it in place;
        # kept from then on, though the harness hands in new gradient tensors every step.
        assert len(built) == 3 * min(t, 2)
    assert_twins_equal(twins, torch.float32, 5)
    opt, (g0, g1) = twins.opt_b, twins.params_b
    inner = inner_optimizer(opt)
    for key in inner.rule.state_keys:
        for packed in (g0[:10], g0[11:15], g1[:-1]):
            assert _state_buffers(inner, sorted(packed, key=torch.numel), key) is not None, key
        flat = _state_buffers(inner, sorted(g0[:10], key=torch.numel), key)
        big = inner.state[g0[10]][key]
        assert not (flat.data_ptr() <= big.data_ptr() < flat.data_ptr() + flat.nbytes), key


NORMED = [pytest.param(name, options, id=f"{name}-{cfg}") for name in ('Larc', 'Lamb', 'StableAdam')
          for cfg, options in REGISTRY[name].configs.items()]


@pytest.mark.parametrize('name,options', NORMED)
def test_multi_tensor_pack_norms_equal_fastai(name, options, monkeypatch):
    """CUDA's way of taking a pack's per-param norms and spreading per-param values (one `_foreach_norm` over
    views, a gather through a kept index, a kept scratch buffer), run on CPU over every oracle param packed: equal to
    fastai in float64, as the CPU's way is (the oracle on CUDA runs it there)."""
    from fastforeach.fused import packs
    monkeypatch.setattr(packs, 'MULTI_TENSOR_DEVICES', {'cpu', 'cuda'})
    monkeypatch.setitem(fused.PACK_MAX_NUMEL, 'cpu', fused.PACK_MAX_NUMEL['cuda'])
    viewed = []
    views = packs.Pack._views
    monkeypatch.setattr(packs.Pack, '_views', lambda self, flat: viewed.append(flat) or views(self, flat))
    spec = REGISTRY[name]
    twins = against_fastai(spec, 'fused', oracle_layers(torch.float64), **options)
    for t in range(1, 31):
        twins.step(spec.lr)
        if t in (1, 2, 30): assert_twins_equal(twins, torch.float64, t)
    assert viewed


@pytest.mark.parametrize('name', ['RMSProp', 'QHAdam'])
def test_multi_tensor_pack_elementwise_graph_of_one(name, monkeypatch):
    """On CUDA an elementwise update steps a pack in a graph of one tensor per list, not the chunked graph
    padded with one-element dummies (each a kernel launch): run on CPU, every oracle param packed, equal to
    fastai in float64, the pack's call given lists of one tensor."""
    from fastforeach.fused import compiled, packs
    monkeypatch.setattr(packs, 'MULTI_TENSOR_DEVICES', {'cpu', 'cuda'})
    monkeypatch.setitem(fused.PACK_MAX_NUMEL, 'cpu', fused.PACK_MAX_NUMEL['cuda'])
    lengths = []
    chunked = compiled.chunked
    monkeypatch.setattr(compiled, 'chunked', lambda lists, *size: lengths.append(size) or chunked(lists, *size))
    spec = REGISTRY[name]
    twins = against_fastai(spec, 'fused', oracle_layers(torch.float64), **spec.configs['wd'])
    for t in range(1, 31):
        twins.step(spec.lr)
        if t in (1, 2, 30): assert_twins_equal(twins, torch.float64, t)
    assert lengths and all(size == (1,) for size in lengths)


@pytest.mark.parametrize('name', ['RMSProp', 'Lamb'])
def test_pack_finds_gradients_written_in_place(name, monkeypatch):
    """Gradients written in place between steps (as fastai zeroes them) are found where the pack's last step
    left them without checking each tensor again; one given new data under the same tensor, or replaced by a
    new tensor, is noticed. Equal to fastai in float64 at every step."""
    from fastforeach.fused import packs
    found = []
    laid_as_before = packs.Pack._laid_as_before
    monkeypatch.setattr(packs.Pack, '_laid_as_before', lambda self, grads: found.append(laid_as_before(self, grads)) or found[-1])
    spec = REGISTRY[name]
    twins = against_fastai(spec, 'fused', oracle_layers(torch.float64), **spec.configs['wd'])
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 11):
        for where, pa, pb in twins.pairs():
            if where == twins.no_grad: continue
            g = torch.randn(pa.shape, generator=gen, dtype=pa.dtype)
            pa.grad = g.clone()
            if pb.grad is None or (t == 6 and where == (0, 0)): pb.grad = g.clone()   # a new tensor
            elif t == 4 and where == (0, 1): pb.grad.data = g.clone()                 # new data, same tensor
            else: pb.grad.copy_(g)                                                    # in place
        twins.opt_a.step(); twins.opt_b.step()
        assert_twins_equal(twins, torch.float64, t)
        if t == 3: assert found[-1]
    assert found.count(False) >= 3 and found.count(True) >= 5


@pytest.mark.parametrize('decouple_wd', [True, False])
def test_larc_pack_phases_and_local_lrs(decouple_wd, monkeypatch):
    """Larc's pack takes its L2 phase only with L2 (decoupled decay rides on the move), and keeps the
    `local_lr`s it stores as the same tensors from step to step, each step's values in them. Equal to fastai."""
    from fastforeach.optimizers import larc
    phases = []
    def spy(update, tensors, c, *args, **kwargs):
        phases.append(update.__name__)
        return run_flat(update, tensors, c, *args, **kwargs)
    run_flat = larc.run_flat
    monkeypatch.setattr(larc, 'run_flat', spy)
    spec = REGISTRY['Larc']
    torch.manual_seed(0)
    layers = [[nn.Parameter(torch.randn(4, 6)) for _ in range(5)]]
    options = {'wd': 0.01, 'decouple_wd': decouple_wd}
    twins = against_fastai(spec, 'fused', layers, mark_no_wd=False, **options)
    stored = []
    for _ in range(4):
        phases.clear()
        twins.step(spec.lr)
        assert phases == ['l2_update'] * (not decouple_wd) + ['momentum_larc_apply']
        stored.append([twins.opt_b.state[p]['local_lr'] for p in twins.params_b[0][:-1]])  # the last: no gradient
        assert_twins_equal(twins, torch.float32, 'a step')
    # Steps 1 and 2 build the pack (the second over state moved in place); from then on it is kept.
    assert all(map(operator.is_, stored[2], stored[3]))


def test_larc_pack_with_decay_below_zero():
    "lr·wd above 1 makes the decay factor negative: ‖decay·p‖ is |decay|·‖p‖, not decay·‖p‖. Equal to fastai."
    spec = REGISTRY['Larc']
    torch.manual_seed(0)
    layers = [[nn.Parameter(torch.randn(4, 6)) for _ in range(4)]]
    options = {'wd': 0.5, 'clip': False}
    twins = against_fastai(spec, 'fused', layers, mark_no_wd=False, **options)
    for t in range(3):
        twins.step(4.0)  # lr 4.3 to 4.8 (Twins varies it): decay 1 − lr·wd about −1.2
        assert_twins_equal(twins, torch.float32, t + 1)


def test_pack_takes_in_state_changed_or_replaced_mid_run():
    """State stored in a pack stays the user's: changed in place through `opt.state` it is seen by the next
    step; replaced by another tensor, it is moved into a pack. Both sides stay equal to fastai's."""
    spec = REGISTRY['RAdam']
    torch.manual_seed(0)
    layers = [[nn.Parameter(torch.randn(4, 6)) for _ in range(5)] + [nn.Parameter(torch.randn(0, 3))]]
    twins = against_fastai(spec, 'fused', layers + [[nn.Parameter(torch.randn(2))]], mark_no_wd=False, wd=0.01)
    for _ in range(3): twins.step(spec.lr)
    ps_a, ps_b = twins.params_a[0], twins.params_b[0]
    for opt, ps in ((twins.opt_a, ps_a), (twins.opt_b, ps_b)):
        opt.state[ps[1]]['sqr_avg'].mul_(4)
        opt.state[ps[3]]['grad_avg'] = opt.state[ps[3]]['grad_avg'] * -1
    by_size = sorted(ps_b, key=torch.numel)  # a pack's order
    assert _state_buffers(twins.opt_b, by_size, 'grad_avg') is None
    for _ in range(3): twins.step(spec.lr)
    assert_twins_equal(twins, torch.float32, 'a change and 3')
    assert _state_buffers(twins.opt_b, by_size, 'grad_avg') is not None


@pytest.mark.cuda
@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('name', list(REGISTRY))
def test_cuda_steps_never_wait_for_the_gpu(name, impl):
    "Once compiled and packed, no step makes the host synchronize with the GPU (sync debug mode raises on any)."
    layers = oracle_layers(torch.float32, device='cuda')
    opt = REGISTRY[name].make(impl, layers)
    params = [p for g in layers for p in g][:-1]  # the last never gets a gradient

    def step():
        for p in params: p.grad = torch.randn_like(p)
        opt.step()
    step(); step()  # compiling and building packs may wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for _ in range(4): step()  # Lookahead and ranger sync their slow weights at the 6th
    finally: torch.cuda.set_sync_debug_mode('default')


def test_device_tensor():
    from fastforeach.ops import device_tensor
    t = device_tensor([1.5, 2, 3], torch.float64, torch.device('cpu'))
    assert t.dtype == torch.float64 and t.device.type == 'cpu' and t.tolist() == [1.5, 2., 3.]
    assert device_tensor(7., torch.float32, torch.device('meta')).device.type == 'meta'


@pytest.mark.parametrize('name', ['RAdam', 'Lamb', 'Larc'])
def test_packed_params_and_grads_live_in_the_pack(name):
    """A pack moves its params and gradients into its buffers once (the params' data become views of one
    buffer), and from then on steps them where they are: no copy of them is kept, in any dtype."""
    from fastforeach.memory import memory_report
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)])
    opt = getattr(fastforeach, name)(model.parameters(), REGISTRY[name].lr, fused=True)
    for _ in range(3):
        model(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()  # in place: the next backward accumulates into the pack's gradient buffer
    params = list(model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    assert len({p.grad.untyped_storage().data_ptr() for p in params}) == 1
    assert memory_report(params, opt)['fastforeach'] == 0


def test_a_pack_over_other_params_replaces_the_one_it_overlaps():
    """Freezing and unfreezing changes which params step: the pack over all drops the pack over some, and its
    buffer. (RMSProp: no step counts, which would keep the params that stepped first in a bucket of their own.)"""
    from fastforeach.memory import memory_report
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    opt = fastforeach.RMSProp(model.parameters(), 1e-3, fused=True)
    def step(frozen):
        for i, layer in enumerate(model):
            for p in layer.parameters(): p.requires_grad_(i >= frozen)
        model(torch.randn(2, 8)).sum().backward()
        opt.step(); opt.zero_grad()
        for p in model.parameters(): p.grad = None if not p.requires_grad else p.grad
    for frozen in (2, 2, 0, 0, 0): step(frozen)
    params = list(model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    assert memory_report(params, opt)['fastforeach'] == 0


GRAPHED = [pytest.param(name, cfg, id=f'{name}-{cfg}') for name, cfg in
           (('RMSProp', 'mom_l2'), ('RAdam', 'wd'), ('Larc', 'lars_l2'), ('Larc', 'larc_wd'), ('Lamb', 'wd'),
            ('StableAdam', 'clipping'))]


def _count_replays(monkeypatch) -> list:
    "Spy on `PackGraph.step`: appends True for each pack step replayed from a graph, False for each run eagerly."
    from fastforeach.fused import graphs
    replayed, step = [], graphs.PackGraph.step
    def spy(self, key, c, run):
        out = step(self, key, c, run)
        replayed.append(self.replay is not None)
        return out
    monkeypatch.setattr(graphs.PackGraph, 'step', spy)
    return replayed


@pytest.mark.parametrize('name,cfg', GRAPHED)
def test_pack_graphs_replay_equal_fastai(name, cfg, monkeypatch):
    """The logic of CUDA graphs run on CPU with CUDA's pack ways and a stand-in capture (the step run at once,
    each replay after the first calls it again on the graph's own coefficient vector, and what the capture
    returned is what every replay returns): a pack is captured after `WARM_STEPS` eager steps the same way,
    replayed from then on with each step's coefficients (a changing lr and mom), captured again when its
    phases change (RAdam's rectification, from step 6) or its gradients move; equal to fastai in float64."""
    from fastforeach.fused import graphs, packs
    monkeypatch.setattr(packs, 'MULTI_TENSOR_DEVICES', {'cpu', 'cuda'})
    monkeypatch.setitem(fused.PACK_MAX_NUMEL, 'cpu', fused.PACK_MAX_NUMEL['cuda'])
    monkeypatch.setattr(graphs, 'GRAPH_DEVICES', {'cpu', 'cuda'})
    captures = []
    def stand_in(step, c):
        outs, fresh = step(c), [True]
        captures.append(c)
        def replay():
            if fresh: fresh.pop()  # the step already ran, as a capture's first replay would run it
            else: step(c)
        return replay, outs
    monkeypatch.setattr(graphs, 'capture', stand_in)
    replayed = _count_replays(monkeypatch)
    spec = REGISTRY[name]
    twins = against_fastai(spec, 'fused', oracle_layers(torch.float64), **spec.configs[cfg])
    steps, held = [], []
    for t in range(1, 16):
        replayed.clear()
        # Step 9: new gradient tensors (a new address: eager again). The old ones are held, so that the new
        # ones cannot be laid out where the old ones were (malloc may hand a freed address straight back).
        if t == 9: held = [pb.grad for _, _, pb in twins.pairs()]
        twins.step(spec.lr, in_place=t != 9)
        assert_twins_equal(twins, torch.float64, t)
        steps.append(list(replayed))
    assert steps[0] and not any(steps[0] + steps[1]) and held
    assert all(steps[7]) and all(steps[-1])
    assert len(captures) > len(steps[0]) + (name == 'RAdam')


@pytest.mark.cuda
@pytest.mark.parametrize('name,cfg', GRAPHED)
def test_pack_graphs_on_cuda(name, cfg, monkeypatch):
    """On CUDA a settled pack's step is replayed from a graph: replays happen, and every param and state equals
    fastai's (float32) with gradients written in place, then new ones, then in place again."""
    from fastforeach.fused import graphs
    monkeypatch.setattr(graphs, 'GRAPH_DEVICES', {'cuda'})
    replayed = _count_replays(monkeypatch)
    spec = REGISTRY[name]
    twins = against_fastai(spec, 'fused', oracle_layers(torch.float32, 'cuda'), **spec.configs[cfg])
    for t in range(1, 31):
        twins.step(spec.lr, in_place=t != 12)
        if t in (3, 4, 11, 12, 30): assert_twins_equal(twins, torch.float32, t)
    assert sum(replayed) >= len(replayed) // 2
