"""Fused steps: one pass over memory per param per step.

A foreach rule is a chain of list ops, each of which reads and writes every tensor. Its fused form does
the same math in one pass, in one of two ways:

- `KernelStep`: PyTorch ships a multi-tensor kernel whose math equals the rule (SGD, Adam, AdamW).
- `CompiledStep`: the optimizer's *per-tensor update*, compiled by `torch.compile` (inductor: one C++/OpenMP
  loop per tensor on CPU, Triton on GPU) and called on lists of `CHUNK` tensors at once (or fewer: `chunk`).

How a compiled step avoids recompiling:
- hypers and the step count never enter the graph as Python numbers: the rule's `coefficients` turns them
  into one small tensor per step (computed in float64 from Python floats, as fastai does), so a schedule
  that changes lr and mom every batch runs the same graph;
- every tensor is seen as a flat 1-d alias of its storage, with dynamic sizes, so one graph serves every
  shape: compiling happens once per (update, dtype, device) for the process, whatever the model;
- each graph gets its own code object, so dynamo keeps one graph per cache and its recompile limit never
  bites.

A compiled loop per tensor costs several microseconds however small the tensor, which on a model of many
small tensors is most of the step. An elementwise update gives the same result on tensors laid end to end
as on each, so small tensors are stepped as one `Pack`: their state lives end to end for good, and a step
copies params and gradients in and params back out (under a microsecond per tensor each). An update that
needs each tensor's norms (Larc, LAMB) steps a pack in phases around them (`PackStep`).

When compiling fails (no C++ compiler, an unsupported device), the step warns once and runs its foreach
rule instead; the check runs on dummy tensors before a step touches anything, and tries a second way of
tracing sizes first (`_size_configs`).
"""
from .coefficients import Coefficients
from .compile import (CHUNK, DECAY, FLAT, PLAIN, WARMUP_SIZE, chunked, coefficient_dtype, compile_cache_info, compiles,
                      flat_compiles, run_chunks, run_flat)
from .compiled import CompiledStep
from .layout import Operands, end_to_end, flat_alias, is_dense
from .packs import PACK_MAX_NUMEL, Pack, PackStep, pack_max_numel, packs_as_on
from .plans import Plans
from .steps import (COMPILED_MIN_NUMEL, FUSED_16BIT, Context, EitherStep, FusedStep, KernelStep, foreach_for_16bit, fused_form,
                    split_by_wd)

__all__ = ['Coefficients', 'FUSED_16BIT', 'fused_form', 'foreach_for_16bit', 'FusedStep', 'KernelStep', 'EitherStep', 'CompiledStep', 'Operands', 'Pack', 'PackStep', 'Plans', 'CHUNK',
           'PACK_MAX_NUMEL', 'packs_as_on', 'chunked', 'coefficient_dtype', 'compiles', 'flat_compiles', 'is_dense', 'run_chunks',
           'run_flat', 'flat_alias', 'end_to_end', 'compile_cache_info', 'pack_max_numel', 'Context']
