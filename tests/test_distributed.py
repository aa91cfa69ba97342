"""DDP, FSDP2 and distributed checkpoints with 2 gloo ranks on CPU, in worlds these tests spawn
(`fastforeach.testing.worlds.spawn`), each rank one thread.

Each rank steps its half of every batch; the reference is one process stepping the whole batch (DDP
averages the ranks' gradients, FSDP2 reduce-scatters their average), so after 20 steps the params must be
the one process's, in float64, up to the rounding of a reduction done in another order (1e-12 relative).
The model has a LayerNorm (norm and bias params take no weight decay), a param with no gradient, two
param groups with their own lrs changed at every step, a param above the CPU pack threshold (8,400
elements on each rank: stepped one compiled call at a time), uneven shards (3 rows over 2 ranks) and an
empty one (a 1-element param leaves rank 1 nothing).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastforeach.core import inner_optimizer
from fastforeach.registry import REGISTRY
from fastforeach.testing.worlds import spawn

STEPS, BATCH, TOL = 20, 8, 1e-12


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.wide = nn.Linear(6, 7), nn.LayerNorm(7), nn.Linear(7, 2400)
        self.out, self.unused = nn.Linear(2400, 3), nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x): return self.out(F.relu(self.wide(self.norm(self.inp(x))))) * self.scale


def net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def param_groups(model: Net) -> list[list]:
    return [[*model.inp.parameters(), *model.norm.parameters()],
            [*model.wide.parameters(), *model.out.parameters(), *model.unused.parameters(), model.scale]]


def build(name, impl, model):
    "The optimizer over `model`'s two groups, norm and bias params marked `do_wd=False` as fastai's Learner does."
    opt = REGISTRY[name].make(impl, param_groups(model), **({'wd': 0.01} if name != 'Lookahead' else {}))
    for p in [*model.norm.parameters(), model.inp.bias, model.wide.bias, model.out.bias]: opt.state[p]['do_wd'] = False
    return opt


def batches(n, start=0):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 6, generator=gen, dtype=torch.double) for _ in range(start + n)][start:]


def train(model, opt, xs, lr, rank=None, world=1, first=0):
    "Step on each of `xs` (this rank's share of it), with both groups' lrs, from `lr`, moved at every step."
    for i, x in enumerate(xs, first):
        if rank is not None: x = x.chunk(world)[rank]
        model(x).pow(2).mean().backward()
        opt.set_hyper('lr', [lr * 0.97 ** i, lr * 0.5 * 0.97 ** i])
        opt.step()
        opt.zero_grad()


def whole(t) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def max_rel_diff(xs, ys) -> float:
    return max(((whole(x) - whole(y)).abs().max() / whole(y).abs().max().clamp_min(1e-300)).item()
               for x, y in zip(xs, ys))


def fsdp2(model):
    from torch.distributed.fsdp import fully_shard
    for layer in (model.inp, model.wide, model.out): fully_shard(layer)
    return fully_shard(model)


def ddp(model):
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, find_unused_parameters=True)


# --- equality with one process ---------------------------------------------------------------------

def _equal_to_one_process(rank, world):
    "Per (mode, optimizer, impl): the params' largest relative difference from one process, and what went wrong."
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate
    configs = [(name, impl) for name in REGISTRY for impl in ('foreach', 'fused')]
    # The one-process references, each trained by one rank (the whole batch, no collectives) and shared.
    mine = {}
    for name, impl in configs[rank::world]:
        reference = net()
        train(reference, build(name, impl, reference), batches(STEPS), REGISTRY[name].lr)
        mine[(name, impl)] = [p.detach() for p in reference.parameters()]
    shared = [None] * world
    dist.all_gather_object(shared, mine)
    references = {config: params for part in shared for config, params in part.items()}
    out = {}
    for name, impl in configs:
        lr = REGISTRY[name].lr
        for mode, wrap in (('ddp', ddp), ('fsdp2', fsdp2)):
            model = net()
            wrapped = wrap(model)  # before the optimizer: FSDP2 replaces the params with DTensors
            opt = build(name, impl, model)
            train(wrapped, opt, batches(STEPS), lr, rank, world)
            problems = []
            if mode == 'fsdp2':
                inner = inner_optimizer(opt)
                for p in model.parameters():
                    for key, s in inner.state[p].items():
                        if isinstance(s, torch.Tensor) and s.shape == p.shape and (
                                not isinstance(s, DTensor) or s.placements != p.placements):
                            problems.append(f"state {key!r} of a param of shape {tuple(p.shape)} is not sharded like it")
                        # Statistics over some dims (Adafactor's rows and columns): sharded with it along the
                        # others, replicated along a reduced dim it is sharded on.
                        if isinstance(s, torch.Tensor) and s.ndim == p.ndim and s.shape != p.shape:
                            expected = tuple(Replicate() if pl.is_shard() and s.shape[pl.dim] < p.shape[pl.dim] else pl
                                             for pl in p.placements)
                            if not isinstance(s, DTensor) or tuple(s.placements) != expected:
                                problems.append(f"state {key!r} of a param of shape {tuple(p.shape)} is not laid out with it")
                torch.save(opt.state_dict(), f"/dev/null")  # Larc's local_lr, Lookahead's slow weights...
            else:  # the replicas agree exactly
                flat = torch.cat([p.detach().flatten() for p in model.parameters()])
                gathered = [torch.empty_like(flat) for _ in range(world)]
                dist.all_gather(gathered, flat)
                if not all(torch.equal(g, gathered[0]) for g in gathered): problems.append("ranks differ")
            out[(mode, name, impl)] = (max_rel_diff(model.parameters(), references[(name, impl)]), problems)
    return out


@pytest.fixture(scope='module')
def one_process_results():
    return spawn(_equal_to_one_process)


@pytest.mark.xdist_group('one_process_results')  # one world for all of them
@pytest.mark.parametrize('mode', ['ddp', 'fsdp2'])
@pytest.mark.parametrize('impl', ['foreach', 'fused'])
@pytest.mark.parametrize('name', list(REGISTRY))
def test_equals_one_process(one_process_results, name, impl, mode):
    for rank, results in enumerate(one_process_results):
        diff, problems = results[(mode, name, impl)]
        assert diff < TOL, f"rank {rank}: {diff:.2e} from one process"
        assert not problems, f"rank {rank}: {problems}"


def _without_norm_all_reduce(rank, world):
    "FSDP2 Larc (LARS, unclipped) and Lamb with the norms of their shards alone: far from one process."
    from fastforeach.distributed import WholeNorms
    WholeNorms.complete = lambda self, local_norms: local_norms
    out = {}
    for name, options in (('Larc', {'clip': False}), ('Lamb', {})):
        for impl in ('foreach', 'fused'):
            lr, reference, model = REGISTRY[name].lr, net(), fsdp2(net())
            train(reference, REGISTRY[name].make(impl, param_groups(reference), **options), batches(5), lr)
            train(model, REGISTRY[name].make(impl, param_groups(model), **options), batches(5), lr, rank, world)
            out[(name, impl)] = max_rel_diff(model.parameters(), reference.parameters())
    return out


def test_sharded_norms_need_their_all_reduce():
    "Checks the check above: drop the all-reduce of the shards' norms and Larc and Lamb leave one process's path."
    for results in spawn(_without_norm_all_reduce):
        for key, diff in results.items(): assert diff > 1e-6, key


# --- checkpoints -----------------------------------------------------------------------------------

def _params(model): return [whole(p).detach().clone() for p in model.parameters()]


def _checkpoints(rank, world, directory, name):
    """Sharded: save at step 10 with torch.distributed.checkpoint, load into a fresh FSDP2 model, continue.
    Full: the same checkpoint gathered whole, resumed in one process by fastforeach and by fastai's own
    optimizer; and one process's full state dict loaded into FSDP2. What each continuation ends at, and
    whether reading or loading a state dict moved a param."""
    import fastai.optimizer
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from fastforeach.checkpoint import as_torch_optimizer
    first, rest = batches(10), batches(10, start=10)
    # Not strict: the param that never got a gradient has no state, as in fastai (and torch.optim).
    full, loose = StateDictOptions(full_state_dict=True, strict=False), StateDictOptions(strict=False)
    lr, result = REGISTRY[name].lr, {}

    model = fsdp2(net()); opt = build(name, 'fused', model)
    train(model, opt, first, lr, rank, world)
    dcp.save({'model': get_model_state_dict(model), 'optim': get_optimizer_state_dict(model, opt)},
             checkpoint_id=f"{directory}/{name}")
    # A copy: where nothing had to be gathered (Adafactor's replicated column statistics) a full state dict
    # holds the live tensors, as torch.optim's `state_dict` does.
    whole_sd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=full))
    whole_model = get_model_state_dict(model, options=full)
    train(model, opt, rest, lr, rank, world, first=10)
    result['straight'] = _params(model)

    resumed = fsdp2(net()); ropt = build(name, 'fused', resumed)
    before = _params(resumed)
    template = {'model': get_model_state_dict(resumed), 'optim': get_optimizer_state_dict(resumed, ropt)}
    result['template moved'] = max_rel_diff(_params(resumed), before)
    # The template has state for every param (torch.distributed.checkpoint creates it with a zero step); the
    # checkpoint none for the param that never got a gradient, as in fastai: a partial load leaves it at zero.
    dcp.load(template, checkpoint_id=f"{directory}/{name}", planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(resumed, template['model'])
    loaded = _params(resumed)
    set_optimizer_state_dict(resumed, ropt, template['optim'], options=loose)
    result['load moved'] = max_rel_diff(_params(resumed), loaded)
    train(resumed, ropt, rest, lr, rank, world, first=10)
    result['sharded resume'] = _params(resumed)

    # One process (every rank alone), from the full state dict: fastforeach, then fastai's own optimizer.
    for kind in ('fastforeach', 'fastai'):
        single = net(); single.load_state_dict(whole_model)
        sopt, sd = build(name, 'fused', single), copy.deepcopy(whole_sd)  # a loaded state shares its tensors
        if kind == 'fastai':
            native = REGISTRY[name].make('native', param_groups(single), **({'wd': 0.01} if name != 'Lookahead' else {}))
            set_optimizer_state_dict(single, as_torch_optimizer(sopt), sd, options=loose)
            native.load_state_dict(sopt.state_dict())  # fastai's own format and keys
            sopt = native
        else: set_optimizer_state_dict(single, sopt, sd, options=loose)
        train(single, sopt, rest, lr, first=10)
        result[f'{kind} resume'] = _params(single)

    # And back: one process's state dict, whole, loaded into FSDP2.
    single = net(); sopt = build(name, 'fused', single)
    train(single, sopt, first, lr)
    single_sd, single_model = get_optimizer_state_dict(single, sopt), single.state_dict()
    back = fsdp2(net()); bopt = build(name, 'fused', back)
    set_model_state_dict(back, single_model, options=full)
    set_optimizer_state_dict(back, bopt, single_sd, options=full)
    train(back, bopt, rest, lr, rank, world, first=10)
    result['from one process'] = _params(back)
    return result


@pytest.mark.parametrize('name', ['Adam', 'Larc', 'ranger', 'Adafactor'])
def test_distributed_checkpoints_resume_exactly(name, tmp_path):
    for rank, r in enumerate(spawn(_checkpoints, str(tmp_path), name)):
        assert r['template moved'] == 0 and r['load moved'] == 0, rank
        assert max_rel_diff(r['sharded resume'], r['straight']) == 0, rank  # the same shards, the same steps
        for kind in ('fastforeach resume', 'fastai resume', 'from one process'):
            assert max_rel_diff(r[kind], r['straight']) < TOL, (rank, kind)


def _bf16_buffers(rank, world, directory):
    "`_bf16_run` for Kahan buffers (fused) and 24-bit masters (foreach and fused), in one world."
    return {(rounding, impl): _bf16_run(rank, world, directory, rounding, impl)
            for rounding, impl in (('kahan', 'fused'), ('master24', 'foreach'), ('master24', 'fused'))}


def _bf16_run(rank, world, directory, rounding, impl):
    """bf16 params under FSDP2 with a buffer beside each (Kahan's, a 24-bit master's byte): whether the
    buffers are sharded like their params, in their dtype; the params after 10 steps straight and after a
    DCP save at step 5 resumed in a fresh model (the same seed for the noise of both continuations)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    from fastforeach.precision import COMP, master_value
    xs = [x.bfloat16() for x in batches(10)]

    def make():
        model = net().bfloat16()
        fsdp2(model)
        return model, REGISTRY['Adam'].make(impl, param_groups(model), wd=0.01, rounding=rounding)

    def steps(model, opt, part):
        for x in part:
            model(x.chunk(world)[rank]).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    def masters(model, opt):
        return [master_value(whole(p).detach(), whole(opt.state[p][COMP])).double() for p in model.parameters()
                if COMP in opt.state[p]]

    out = {}
    model, opt = make()
    steps(model, opt, xs[:5])
    dcp.save({'model': get_model_state_dict(model), 'optim': get_optimizer_state_dict(model, opt)},
             checkpoint_id=f"{directory}/{rounding}-{impl}")
    torch.manual_seed(rank + 1)
    steps(model, opt, xs[5:])
    dtype = torch.int8 if rounding == 'master24' else torch.float32
    held = [(p, opt.state[p][COMP]) for p in model.parameters() if COMP in opt.state[p]]
    out['laid out'] = bool(held) and all(isinstance(c, DTensor) and c.placements == p.placements and c.dtype == dtype
                                         for p, c in held)
    out['straight'] = masters(model, opt)

    resumed, ropt = make()
    template = {'model': get_model_state_dict(resumed), 'optim': get_optimizer_state_dict(resumed, ropt)}
    dcp.load(template, checkpoint_id=f"{directory}/{rounding}-{impl}", planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(resumed, template['model'])
    set_optimizer_state_dict(resumed, ropt, template['optim'], options=StateDictOptions(strict=False))
    torch.manual_seed(rank + 1)
    steps(resumed, ropt, xs[5:])
    out['resumed'] = masters(resumed, ropt)
    return out


def test_bf16_buffers_are_sharded_and_checkpointed(tmp_path):
    """bf16 params with Kahan buffers or 24-bit masters under FSDP2: the buffers are sharded like their
    params and a DCP checkpoint resumes bit for bit. (Not compared with one process: a bf16 model's
    gradients change with the batch's split and the weights' last bits, and Adam's normalised steps make
    those changes moves of up to lr: two one-process runs whose weights differ by the byte's 1/256 of an
    ulp end 60% of the largest move apart after 10 steps. The step's arithmetic on shards is that of
    `test_precision.py`'s runs.)"""
    for rank, runs in enumerate(spawn(_bf16_buffers, str(tmp_path))):
        for config, r in runs.items():
            assert r['laid out'], (rank, config)
            assert all(torch.equal(a, b) for a, b in zip(r['straight'], r['resumed'])), (rank, config)


# --- few-bit state under FSDP2 ----------------------------------------------------------------------

QUANTIZED = [(fmt, rounding, impl) for fmt in ('8bit', '8bit-companded') for rounding in ('stochastic', 'nearest')
             for impl in ('foreach', 'fused')]


def _given_gradients(model, step: int) -> None:
    "Every param's gradient for `step`, the same whole tensor on every rank and in one process (a shard of it under FSDP2)."
    from torch.distributed.tensor import DTensor, distribute_tensor
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-2
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else g


def _quantized_state(rank, world, directory):
    """Adam with 8-bit state (bitsandbytes' format and the companded one, stochastic and nearest, foreach and
    fused) on a model sharded by FSDP2 and in one process, both given the same whole gradients (FSDP2's
    reduce-scatter would sum them in another order): the quantized params' weights, codes and scales after 6
    steps, the state's layout, and a DCP checkpoint at step 3 resumed in a fresh model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    from fastforeach.lowbit import CODES, SCALE, StateFormat

    def make(fmt, rounding, impl, sharded):
        model = net()
        if sharded: fsdp2(model)
        return model, REGISTRY['Adam'].make(
            impl, param_groups(model), wd=0.01, state_format=StateFormat(fmt, rounding=rounding))

    def steps(model, opt, first, last):
        for t in range(first, last):
            _given_gradients(model, t)
            opt.step()
            opt.zero_grad()

    def held(model, opt):
        "(weight, codes, scales) of each param with few-bit state, whole."
        return [(whole(p).detach().clone(), *(whole(opt.state[p][k + suffix]).clone() for k in ('grad_avg', 'sqr_avg')
                                              for suffix in (CODES, SCALE)))
                for p in model.parameters() if 'grad_avg' + CODES in opt.state[p]]

    out = {}
    for fmt, rounding, impl in QUANTIZED:
        model, opt = make(fmt, rounding, impl, True)
        steps(model, opt, 0, 3)
        name = f"{directory}/{fmt}-{rounding}-{impl}"
        dcp.save({'model': get_model_state_dict(model), 'optim': get_optimizer_state_dict(model, opt)}, checkpoint_id=name)
        steps(model, opt, 3, 6)
        coded = [(p, opt.state[p]) for p in model.parameters() if 'grad_avg' + CODES in opt.state[p]]
        laid_out = len(coded) == 2 and all(
            isinstance(st['grad_avg' + CODES], DTensor) and st['grad_avg' + CODES].placements == p.placements
            and not isinstance(st['sqr_avg' + SCALE], DTensor) and st['sqr_avg' + SCALE].numel() == -(-p.numel() // (
                256 if fmt == '8bit' else 64)) for p, st in coded)
        straight = held(model, opt)

        resumed, ropt = make(fmt, rounding, impl, True)
        template = {'model': get_model_state_dict(resumed), 'optim': get_optimizer_state_dict(resumed, ropt)}
        dcp.load(template, checkpoint_id=name, planner=DefaultLoadPlanner(allow_partial_load=True))
        set_model_state_dict(resumed, template['model'])
        set_optimizer_state_dict(resumed, ropt, template['optim'], options=StateDictOptions(strict=False))
        steps(resumed, ropt, 3, 6)

        single, sopt = make(fmt, rounding, 'foreach', False)  # fused: the compiled loop rounds differently
        steps(single, sopt, 0, 6)
        out[(fmt, rounding, impl)] = {'laid out': laid_out, 'straight': straight, 'resumed': held(resumed, ropt),
                                      'one process': held(single, sopt)}
    return out


def test_quantized_state_under_fsdp2_equals_one_process(tmp_path):
    """8-bit state sharded with its params (codes as DTensors laid out as them, the scales of every block on
    every rank): code for code what one process holds, though shards start and end inside blocks (the
    blocks they share are scaled by their largest value over both ranks), and a DCP checkpoint resumes bit
    for bit. (fused=True steps sharded few-bit state by decoding it, as foreach does.)"""
    for rank, runs in enumerate(spawn(_quantized_state, str(tmp_path))):
        for config, r in runs.items():
            assert r['laid out'], (rank, config)
            for kind in ('resumed', 'one process'):
                assert len(r[kind]) == len(r['straight']) == 2, (rank, config, kind)
                for a, b in zip(r[kind], r['straight']):
                    assert all(torch.equal(x, y) for x, y in zip(a, b)), (rank, config, kind)


# --- fastai's Learner under DDP --------------------------------------------------------------------

def _learner_under_distrib_ctx(rank, world):
    """fastai's `distrib_ctx` on 2 CPU processes: accelerate's `cpu=True`, no SyncBatchNorm (it needs a GPU),
    and a shim for `DistributedDL._broadcast`, which moves the batch order to CUDA for NCCL: on gloo it
    broadcasts the CPU tensor. The final params of each implementation, and whether the ranks agree."""
    import torch.distributed as dist
    from fastai.distributed import DistributedDL

    from fastforeach.testing.training import digits_learner

    def broadcast_on_cpu(self, t, rank):
        t = torch.LongTensor(t)
        dist.broadcast(t, rank)
        return t.tolist()
    DistributedDL._broadcast = broadcast_on_cpu

    out = {}
    for impl in ('native', 'foreach', 'fused'):
        learn = digits_learner(lambda params, lr: REGISTRY['Adam'].make(impl, params, lr))
        with learn.no_logging(), learn.no_bar(), learn.distrib_ctx(sync_bn=False, cpu=True):
            learn.fit_one_cycle(2, lr_max=slice(1e-3, 1e-2))
        flat = torch.cat([p.detach().flatten() for p in learn.model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        out[impl] = (flat, all(torch.equal(g, gathered[0]) for g in gathered), type(learn.opt).__name__)
    return out


def test_fastai_learner_under_distrib_ctx():
    for rank, r in enumerate(spawn(_learner_under_distrib_ctx)):
        native = r['native'][0]
        for impl in ('foreach', 'fused'):
            flat, ranks_agree, opt = r[impl]
            assert ranks_agree and opt == 'AdamForEachOptimizer', (rank, impl)
            # float32 training through a CNN: the Learner tests' tolerance (tests/test_learner.py)
            torch.testing.assert_close(flat, native, rtol=1e-3, atol=1e-5)


# --- what cannot work ------------------------------------------------------------------------------

def _zero_redundancy(rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import fastforeach
    try: ZeroRedundancyOptimizer(net().parameters(), optimizer_class=fastforeach.Adam, lr=1e-3)
    except TypeError as e: return str(e)


def test_zero_redundancy_optimizer_is_refused_clearly():
    "It hands the optimizer torch.optim-style dicts; the error says so and points to FSDP2."
    for message in spawn(_zero_redundancy):
        assert 'param group given as a dict' in message and 'fully_shard' in message


def _unsupported_layouts(rank, world):
    """A gradient still to be summed across ranks (`Partial`), and a plain gradient for a DTensor param: the
    error each step raises, and whether anything changed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor
    mesh = init_device_mesh('cpu', (world,))
    out = {}
    for label, grad in (('partial', lambda p: DTensor.from_local(torch.ones(4, dtype=torch.float64), mesh, [Partial()])),
                        ('plain', lambda p: torch.ones(4, dtype=torch.float64))):
        for impl in ('foreach', 'fused'):
            p = nn.Parameter(distribute_tensor(torch.arange(4.).double(), mesh, [Shard(0)]))
            q = nn.Parameter(distribute_tensor(torch.arange(4.).double(), mesh, [Shard(0)]))
            opt = REGISTRY['Adam'].make(impl, [q, p])
            q.grad, p.grad = torch.ones_like(q), grad(p)
            before = [t.full_tensor().clone() for t in (q, p)]
            try: opt.step(); error = None
            except ValueError as e: error = str(e)
            unchanged = all(torch.equal(t.full_tensor(), b) for t, b in zip((q, p), before)) and not opt.state[q]
            out[(label, impl)] = (error, unchanged)
    return out


def _few_bit_layouts(rank, world):
    """Few-bit state for DTensor params it cannot be sharded with: 4-bit codes (two elements a byte) and a
    shard that is not one run of the flat order (Shard(1)): the error making the optimizer raises."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh('cpu', (world,))
    out = {}
    for label, fmt, placement in (('4-bit', '4bit', Shard(0)), ('Shard(1)', '8bit', Shard(1))):
        p = nn.Parameter(distribute_tensor(torch.zeros(64, 128), mesh, [placement]))
        try: REGISTRY['Adam'].make('foreach', [p], state_format=fmt); out[label] = None
        except ValueError as e: out[label] = str(e)
    return out


def test_few_bit_state_refuses_layouts_it_cannot_shard():
    for results in spawn(_few_bit_layouts):
        assert 'state_format' in results['4-bit'] and '4bit' in results['4-bit'], results
        assert 'Shard(dim=1)' in results['Shard(1)'] and 'Shard(0)' in results['Shard(1)'], results


def test_unsupported_layouts_are_refused_before_a_step():
    for results in spawn(_unsupported_layouts):
        for key, (error, unchanged) in results.items():
            assert error and 'Invalid' in error and unchanged, (key, error)


# --- the torch.optim face under FSDP2 ----------------------------------------------------------------

def _torch_face_fsdp2(rank, world, directory, fused):
    """The torch face's AdamW (`no_wd` inside its groups) on an FSDP2 model: 10 steps, a checkpoint with
    torch.distributed.checkpoint, 10 more; the same checkpoint resumed in a fresh FSDP2 model; and one
    process stepping the whole batches (every rank alone)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from fastforeach.optim import AdamW, bias_and_norm

    def build(model):
        groups = [{'params': [p for n, p in model.named_parameters() if n.startswith(('inp', 'norm'))]},
                  {'params': [p for n, p in model.named_parameters() if not n.startswith(('inp', 'norm'))]}]
        return AdamW(groups, lr=1e-3, weight_decay=0.01, no_wd=bias_and_norm, fused=fused)

    def run(model, opt, xs, first, shard):
        for i, x in enumerate(xs, first):
            if shard: x = x.chunk(world)[rank]
            model(x).pow(2).mean().backward()
            for j, group in enumerate(opt.param_groups): group['lr'] = 1e-3 * 0.5 ** j * 0.97 ** i
            opt.step()
            opt.zero_grad()

    first, rest, result = batches(10), batches(10, start=10), {}
    model = fsdp2(net()); opt = build(model)
    run(model, opt, first, 0, True)
    dcp.save({'model': get_model_state_dict(model), 'optim': get_optimizer_state_dict(model, opt)},
             checkpoint_id=f"{directory}/torch-face")
    run(model, opt, rest, 10, True)
    result['straight'] = _params(model)

    resumed = fsdp2(net()); ropt = build(resumed)
    template = {'model': get_model_state_dict(resumed), 'optim': get_optimizer_state_dict(resumed, ropt)}
    dcp.load(template, checkpoint_id=f"{directory}/torch-face", planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(resumed, template['model'])
    set_optimizer_state_dict(resumed, ropt, template['optim'], options=StateDictOptions(strict=False))
    run(resumed, ropt, rest, 10, True)
    result['resumed'] = _params(resumed)

    single = net(); sopt = build(single)
    run(single, sopt, first + rest, 0, False)
    result['one process'] = _params(single)
    return result


@pytest.mark.parametrize('fused', [False, True], ids=['foreach', 'fused'])
def test_torch_face_under_fsdp2_with_checkpoints(fused, tmp_path):
    for rank, r in enumerate(spawn(_torch_face_fsdp2, str(tmp_path), fused)):
        assert max_rel_diff(r['resumed'], r['straight']) == 0, rank
        assert max_rel_diff(r['straight'], r['one process']) < TOL, rank
