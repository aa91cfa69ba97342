"""Coefficient layouts: compiled updates read `c` by name, and layouts that share updates agree on the places."""
import pytest

from fastforeach.fused import Coefficients
from fastforeach.optimizers.adam import ADAM, AVERAGING
from fastforeach.optimizers.qhadam import QHADAM
from fastforeach.optimizers.radam import RADAM
from fastforeach.optimizers.stableadam import STABLE_ADAM


def test_every_layout_starts_with_the_decay_factors():
    assert (ADAM.decay, ADAM.l2) == (0, 1) and Coefficients('lr').lr == 2
    assert not hasattr(Coefficients('alpha', decay=False), 'decay')


@pytest.mark.parametrize('layout', [ADAM, RADAM, QHADAM, STABLE_ADAM], ids=['Adam', 'RAdam', 'QHAdam', 'StableAdam'])
def test_the_adam_family_reads_its_averages_at_the_same_places(layout):
    "`average_grads_update` and `adam_direction` serve every layout that extends theirs."
    for name in AVERAGING.names: assert getattr(layout, name) == getattr(AVERAGING, name), name
    if layout is STABLE_ADAM:
        for name in ADAM.names: assert getattr(layout, name) == getattr(ADAM, name), name


def test_values_are_given_by_name_and_checked():
    layout = Coefficients('lr', 'mom')
    assert layout.values({'mom': 0.9, 'lr': 0.1}) == [0.1, 0.9]
    with pytest.raises(KeyError, match=r"missing \['mom'\], unknown \['beta'\]"): layout.values({'lr': 0.1, 'beta': 1})
    with pytest.raises(ValueError, match='Repeated'): Coefficients('lr', 'lr')
