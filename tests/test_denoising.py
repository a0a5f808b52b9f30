"""denoise: posterior-mean reconstructions of overlapping patches, with the noise level learned."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio as psnr

import pyro

from pyro_esc.cli import main
from pyro_esc.data.images import cached_image
from pyro_esc.denoising import denoise, learn_dictionary


def crop():
    image = cached_image("camera")[::4, ::4]  # 128 x 128
    return image[40:76, 40:76]


def noisy_version(image, sigma=0.1):
    return image + sigma * np.random.default_rng(0).standard_normal(image.shape)


@pytest.fixture(scope="module")
def clean_model():
    with pyro.get_param_store().scope():
        return learn_dictionary(cached_image("camera")[::4, ::4][:, :64], 5, 16, max_patches=800, steps=80)


def test_denoising_with_a_dictionary_from_clean_data_raises_the_psnr_and_learns_the_noise(clean_model):
    image = crop()
    noisy = noisy_version(image)
    result = denoise(noisy, 5, model=clean_model, steps=80)
    assert result.image.shape == image.shape
    assert psnr(image, result.image, data_range=1) > psnr(image, noisy, data_range=1) + 2.0
    # sigma* is the noise the model finds: near the true 0.1 (patch means removed, some texture counted as noise).
    assert 0.05 < result.noise_std < 0.15
    # The input is untouched and the dictionary given is the one used.
    assert torch.allclose(result.model.dictionary.detach(), clean_model.dictionary.detach().double(), atol=1e-12)


def test_blind_denoising_learns_its_dictionary_from_the_noisy_image():
    image = crop()
    noisy = noisy_version(image, 0.15)
    result = denoise(noisy, 5, n_latents=16, max_patches=800, steps=60)
    assert psnr(image, result.image, data_range=1) > psnr(image, noisy, data_range=1) + 2.0


def test_bad_input_is_a_clear_error(clean_model):
    with pytest.raises(ValueError, match="grey-scale"):
        denoise(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="larger than the image"):
        denoise(np.zeros((4, 4)), 5)
    with pytest.raises(ValueError, match="data_dim"):
        denoise(crop(), 7, model=clean_model)
    with pytest.raises(ValueError, match="finite"):
        denoise(np.full((10, 10), np.nan))
    with pytest.raises(ValueError, match="SparseCoding"):
        denoise(crop(), 5, model="dictionary")


def test_the_command_writes_the_denoised_image_and_the_noise(tmp_path, capsys):
    image = crop()
    path = tmp_path / "noisy.png"
    Image.fromarray(np.round(np.clip(noisy_version(image), 0, 1) * 255).astype(np.uint8)).save(path)
    out, noise = tmp_path / "clean.png", tmp_path / "noise.png"
    assert main(["denoise", str(path), str(out), "--noise-image", str(noise), "--patch-size", "5",
                 "--latents", "12", "--steps", "40"]) == 0
    assert np.asarray(Image.open(out)).shape == image.shape == np.asarray(Image.open(noise)).shape
    assert "fit" in capsys.readouterr().err  # its fits show their progress (it ran silently), unless --quiet
    assert main(["denoise", str(path), str(out), "--patch-size", "5", "--latents", "12", "--steps", "5",
                 "--quiet"]) == 0
    assert "fit" not in capsys.readouterr().err
    assert main(["denoise", str(tmp_path / "missing.png"), str(out)]) == 2


def test_the_default_step_budget_is_not_warned_about_but_an_explicit_limit_is(monkeypatch):
    import warnings

    from pyro_esc import denoising
    from pyro_esc.convergence import ConvergenceWarning

    monkeypatch.setattr(denoising, "DEFAULT_STEPS", 2)  # a budget that the fits certainly reach
    noisy = np.random.default_rng(0).random((20, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        denoise(noisy, 5, n_latents=6, max_patches=150)
    with pytest.warns(ConvergenceWarning, match="step limit: 2 steps"):
        denoise(noisy, 5, n_latents=6, max_patches=150, steps=2)


def test_denoising_warns_at_the_callers_line():
    # fit's warnings inside denoise used to point into the library (denoising.py); they name the caller's line.
    import warnings

    from pyro_esc.training import ConvergenceWarning

    noisy = np.random.default_rng(0).random((24, 24))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        denoise(noisy, 5, max_patches=200, steps=2)
    shown = [warning for warning in caught if issubclass(warning.category, ConvergenceWarning)]
    assert shown and all(warning.filename == __file__ for warning in shown)
