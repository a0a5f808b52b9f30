"""save and load: a trained model (and guide, whitening, metadata) survives the round trip, safely."""

import pytest
import torch

import pyro
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_esc import (AmortizedNormal, LocalMultivariateNormal, SparseCoding, encode, fit, held_out_elbo, load,
                      save)
from pyro_esc.data import Whitening, bars
from pyro_esc.saving import MODEL_FORMAT


def trained(make_guide, steps=30):
    x = bars(80, side=3, noise=0.3, seed=0)[0]
    model = SparseCoding(9, 6)
    guide = make_guide(model)
    fit(model, guide, x, steps=steps, tol=None, progress=False, **({"lr": 0.01} if make_guide is amortized else {}))
    return model, guide, x


def amortized(model):
    return AmortizedNormal(9, 6, covariance="full")


def test_a_model_with_its_encoder_and_whitening_round_trips(tmp_path):
    model, guide, x = trained(amortized)
    whitening = Whitening("zca").fit(x.double())
    path = tmp_path / "model.pt"
    save(path, model, guide, whitening=whitening, run="bars", seed=3, settings={"noise": 0.3, "sizes": [3, 3]})
    expected = {"W": model.dictionary.detach().clone(), "lambda": model.prior_scale.detach().clone(),
                "sigma2": model.noise_var.detach().clone(), "elbo": held_out_elbo(model, guide, x),
                "codes": guide.encode(x)[0].detach().clone(), "white": whitening.transform(x.double())}
    pyro.clear_param_store()  # a fresh process, as far as Pyro can tell
    loaded = load(path)
    # W is saved with unit columns and normalised again on load: equal to float rounding.
    assert torch.allclose(loaded.model.dictionary.detach(), expected["W"], rtol=0, atol=1e-6)
    assert torch.equal(loaded.model.prior_scale.detach(), expected["lambda"])
    assert torch.equal(loaded.model.noise_var.detach(), expected["sigma2"])
    assert torch.equal(loaded.guide.encode(x)[0].detach(), expected["codes"])
    assert held_out_elbo(loaded.model, loaded.guide, x) == pytest.approx(expected["elbo"], rel=1e-6)
    assert torch.allclose(loaded.whitening.transform(x.double()), expected["white"])
    assert loaded.metadata == {"run": "bars", "seed": 3, "settings": {"noise": 0.3, "sizes": [3, 3]}}


def test_an_encoder_saved_before_the_skip_connection_existed_loads_without_it(tmp_path):
    model, guide, x = trained(amortized)
    path = tmp_path / "model.pt"
    save(path, model, guide)
    codes = guide.encode(x)[0].detach().clone()
    payload = torch.load(path, weights_only=True)
    del payload["guide"]["config"]["skip"]  # as in files written before the option existed
    torch.save(payload, path)
    pyro.clear_param_store()
    loaded = load(path)
    assert not loaded.guide.skip and torch.equal(loaded.guide.encode(x)[0].detach(), codes)
    # An encoder with the skip connection saves and loads it.
    pyro.clear_param_store()
    model, guide, x = trained(lambda model: AmortizedNormal(9, 6, covariance="full", skip=True))
    assert guide.skip and guide.config()["skip"] is True
    save(path, model, guide)
    codes = guide.encode(x)[0].detach().clone()
    pyro.clear_param_store()
    assert torch.equal(load(path).guide.encode(x)[0].detach(), codes)


def test_an_encoder_keeps_its_unit_and_one_saved_before_units_reads_data_as_they_are(tmp_path):
    # Trained on data times 256 (fit's standard units): the encoder reads x / 256 and answers times 256.
    x = bars(80, side=3, noise=0.3, seed=0)[0] * 256
    model = SparseCoding(9, 6)
    guide = amortized(model)
    fit(model, guide, x, steps=30, tol=None, progress=False, lr=0.01)
    assert float(guide.unit) == 256.0
    path = tmp_path / "model.pt"
    save(path, model, guide)
    codes = guide.encode(x)[0].detach().clone()
    pyro.clear_param_store()
    loaded = load(path)
    assert float(loaded.guide.unit) == 256.0 and torch.equal(loaded.guide.encode(x)[0].detach(), codes)
    # A file written before the unit existed: its encoder read the data as they were (unit 1).
    payload = torch.load(path, weights_only=True)
    del payload["guide"]["state"]["unit"]
    torch.save(payload, path)
    pyro.clear_param_store()
    old = load(path)
    assert float(old.guide.unit) == 1.0
    assert torch.allclose(old.guide.encode(x / 256)[0].detach() * 256, codes, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make_guide", [LocalMultivariateNormal,
                                        lambda model: AutoNormal(model, create_plates=model.create_plates)])
def test_per_point_posteriors_are_saved_only_when_asked_for(tmp_path, make_guide):
    model, guide, x = trained(make_guide)
    with pytest.raises(ValueError, match="per_point=True"):
        save(tmp_path / "m.pt", model, guide)
    save(tmp_path / "m.pt", model, guide, per_point=True)
    elbo = held_out_elbo(model, guide, x)
    pyro.clear_param_store()
    loaded = load(tmp_path / "m.pt")
    assert type(loaded.guide) is type(guide)
    assert held_out_elbo(loaded.model, loaded.guide, x) == pytest.approx(elbo, rel=1e-6)
    # A loaded model encodes new data like the original (encode refits the posteriors at the fixed model).
    x_new = bars(5, side=3, noise=0.3, seed=4)[0]
    assert encode(loaded.model, loaded.guide, x_new).mean.shape == (5, 6)


def test_loading_maps_to_another_device_and_keeps_the_dtype(tmp_path):
    model, guide, x = trained(LocalMultivariateNormal)
    model.double()
    save(tmp_path / "m.pt", model)
    pyro.clear_param_store()
    loaded = load(tmp_path / "m.pt", map_location="cpu")
    assert loaded.model.dictionary.dtype == torch.float64 and loaded.model.dictionary.device.type == "cpu"
    assert loaded.guide is None and loaded.whitening is None and loaded.metadata == {}


def test_the_file_loads_with_weights_only_and_carries_its_format(tmp_path):
    model, _, _ = trained(LocalMultivariateNormal, steps=2)
    save(tmp_path / "m.pt", model, note="x")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["format"] == MODEL_FORMAT


def test_bad_and_foreign_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    with pytest.raises(ValueError, match="could not be read"):
        load(junk)
    torch.save({"format": "someone.else/9"}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a pyro_esc model file"):
        load(tmp_path / "foreign.pt")
    torch.save({"format": MODEL_FORMAT, "model": {"data_dim": 9}}, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="damaged"):
        load(tmp_path / "damaged.pt")


class Pickled:  # a class weights_only loading must refuse to construct
    pass


def test_a_file_that_would_run_code_is_refused(tmp_path):
    torch.save({"format": MODEL_FORMAT, "payload": Pickled()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="could not be read"):
        load(tmp_path / "evil.pt")


def test_what_cannot_be_saved_faithfully_is_an_error(tmp_path):
    model, guide, _ = trained(LocalMultivariateNormal, steps=2)
    with pytest.raises(ValueError, match="metadata\\['bad'\\]"):
        save(tmp_path / "m.pt", model, bad=object())
    with pytest.raises(ValueError, match="AutoMultivariateNormal"):
        save(tmp_path / "m.pt", model, AutoMultivariateNormal(model))
    with pytest.raises(ValueError, match="SparseCoding"):
        save(tmp_path / "m.pt", object())


def test_loading_beside_a_model_of_the_same_name_is_refused_not_merged(tmp_path):
    model, _, x = trained(LocalMultivariateNormal, steps=2)
    save(tmp_path / "m.pt", model)
    before = model.dictionary.detach().clone()
    with pytest.raises(ValueError, match="param store already holds"):
        load(tmp_path / "m.pt")
    assert torch.equal(model.dictionary.detach(), before)
    with pyro.get_param_store().scope():
        loaded = load(tmp_path / "m.pt")
        assert torch.allclose(loaded.model.dictionary.detach(), before, atol=1e-6)
