"""Natural images, patches, whitening and user data, checked against numpy/scipy/sklearn routes."""

import importlib.util
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from pyro_esc.data import images as images_module
from pyro_esc.data import (BUNDLED_IMAGES, NATURAL_IMAGES, Whitening, bundled_images, image_patches,
                           load_array, load_image_folder, natural_image, natural_images)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def numpy_cov(y):
    """Population covariance (1/N) with numpy, the independent route for whitening."""
    return np.cov(np.asarray(y, dtype=np.float64).T, bias=True)


@pytest.fixture
def correlated():
    """Full-rank correlated Gaussian data (N = 2000, D = 6), float64, non-zero mean.

    A random rotation of known scales keeps the covariance's condition number near 900, so
    float64 results are accurate to ~1e-12.
    """
    rng = np.random.default_rng(3)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    mixing = rotation * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    x = rng.normal(size=(2000, 6)) @ mixing.T + rng.normal(size=6) * 5
    return torch.as_tensor(x)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---- bundled natural images ------------------------------------------------------------

def test_default_images_load_from_installed_package_files_without_network(no_network):
    images_module.cached_image.cache_clear()
    available = bundled_images()
    assert set(NATURAL_IMAGES) <= set(available)
    for name in NATURAL_IMAGES:
        package = importlib.util.find_spec(BUNDLED_IMAGES[name][0])
        assert any(available[name].is_relative_to(location) for location in package.submodule_search_locations)
        image = natural_image(name)
        assert image.ndim == 2 and min(image.shape) >= 300
        assert image.dtype == np.float64 and 0 <= image.min() and image.max() <= 1
        assert image.std() > 0.05  # a real photograph, not a blank
    assert len(natural_images()) == len(NATURAL_IMAGES)


def test_grey_images_equal_the_packages_own_loaders():
    skimage_data = pytest.importorskip("skimage.data")
    rgb2gray = pytest.importorskip("skimage.color").rgb2gray
    load_sample_image = pytest.importorskip("sklearn.datasets").load_sample_image
    np.testing.assert_allclose(natural_image("camera"), skimage_data.camera() / 255.0, atol=1e-12)
    np.testing.assert_allclose(natural_image("astronaut"), rgb2gray(skimage_data.astronaut()), atol=1e-12)
    np.testing.assert_allclose(natural_image("china"), rgb2gray(load_sample_image("china.jpg")), atol=1e-12)


def test_natural_image_returns_a_private_copy():
    image = natural_image("camera")
    image[:] = 0
    assert natural_image("camera").max() > 0


def test_missing_package_gives_a_clear_import_error(monkeypatch):
    images_module.cached_image.cache_clear()
    real = images_module.importlib.util.find_spec
    monkeypatch.setattr(images_module.importlib.util, "find_spec", lambda name: None if name == "sklearn" else real(name))
    with pytest.raises(ImportError, match="scikit-learn, which is not installed"):
        natural_image("china")
    assert "china" not in bundled_images() and "camera" in bundled_images()
    images_module.cached_image.cache_clear()


def test_unknown_image_names_are_rejected():
    with pytest.raises(ValueError, match=r"name must be one of \[.*'camera'.*\], got 'lena'"):
        natural_image("lena")
    with pytest.raises(ValueError, match="name must be one of"):
        natural_images(["camera", "lena"])
    for names in ([], "camera", [1]):
        with pytest.raises(ValueError, match="names must be a non-empty sequence of image names"):
            natural_images(names)


# ---- patches -----------------------------------------------------------------------------

def test_patch_shapes_dtype_and_seeds():
    x = image_patches(50, size=8, images=["camera", "grass"], seed=1)
    assert x.shape == (50, 64) and x.dtype == torch.float32
    assert torch.equal(x, image_patches(50, size=8, images=["camera", "grass"], seed=1))
    assert not torch.equal(x, image_patches(50, size=8, images=["camera", "grass"], seed=2))
    assert image_patches(5, size=4, images="camera", dtype=torch.float64).dtype == torch.float64


def test_every_patch_is_a_window_of_the_image_and_corners_are_reachable():
    height, width, size = 9, 7, 3
    image = np.arange(height * width, dtype=np.float64).reshape(height, width)  # values encode positions
    patches = image_patches(2000, size=size, images=image, seed=0, remove_mean=None).double().numpy()
    rows, columns = np.divmod(patches[:, 0].astype(int), width)
    for patch, row, column in zip(patches, rows, columns):
        np.testing.assert_array_equal(patch.reshape(size, size), image[row:row + size, column:column + size])
    # 35 positions, 2000 draws: every one is hit, the last row/column included (no off-by-one).
    assert rows.max() == height - size and columns.max() == width - size
    assert len(set(zip(rows, columns))) == (height - size + 1) * (width - size + 1)


def test_images_are_chosen_in_proportion_to_their_positions():
    small, large = np.zeros((10, 10)), np.ones((20, 20))  # 36 and 256 positions of 5x5
    patches = image_patches(4000, size=5, images=[small, large], seed=0, remove_mean=None)
    from_large = float((patches[:, 0] == 1).double().mean())
    expected = 256 / (256 + 36)
    assert abs(from_large - expected) < 6 * (expected * (1 - expected) / 4000) ** 0.5


def test_mean_removal_matches_numpy():
    raw = image_patches(300, size=6, images="gravel", seed=4, remove_mean=None, dtype=torch.float64).numpy()
    per_patch = image_patches(300, size=6, images="gravel", seed=4, remove_mean="patch", dtype=torch.float64)
    global_ = image_patches(300, size=6, images="gravel", seed=4, remove_mean="global", dtype=torch.float64)
    np.testing.assert_allclose(per_patch.numpy(), raw - raw.mean(axis=1, keepdims=True), atol=1e-12)
    np.testing.assert_allclose(global_.numpy(), raw - raw.mean(axis=0), atol=1e-12)
    assert np.abs(per_patch.numpy().sum(axis=1)).max() < 1e-10


def test_image_forms_stack_tensor_and_mixed_list():
    rng = np.random.default_rng(0)
    stack = rng.random((3, 10, 12))
    from_stack = image_patches(20, size=4, images=stack, seed=0)
    assert torch.equal(from_stack, image_patches(20, size=4, images=list(stack), seed=0))
    assert torch.equal(from_stack, image_patches(20, size=4, images=torch.as_tensor(stack), seed=0))
    assert image_patches(20, size=4, images=["camera", stack[0]], seed=0).shape == (20, 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be an integer >= 1"),
    (dict(size=1), "size must be an integer >= 2"),
    (dict(remove_mean="pixel"), "remove_mean must be one of"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(images=[np.zeros((20, 5))]), r"images\[0\] has shape \(20, 5\), smaller than the patch size"),
    (dict(images=[np.zeros((20, 20)), np.full((20, 20), np.nan)]), r"images\[1\] must be finite"),
    (dict(images=[np.zeros((20, 20, 3))]), r"images\[0\] must be a grey-scale image"),
    (dict(images=["camera", "lena"]), r"images\[1\] names no bundled image"),
    (dict(images=[]), "at least one image"),
    (dict(images=42), "images must be None, an image name"),
    (dict(images=[np.array([["a"] * 10] * 10)]), "real numbers"),
])
def test_bad_patch_arguments(kwargs, message):
    arguments = dict(n=10, size=6, images=np.zeros((20, 20)))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        image_patches(**arguments)


# ---- whitening ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["zca", "pca"])
def test_whitened_data_have_identity_covariance_and_invert(correlated, method):
    whitening = Whitening(method, epsilon=0).fit(correlated)
    y = whitening.transform(correlated)
    assert y.shape == (2000, 6) and y.dtype == torch.float64
    np.testing.assert_allclose(numpy_cov(y), np.eye(6), atol=1e-10)
    np.testing.assert_allclose(y.numpy().mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(whitening.inverse_transform(y).numpy(), correlated.numpy(), atol=1e-9)


def test_zca_matrices_are_the_symmetric_powers_of_the_covariance(correlated):
    whitening = Whitening("zca", epsilon=0).fit(correlated)
    covariance = numpy_cov(correlated)
    matrix = whitening.whitening_matrix.numpy()
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    np.testing.assert_allclose(matrix, scipy.linalg.fractional_matrix_power(covariance, -0.5).real, atol=1e-8)
    np.testing.assert_allclose(whitening.dewhitening_matrix.numpy(), scipy.linalg.sqrtm(covariance).real,
                               atol=1e-8)
    fields = torch.randn(6, 4, dtype=torch.float64)
    np.testing.assert_allclose(whitening.fields_to_pixels(fields).numpy(),
                               scipy.linalg.sqrtm(covariance).real @ fields.numpy(), atol=1e-8)


def test_pca_with_kept_components_matches_sklearn(correlated):
    decomposition = pytest.importorskip("sklearn.decomposition")
    whitening = Whitening("pca", n_components=3, epsilon=0).fit(correlated)
    y = whitening.transform(correlated)
    assert y.shape == (2000, 3) and whitening.output_dim == 3 and whitening.n_kept == 3
    np.testing.assert_allclose(numpy_cov(y), np.eye(3), atol=1e-10)
    reference = decomposition.PCA(3).fit(correlated.numpy())
    # sklearn's explained_variance_ divides by N - 1, ours by N.
    np.testing.assert_allclose(whitening.variances.numpy(), reference.explained_variance_ * 1999 / 2000, rtol=1e-10)
    projection = reference.inverse_transform(reference.transform(correlated.numpy()))
    np.testing.assert_allclose(whitening.inverse_transform(y).numpy(), projection, atol=1e-9)
    # PCA fields live in the 3-D whitened space; in pixel space they are U_3 diag(l_3)^(1/2) W.
    fields = torch.randn(3, 5, dtype=torch.float64)
    # Eigenvector signs are a convention: align sklearn's to ours, one sign per component.
    signs = np.sign(np.sum(reference.components_ * whitening.components.numpy(), axis=1))
    basis = reference.components_.T * signs * np.sqrt(reference.explained_variance_ * 1999 / 2000)
    np.testing.assert_allclose(whitening.fields_to_pixels(fields).numpy(), basis @ fields.numpy(), atol=1e-8)


def test_zca_with_kept_components_projects(correlated):
    decomposition = pytest.importorskip("sklearn.decomposition")
    whitening = Whitening("zca", n_components=2, epsilon=0).fit(correlated)
    y = whitening.transform(correlated)
    assert y.shape == (2000, 6)
    covariance = numpy_cov(y)
    np.testing.assert_allclose(covariance @ covariance, covariance, atol=1e-9)  # a projector ...
    assert abs(np.trace(covariance) - 2) < 1e-9  # ... of rank 2
    reference = decomposition.PCA(2).fit(correlated.numpy())
    np.testing.assert_allclose(whitening.inverse_transform(y).numpy(),
                               reference.inverse_transform(reference.transform(correlated.numpy())), atol=1e-9)


def test_variance_fraction_keeps_the_fewest_components(correlated):
    eigenvalues = np.sort(np.linalg.eigvalsh(numpy_cov(correlated)))[::-1]
    explained = np.cumsum(eigenvalues) / eigenvalues.sum()
    for fraction in (0.5, 0.9, 0.99, 1.0):
        expected = int(np.argmax(explained >= fraction - 1e-12)) + 1
        assert Whitening("pca", n_components=fraction).fit(correlated).n_kept == expected


def test_epsilon_shrinks_each_direction_as_documented(correlated):
    epsilon = 0.05
    y = Whitening("zca", epsilon=epsilon).fit_transform(correlated)
    eigenvalues = np.sort(np.linalg.eigvalsh(numpy_cov(correlated)))
    expected = eigenvalues / (eigenvalues + epsilon * eigenvalues.mean())
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(numpy_cov(y))), np.sort(expected), rtol=1e-8)


def test_constant_direction_of_dc_free_patches_is_dropped_not_amplified():
    patches = image_patches(3000, size=6, images=["camera", "grass"], seed=0)  # float32, DC removed
    whitening = Whitening("zca").fit(patches)
    assert whitening.n_kept == 35
    y = whitening.transform(patches).double().numpy()
    # Identity on the 35 DC-free directions, nothing along the constant patch.
    expected = np.eye(36) - np.full((36, 36), 1 / 36)
    np.testing.assert_allclose(numpy_cov(y), expected, atol=2e-4)
    assert np.abs(y.sum(axis=1)).max() < 1e-3


def test_whitening_follows_the_data_dtype_and_survives_a_checkpoint(correlated, tmp_path):
    whitening = Whitening("pca", n_components=4).fit(correlated)
    assert whitening.transform(correlated.float()).dtype == torch.float32
    torch.save(whitening.state_dict(), tmp_path / "whitening.pt")
    restored = Whitening.from_state_dict(torch.load(tmp_path / "whitening.pt"))
    assert torch.equal(restored.transform(correlated), whitening.transform(correlated))
    assert "pca" in repr(restored) and "6 -> 4" in repr(restored)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="pcaa"), "method must be 'zca' or 'pca'"),
    (dict(n_components=0), "n_components must be an integer >= 1"),
    (dict(n_components=1.5), r"must be in \(0, 1\]"),
    (dict(n_components=True), "n_components must be None"),
    (dict(epsilon=-1.0), "epsilon must be a finite number >= 0"),
    (dict(tol=0.0), "tol must be a finite number > 0"),
])
def test_bad_whitening_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Whitening(**kwargs)


def test_bad_whitening_data(correlated):
    with pytest.raises(ValueError, match="not fitted yet"):
        Whitening().transform(correlated)
    with pytest.raises(ValueError, match="at least 2 data points"):
        Whitening().fit(correlated[:1])
    with pytest.raises(ValueError, match="x must be finite"):
        Whitening().fit(torch.where(torch.arange(6) == 2, float("nan"), correlated))
    with pytest.raises(ValueError, match="zero variance in every direction"):
        Whitening().fit(torch.ones(10, 3))
    with pytest.raises(ValueError, match="exceeds the data dimension D = 6"):
        Whitening(n_components=7).fit(correlated)
    with pytest.raises(ValueError, match="only 2 directions with non-zero variance"):
        Whitening(n_components=3).fit(correlated[:, :2] @ torch.randn(2, 6, dtype=torch.float64))
    fitted = Whitening("pca", n_components=3).fit(correlated)
    with pytest.raises(ValueError, match="data dimension 5 .* data_dim = 6"):
        fitted.transform(correlated[:, :5])
    with pytest.raises(ValueError, match="data dimension 6 .* data_dim = 3"):
        fitted.inverse_transform(correlated)
    with pytest.raises(ValueError, match=r"fields must have shape \(output_dim, H\) = \(3, H\)"):
        fitted.fields_to_pixels(torch.zeros(6, 2))


# ---- a user's data ------------------------------------------------------------------------

def test_npy_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    matrix, stack = rng.normal(size=(7, 5)), rng.normal(size=(4, 3, 2))
    np.save(tmp_path / "matrix.npy", matrix)
    np.save(tmp_path / "stack.npy", stack)
    np.save(tmp_path / "counts.npy", np.arange(6).reshape(2, 3))
    loaded = load_array(tmp_path / "matrix.npy")
    assert loaded.dtype == torch.float32 and torch.equal(loaded, torch.as_tensor(matrix, dtype=torch.float32))
    assert torch.equal(load_array(str(tmp_path / "matrix.npy"), dtype=torch.float64), torch.as_tensor(matrix))
    assert torch.equal(load_array(tmp_path / "stack.npy", dtype=torch.float64), torch.as_tensor(stack.reshape(4, 6)))
    assert torch.equal(load_array(tmp_path / "counts.npy"), torch.arange(6.0).reshape(2, 3))


def _write(path, content):
    path = Path(path)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        with open(path, "wb") as file:
            np.savez(file, **content)
    else:
        np.save(path, content, allow_pickle=True)
    return path


@pytest.mark.parametrize("name, content, message", [
    ("missing.npy", None, "does not exist or is not a file"),
    ("data.txt", b"1 2 3", r"must name a \.npy file"),
    ("garbage.npy", b"this is not numpy", r"could not read .*garbage\.npy as a \.npy array"),
    ("archive.npy", {"a": np.zeros(3)}, r"looks like an \.npz archive"),
    ("objects.npy", np.array([{"a": 1}, None], dtype=object), r"could not read .*objects\.npy"),
    ("vector.npy", np.zeros(5), r"shape \(5,\); expected \(N, D\)"),
    ("colour.npy", np.zeros((2, 4, 4, 3)), r"shape \(2, 4, 4, 3\); expected"),
    ("complex.npy", np.zeros((2, 2), dtype=complex), "must hold real numbers"),
    ("empty.npy", np.zeros((0, 4)), "empty array"),
    ("nan.npy", np.array([[0.0, 1.0], [np.nan, 2.0]]), r"nan\.npy must be finite.*index \(1, 0\)"),
    ("inf.npy", np.array([[0.0, np.inf]]), r"inf\.npy must be finite"),
    ("huge.npy", np.array([[1e300, 0.0]]), "overflows torch.float32"),
])
def test_bad_npy_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        _write(path, content)
    with pytest.raises(ValueError, match=message):
        load_array(path)


def test_load_array_rejects_non_paths():
    with pytest.raises(ValueError, match="path must be a path"):
        load_array(np.zeros((2, 2)))


@pytest.fixture
def image_folder(tmp_path):
    """A folder with an 8-bit grey, an RGB, an RGBA and a 16-bit grey PNG, plus a text file."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, size=(6, 5), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "a_grey.png")
    Image.fromarray(rgb).save(tmp_path / "b_rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((6, 5), 7, np.uint8)])).save(tmp_path / "c_rgba.png")
    Image.fromarray(deep).save(tmp_path / "d_deep.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path, grey, rgb, deep


def test_image_folder_round_trip(image_folder):
    folder, grey, rgb, deep = image_folder
    images = load_image_folder(folder)
    assert len(images) == 4  # notes.txt is skipped
    luma = rgb @ np.array([0.2125, 0.7154, 0.0721]) / 255
    np.testing.assert_allclose(images[0], grey / 255, atol=1e-12)
    np.testing.assert_allclose(images[1], luma, atol=1e-12)
    np.testing.assert_allclose(images[2], luma, atol=1e-12)  # alpha dropped
    np.testing.assert_allclose(images[3], deep / 65535, atol=1e-12)
    stacked = load_image_folder(folder, stack=True, dtype=torch.float64)
    assert stacked.shape == (4, 30)
    np.testing.assert_allclose(stacked[1].numpy(), luma.reshape(-1), atol=1e-12)
    assert image_patches(10, size=3, images=images, seed=0).shape == (10, 9)


def test_image_folder_options(image_folder):
    folder = image_folder[0]
    (folder / "sub").mkdir()
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(folder / "sub" / "e.PNG")
    assert len(load_image_folder(folder, recursive=True)) == 5
    assert len(load_image_folder(folder, extensions=(".txt.", ".png"))) == 4


def test_image_folder_errors(image_folder, tmp_path_factory):
    folder = image_folder[0]
    empty = tmp_path_factory.mktemp("empty")
    (empty / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"no image files \(.*\.png.*\) found in .*empty"):
        load_image_folder(empty)
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        load_image_folder(folder / "a_grey.png")
    with pytest.raises(ValueError, match="extensions must be a non-empty sequence"):
        load_image_folder(folder, extensions="png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "e_small.png")
    with pytest.raises(ValueError, match=r"one size, but .*a_grey\.png is \(6, 5\) and .*e_small\.png is \(4, 4\)"):
        load_image_folder(folder, stack=True)
    (folder / "f_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"could not read .*f_broken\.png as an image"):
        load_image_folder(folder)


def test_float_images_with_nan_are_rejected(tmp_path):
    Image.fromarray(np.array([[0.5, np.nan], [1.0, 2.0]], dtype=np.float32)).save(tmp_path / "bad.tif")
    with pytest.raises(ValueError, match=r"bad\.tif contains NaN"):
        load_image_folder(tmp_path)
