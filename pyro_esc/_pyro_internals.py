"""The one place that touches Pyro's private internals.

pyro_esc reads a few things that Pyro does not export: a PyroModule's Pyro
context (to read parameters the way ``pyro_method`` does), the param store's
unconstrained tensors, the stack of active effect handlers, and AutoNormal's
per-site parameters. Keeping them here means a Pyro upgrade that moves one of
them breaks one small module, and ``tests/test_pyro_internals.py`` pins each of
them against the installed Pyro.
"""

import contextlib

import torch

import pyro
from pyro.nn import PyroModule
from pyro.nn.module import _make_name
from pyro.poutine import runtime


def module_context(module):
    """A context manager that enters ``module``'s Pyro context, as ``@pyro_method`` does.

    Inside it a PyroModule's parameters are read through ``pyro.param``, so that
    SVI's parameter capture sees (and trains) them. For anything that is not a
    PyroModule it does nothing.
    """
    if isinstance(module, PyroModule):
        return module._pyro_context
    return contextlib.nullcontext()


def stored_unconstrained(module, name):
    """The unconstrained tensor that the param store holds for ``module``'s parameter ``name``, or None.

    Module and store share one tensor, except after the store was replaced
    (e.g. ``ParamStoreDict.set_state``); the store's tensor is then the one the
    module adopts on its next read inside its Pyro context.
    """
    if not module._pyro_context.used:
        return None
    return pyro.get_param_store()._params.get(module._pyro_get_fullname(name))


def _own_tensors(module):
    """``{param-store name: (attribute path, the module's own tensor)}`` for every parameter of a PyroModule."""
    suffix = "_unconstrained"  # a PyroParam's own tensor; plain torch parameters keep their names
    return {_make_name(module._pyro_name, path[: -len(suffix)] if path.endswith(suffix) else path): (path, tensor)
            for path, tensor in module.named_parameters()}


def foreign_parameters(module):
    """Names in the param store that ``module`` would read, whose tensors are not its own.

    A PyroModule keeps its own unconstrained tensor per parameter (``<name>_unconstrained``) and,
    reading a parameter inside its Pyro context, adopts whatever the store holds under the same
    name. This lists the names where that would be another tensor, and, for a module with a name
    prefix, the names under that prefix that it has none of (an autoguide not yet run creates its
    parameters on first use). Empty for anything that is not a PyroModule.
    """
    if not isinstance(module, PyroModule):
        return []
    store = pyro.get_param_store()
    own = {name: tensor for name, (_, tensor) in _own_tensors(module).items()}
    foreign = [name for name, tensor in own.items() if name in store and store._params[name] is not tensor]
    if module._pyro_name:
        foreign += [name for name in store.keys() if name.startswith(module._pyro_name + ".") and name not in own]
    return sorted(set(foreign))


def share_parameters_with_store(module):
    """Make every parameter of ``module`` the very tensor the param store holds under its name.

    Normally module and store share one tensor per parameter. After the store was replaced
    (``ParamStoreDict.set_state``, as when a checkpoint is restored) they do not: a PyroParam
    adopts the store's tensor only when it is next read inside the module's Pyro context (until
    then ``module.prior_scale`` outside it reads the old one), and a plain ``nn.Parameter`` (the
    weights of a ``PyroModule[nn.Linear]``) never does, so the module would compute with its own
    tensor while an optimiser, which finds its parameters through the store, trains the store's.
    This binds each parameter to the store's tensor now (the values are the store's), as
    PyroModule's own adoption does. Does nothing for anything that is not a PyroModule.
    """
    if not isinstance(module, PyroModule):
        return
    store = pyro.get_param_store()
    for fullname, (path, tensor) in _own_tensors(module).items():
        stored = store._params.get(fullname)
        if stored is None or stored is tensor:
            continue
        if not isinstance(stored, torch.nn.Parameter):
            stored = torch.nn.Parameter(stored)
            store._params[fullname] = stored
        store._param_to_name[stored] = fullname
        owner_path, _, leaf = path.rpartition(".")
        torch.nn.Module.__setattr__(module.get_submodule(owner_path), leaf, stored)


def pending_optimizer_states(optim):
    """A ``PyroOptim``'s restored per-parameter states not yet consumed (its optimisers are created lazily).

    ``PyroOptim.set_state`` keeps them until the parameter's torch optimiser is created, on the
    first step that sees it; each is a torch optimiser ``state_dict`` (with ``param_groups``).
    """
    return getattr(optim, "_state_waiting_to_be_consumed", {})


def active_handlers():
    """The effect handlers (Pyro messengers) active now, outermost first."""
    return list(runtime._PYRO_STACK)


def autonormal_loc_and_scale(guide, name):
    """AutoNormal's (loc, scale) for site ``name``, through the guide's own (overridable) reader."""
    return guide._get_loc_and_scale(name)


def param_site_unconstrained(site):
    """The unconstrained tensor behind a traced ``"param"`` site: the tensor SVI hands to its optimiser.

    ``pyro.param`` returns a constrained value with an ``unconstrained`` weakref;
    a plate that subsampled the value keeps the original in ``_pyro_unconstrained_param``.
    """
    value = site["value"]
    unconstrained = getattr(value, "_pyro_unconstrained_param", None)
    return unconstrained if unconstrained is not None else value.unconstrained()


def param_fullname(module, name):
    """The param-store name of ``module``'s parameter ``name`` (its prefix and name, as Pyro builds it)."""
    return module._pyro_get_fullname(name) if module._pyro_context.used else _make_name(module._pyro_name, name)


def module_name(module):
    """The prefix of a PyroModule's parameter names in the param store (its ``name``)."""
    return module._pyro_name


def param_constraint(name):
    """The constraint that the param store keeps for the parameter ``name``."""
    return pyro.get_param_store()._constraints[name]


@contextlib.contextmanager
def own_parameters(*objects):
    """Evaluate ``objects`` (models, guides) at their own parameters, whatever the current param-store scope holds.

    A PyroModule reading a parameter adopts the tensor the store holds under its name, so a
    model evaluated inside another model's scope would read (and keep) the other's values. In a
    fresh scope of its own each module finds its names free and registers its own tensors; the
    caller's store is untouched. An object that is not callable (a summary such as a
    :class:`~pyro_esc.GaussianPosterior`) holds no parameters and needs no scope. A callable that
    is not a PyroModule (a plain guide function using ``pyro.param``) keeps its parameters only in
    the store, so then everything is read from the current store, as before.
    """
    reads_the_store = any(callable(value) and not isinstance(value, PyroModule) for value in objects)
    if objects and not reads_the_store:
        with pyro.get_param_store().scope():
            yield
    else:
        yield
