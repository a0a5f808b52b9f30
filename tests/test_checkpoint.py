"""Checkpoints run no code, detect damage, and belong to the run (data, model, guide) that wrote them."""

import os
import random

import pytest
import torch

import pyro
from pyro.infer.autoguide import AutoNormal

from pyro_esc import LocalMultivariateNormal, SparseCoding, fit, load
from pyro_esc.checkpoint import CHECKPOINT_FORMAT, decode_constraint, encode_constraint, load_checkpoint
from pyro_esc.data import bars
from pyro.distributions import constraints

MARKER = "pyro_esc_payload_ran"


class _Payload:
    """What an attacker pickles: unpickling it calls os.system (here: creates a marker file)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _malicious_file(tmp_path, wrapped):
    marker = tmp_path / MARKER
    path = tmp_path / "evil.pt"
    payload = _Payload(marker)
    torch.save(wrapped(payload), str(path))
    return path, marker


def problem(num=40, seed=2):
    x, _ = bars(num, side=3, seed=seed)
    model = SparseCoding(x.size(1), 6)
    return model, AutoNormal(model, create_plates=model.create_plates), x


def train(path=None, resume=None, steps=6, x=None, guide_factory=None, batch_size=None):
    pyro.clear_param_store()
    model, guide, data = problem()
    if guide_factory is not None:
        guide = guide_factory(model)
    return fit(model, guide, data if x is None else x, steps=steps, batch_size=batch_size, progress=False, seed=1,
               checkpoint=path, resume=resume, tol=None)


@pytest.mark.parametrize("wrapped", [
    lambda payload: payload,
    lambda payload: {"format": "pyro_esc.checkpoint/3", "step": payload},
    lambda payload: {"format": CHECKPOINT_FORMAT, "sha256": "0", "payload": payload},
])
def test_a_malicious_checkpoint_runs_no_code(tmp_path, wrapped):
    path, marker = _malicious_file(tmp_path, wrapped)
    with pytest.raises(ValueError, match="could not be read") as error:
        load_checkpoint(str(path))
    assert "weights_only=False" not in str(error.value)
    with pytest.raises(ValueError, match="could not be read"):
        train(resume=str(path))
    with pytest.raises(ValueError, match="could not be read"):
        load(str(path))
    assert not marker.exists()


def test_the_independent_check_that_the_payload_would_run(tmp_path):
    # Guards the test above against a payload that does nothing: unpickled the unsafe way, it runs.
    path, marker = _malicious_file(tmp_path, lambda payload: payload)
    torch.load(str(path), weights_only=False)
    assert marker.exists()


def test_a_checkpoint_holds_only_plain_values(tmp_path):
    path = str(tmp_path / "run.pt")
    train(path, steps=3)
    envelope = torch.load(path, weights_only=True)
    assert envelope["format"] == CHECKPOINT_FORMAT and len(envelope["sha256"]) == 64
    state = load_checkpoint(path)
    assert state["step"] == 3
    assert state["run"] == {"model": "SparseCoding", "guide": "AutoNormal", "loss": "EntropyELBO", "route": "torch",
                            "prior": "Laplace()"}
    assert state["data"]["shape"] == [40, 9] and state["data"]["dtype"] == "float32"
    assert state["param_store"]["constraints"]["AutoNormal.scales.z"] is constraints.softplus_positive


@pytest.mark.parametrize("seed", range(6))
def test_flipped_bytes_are_detected(tmp_path, seed):
    path = str(tmp_path / "run.pt")
    train(path, steps=3)
    data = bytearray(open(path, "rb").read())
    generator = random.Random(seed)
    for position in generator.sample(range(len(data)), 64):
        data[position] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="damaged|could not be read|not a pyro_esc checkpoint"):
        load_checkpoint(path)


def test_a_payload_byte_changed_fails_the_checksum(tmp_path):
    path = str(tmp_path / "run.pt")
    train(path, steps=3)
    envelope = torch.load(path, weights_only=True)
    envelope["payload"][len(envelope["payload"]) // 2] ^= 1
    torch.save(envelope, path)
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        load_checkpoint(path)


def test_resuming_on_other_data_is_refused(tmp_path):
    path = str(tmp_path / "run.pt")
    train(path, steps=3)
    other, _ = bars(40, side=3, seed=5)
    with pytest.raises(ValueError, match="other data of the same shape"):
        train(path, resume=path, x=other)
    with pytest.raises(ValueError, match="shape"):
        train(path, resume=path, x=other[:30])
    with pytest.raises(ValueError, match="float32, this run has .* and float64"):
        train(path, resume=path, x=problem()[2].double())


def test_resuming_with_another_guide_or_route_is_refused(tmp_path):
    path = str(tmp_path / "run.pt")
    train(path, steps=3)
    with pytest.raises(ValueError, match="guide 'AutoNormal', this run has 'LocalMultivariateNormal'"):
        train(path, resume=path, guide_factory=LocalMultivariateNormal)
    with pytest.raises(ValueError, match="route 'torch', this run has 'em'"):
        train(path, resume=path, batch_size=10)


def test_resuming_with_a_model_of_another_size_is_refused(tmp_path):
    path = str(tmp_path / "run.pt")
    train(path, steps=3)
    pyro.clear_param_store()
    _, _, x = problem()
    model = SparseCoding(9, 4)
    with pytest.raises(ValueError, match="another size"):
        fit(model, AutoNormal(model, create_plates=model.create_plates), x, steps=6, progress=False, seed=1,
            checkpoint=path, resume=path)


@pytest.mark.parametrize("constraint", [
    constraints.real, constraints.positive, constraints.softplus_positive, constraints.greater_than(-2.5),
    constraints.interval(-1.0, 3.0), constraints.unit_interval, constraints.lower_cholesky,
    constraints.independent(constraints.real, 1),
])
def test_constraints_are_stored_by_name(constraint):
    decoded = decode_constraint(encode_constraint(constraint))
    assert type(decoded) is type(constraint)
    value = torch.tensor([[0.5, -0.2], [0.3, 0.9]])
    assert torch.equal(decoded.check(value), constraint.check(value))


def test_an_unknown_constraint_is_a_clear_error():
    with pytest.raises(ValueError, match="checkpoint cannot name"):
        encode_constraint(constraints.integer_interval(0, 3), "parameter 'p'")


@pytest.mark.parametrize("content", [os.urandom(256), b"PK\x03\x04" + os.urandom(300), b""])
def test_random_bytes_are_a_clear_error_without_unsafe_advice(tmp_path, content):
    path = tmp_path / "random.pt"
    path.write_bytes(content)
    for reader in (load, load_checkpoint):
        with pytest.raises(ValueError, match="could not be read") as error:
            reader(str(path))
        assert "weights_only" not in str(error.value)
