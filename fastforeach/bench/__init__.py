"""`fastforeach-bench`: the benchmark (see `cli.py`): `models`, the `harness` that builds and times the
contenders, one module per experiment in `experiments/`, and the `report`."""
from .cli import main
from .experiments.compile_times import compile_times, compiled_optimizers
from .experiments.distributed import distributed_bench
from .experiments.memory import memory_floor, memory_table
from .experiments.newton_schulz import format_newton_schulz_table, newton_schulz_table
from .experiments.release import format_release_table, release_table
from .experiments.training import accumulation_table, train_table
from .harness import BENCH, QUICK_OPTIMIZERS, run_bench
from .models import MODELS, QUICK_MODELS, params_like
from .report import summary_table

__all__ = ['MODELS', 'BENCH', 'QUICK_MODELS', 'QUICK_OPTIMIZERS', 'run_bench', 'memory_floor', 'memory_table',
           'distributed_bench', 'train_table', 'accumulation_table', 'release_table', 'format_release_table',
           'newton_schulz_table', 'format_newton_schulz_table', 'compile_times', 'compiled_optimizers', 'summary_table',
           'params_like', 'main']
