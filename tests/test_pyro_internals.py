"""pyro_esc._pyro_internals pinned against the installed Pyro: each private detail it reads still behaves.

If one of these fails after a Pyro upgrade, the fix belongs in pyro_esc/_pyro_internals.py alone.
"""

import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.scale_messenger import ScaleMessenger

from pyro_esc import SparseCoding
from pyro_esc._pyro_internals import (
    active_handlers,
    autonormal_loc_and_scale,
    module_context,
    module_name,
    param_fullname,
    param_site_unconstrained,
    pending_optimizer_states,
    share_parameters_with_store,
    stored_unconstrained,
)
from pyro_esc.data import bars


class Holder(PyroModule):
    def __init__(self):
        super().__init__(name="holder")
        self.scale = PyroParam(torch.ones(3), constraints.positive)


def captured_params(read):
    with poutine.trace(param_only=True) as capture:
        read()
    return {name: site for name, site in capture.trace.nodes.items() if site["type"] == "param"}


def test_module_context_makes_reads_go_through_pyro_param():
    holder = Holder()
    assert captured_params(lambda: holder.scale) == {}  # outside the context: a plain read

    def read_inside():
        with module_context(holder):
            with module_context(holder):  # re-entrant
                return holder.scale

    sites = captured_params(read_inside)
    assert set(sites) == {"holder.scale"}
    assert param_site_unconstrained(sites["holder.scale"]) is holder.scale_unconstrained
    assert pyro.param("holder.scale").unconstrained() is holder.scale_unconstrained
    assert captured_params(lambda: holder.scale) == {}  # the context was left


def test_module_context_does_nothing_for_other_objects():
    layer = nn.Linear(2, 3)
    for thing in (layer, lambda x: x, object()):
        with module_context(thing):
            pass
    with module_context(layer):
        assert captured_params(lambda: layer.weight) == {}


def test_stored_unconstrained_is_the_param_stores_tensor():
    holder = Holder()
    assert stored_unconstrained(holder, "scale") is None  # never read in its context
    with module_context(holder):
        holder.scale
    assert stored_unconstrained(holder, "scale") is pyro.param("holder.scale").unconstrained()
    # After the store is replaced, the store's tensor is reported (the module adopts it on its next read).
    state = pyro.get_param_store().get_state()
    state["params"] = {name: value.detach().clone() for name, value in state["params"].items()}
    pyro.get_param_store().set_state(state)
    stored = stored_unconstrained(holder, "scale")
    assert stored is pyro.param("holder.scale").unconstrained() and stored is not holder.scale_unconstrained
    with module_context(holder):
        holder.scale
    assert holder.scale_unconstrained is stored_unconstrained(holder, "scale")
    assert torch.equal(holder.scale_unconstrained, stored)


def test_active_handlers_lists_the_stack_outermost_first():
    before = active_handlers()
    with poutine.scale(scale=0.5), poutine.block():
        handlers = active_handlers()
    assert [type(handler) for handler in handlers[len(before):]] == [ScaleMessenger, BlockMessenger]
    assert active_handlers() == before


def test_param_site_unconstrained_sees_through_plate_subsampling():
    def read(subsample):
        pyro.param("rows", torch.ones(5, 2), constraint=constraints.positive, event_dim=1)
        with pyro.plate("data", 5, subsample=subsample, dim=-1):
            return pyro.param("rows")

    for subsample in (None, torch.tensor([3, 0])):
        site = captured_params(lambda: read(subsample))["rows"]
        assert param_site_unconstrained(site) is pyro.param("rows").unconstrained()
        assert pyro.param("rows").unconstrained().shape == (5, 2)


class DoubledAutoNormal(AutoNormal):
    def _get_loc_and_scale(self, name):
        loc, scale = super()._get_loc_and_scale(name)
        return loc, 2 * scale


def test_autonormal_loc_and_scale_uses_the_guides_own_reader():
    x, _ = bars(10, side=3, seed=0)
    model = SparseCoding(x.size(1), 6)
    for cls, factor in ((AutoNormal, 1.0), (DoubledAutoNormal, 2.0)):
        guide = cls(model, init_scale=0.3)
        guide(x)
        loc, scale = autonormal_loc_and_scale(guide, "z")
        assert torch.equal(loc, guide.locs.z) and torch.allclose(scale, factor * guide.scales.z)
        # The reader is the one the guide samples with: its "z" site has that scale.
        with poutine.block(), poutine.trace() as capture:
            guide(x)
        site_scale = capture.trace.nodes["z_unconstrained"]["fn"].base_dist.scale
        assert torch.allclose(site_scale, scale.detach())
        assert isinstance(capture.trace.nodes["z_unconstrained"]["fn"].base_dist, dist.Normal)


def test_param_fullname_and_module_name_are_the_param_store_names():
    x, _ = bars(10, side=3, seed=0)
    plain, named = SparseCoding(x.size(1), 6), SparseCoding(x.size(1), 6, name="coder")
    for model, expected in ((plain, "raw_dictionary"), (named, "coder.raw_dictionary")):
        before = param_fullname(model, "raw_dictionary")  # before the module has run
        model(x)
        assert before == param_fullname(model, "raw_dictionary") == expected
        assert expected in pyro.get_param_store()
    assert module_name(named) == "coder" and module_name(plain) == ""


def test_param_constraint_is_the_constraint_the_store_keeps():
    from pyro.distributions import constraints

    from pyro_esc._pyro_internals import param_constraint

    pyro.param("positive_thing", torch.ones(3), constraint=constraints.positive)
    pyro.param("free_thing", torch.zeros(2))
    assert param_constraint("positive_thing") is constraints.positive
    assert param_constraint("free_thing") is constraints.real


class _Encoder(PyroModule):
    def __init__(self):
        super().__init__(name="encoder")
        self.layer = PyroModule[nn.Linear](3, 2)
        self.scale = PyroParam(torch.ones(2), constraints.positive)

    def forward(self, x):
        return self.layer(x) * self.scale


def test_after_set_state_a_plain_parameter_is_not_the_stores_until_shared():
    pyro.clear_param_store()
    encoder = _Encoder()
    encoder(torch.zeros(1, 3))
    state = pyro.get_param_store().get_state()
    state["params"] = {name: value.detach().clone() for name, value in state["params"].items()}
    pyro.get_param_store().set_state(state)  # as a checkpoint's restore does: new tensors in the store
    encoder(torch.zeros(1, 3))
    store = pyro.get_param_store()._params
    assert store["encoder.layer.weight"] is not encoder.layer.weight  # Pyro leaves plain parameters apart
    share_parameters_with_store(encoder)
    assert store["encoder.layer.weight"] is encoder.layer.weight
    assert store["encoder.scale"] is encoder.scale_unconstrained
    assert torch.equal(encoder.layer.weight, state["params"]["encoder.layer.weight"])


def test_pending_optimizer_states_are_the_restored_states_before_their_optimiser_exists():
    pyro.clear_param_store()
    weight = pyro.param("w", torch.ones(2))
    optim = pyro.optim.Adam({"lr": 0.1})
    optim([weight])
    restored = pyro.optim.Adam({"lr": 0.5})
    restored.set_state(optim.get_state())
    pending = pending_optimizer_states(restored)
    assert set(pending) == {"w"} and pending["w"]["param_groups"][0]["lr"] == 0.1
    restored([weight])  # creating the optimiser consumes the state, with its saved lr
    assert pending_optimizer_states(restored) == {}
    assert restored.optim_objs[weight].param_groups[0]["lr"] == 0.1
