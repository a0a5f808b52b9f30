"""Figures: what they show (pixel values of the grids, plotted data), labels, files written."""

from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pyro_esc.data import Whitening, bars, bars_dictionary  # noqa: E402
from pyro_esc.plots import (SEPARATOR_COLOR, plot_data_samples, plot_fields, plot_training_curves,  # noqa: E402
                            save_figure)


@dataclass
class History:
    """Stand-in for the training loop's history: one list per quantity."""

    step: list = field(default_factory=list)
    elbo: list = field(default_factory=list)
    wall_time: list = field(default_factory=list)
    epoch: list = field(default_factory=list)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def tile(fig, index, height, width, ncols):
    """Tile ``index`` of the (only) mosaic in ``fig``, one value per field pixel (grey level).

    Independent of the drawing code: reads the layout documented in plots.mosaic.
    """
    (image,) = fig.axes[0].get_images()
    rgba = np.asarray(image.get_array())
    r = int(np.ceil(24 / max(height, width)))
    row, column = divmod(index, ncols)
    top, left = 1 + row * (height * r + 1), 1 + column * (width * r + 1)
    block = rgba[top:top + height * r, left:left + width * r]
    assert np.allclose(block[..., 0], block[..., 1]) and np.allclose(block[..., 0], block[..., 2])  # grey
    return block[::r, ::r, 0]


def test_bars_fields_show_each_bar_light_on_mid_grey():
    dictionary = bars_dictionary(5)
    fig = plot_fields(dictionary)
    assert isinstance(fig, Figure) and len(fig.axes) == 1 and len(fig.axes[0].get_images()) == 1
    assert fig.axes[0].get_title() == "Generative fields (H = 10)"
    assert "5x5" in fig.axes[0].get_xlabel()
    for h in range(10):
        expected = np.where(dictionary[:, h].reshape(5, 5).numpy() > 0, 1.0, 0.5)
        np.testing.assert_allclose(tile(fig, h, 5, 5, ncols=4), expected)


def test_fields_are_sign_aligned_sorted_and_scaled_symmetrically():
    dictionary = bars_dictionary(3).clone()
    dictionary[:, 2] *= -3  # flipped and scaled: still shown as the same light bar
    dictionary[0, 0] = -0.2 * dictionary[1, 0]  # field 0: a faint negative pixel beside its bar
    scales = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7, 0.2])
    fig = plot_fields(dictionary, order=scales, ncols=3, title="sorted")
    for position, h in enumerate(torch.argsort(scales, descending=True).tolist()):
        field_ = dictionary[:, h].reshape(3, 3).numpy()
        field_ = field_ * np.sign(field_.flat[np.abs(field_).argmax()])
        expected = (field_ / np.abs(field_).max() + 1) / 2
        np.testing.assert_allclose(tile(fig, position, 3, 3, ncols=3), expected, atol=1e-7)
    assert fig.axes[0].get_title() == "sorted"


def test_fields_through_pca_whitening_are_shown_in_pixel_space():
    x, _ = bars(400, side=4, seed=0)
    whitening = Whitening("pca", n_components=8).fit(x)
    learned = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    fig = plot_fields(learned, whitening=whitening, ncols=5)
    pixels = (whitening.dewhitening_matrix.numpy() @ learned.double().numpy()).T
    for h in range(5):
        field_ = pixels[h].reshape(4, 4)
        field_ = field_ * np.sign(field_.flat[np.abs(field_).argmax()])
        np.testing.assert_allclose(tile(fig, h, 4, 4, ncols=5), (field_ / np.abs(field_).max() + 1) / 2,
                                   atol=1e-6)
    assert "pixel space" in fig.axes[0].get_xlabel()
    with pytest.raises(ValueError, match=r"fields must have shape \(output_dim, H\) = \(8, H\)"):
        plot_fields(torch.randn(16, 5), whitening=whitening)


def test_separators_and_empty_cells():
    fig = plot_fields(bars_dictionary(3), ncols=4)  # 6 fields in 2 rows of 4: two empty cells
    rgba = np.asarray(fig.axes[0].get_images()[0].get_array())
    assert np.allclose(rgba[0, 0], to_rgba(SEPARATOR_COLOR))
    assert rgba[-2, -2, 3] == 0  # inside the last, empty cell: transparent


def test_fields_into_given_axes_side_by_side():
    fig, axes = plt.subplots(1, 2)
    assert plot_fields(bars_dictionary(3), ax=axes[0], title="epoch 1") is fig
    assert plot_fields(bars_dictionary(3), ax=axes[1], title="epoch 2") is fig
    assert [ax.get_title() for ax in fig.axes] == ["epoch 1", "epoch 2"]
    fig = plot_fields(bars_dictionary(3), title="Full covariance\n6 of 6 bars")
    assert fig.axes[0].get_title() == "Full covariance\n6 of 6 bars"  # explicit breaks are kept
    long_title = "a very long title " * 8
    assert "\n" in plot_fields(bars_dictionary(3), title=long_title).axes[0].get_title()  # wrapped to fit


@pytest.mark.parametrize("kwargs, message", [
    (dict(dictionary=torch.zeros(24, 3)), "not a square number: pass shape"),
    (dict(dictionary=torch.zeros(24, 3), shape=(5, 5)), r"shape=\(5, 5\) has 25 pixels"),
    (dict(shape=(3, "3")), "shape must be a pair of positive ints"),
    (dict(dictionary=torch.zeros(9)), r"dictionary must be a non-empty matrix \(D, H\)"),
    (dict(dictionary=torch.full((9, 2), float("nan"))), "dictionary must be finite"),
    (dict(order="size"), "order must be None, 'norm' or a sequence of H = 6"),
    (dict(order=[1.0, 2.0]), r"one finite number per field, shape \(6,\)"),
    (dict(normalize="global"), "normalize must be 'each' or 'common'"),
    (dict(ncols=0), "ncols must be an integer >= 1"),
    (dict(whitening="zca"), "whitening must be a fitted pyro_esc.data.Whitening"),
    (dict(ax="left"), "ax must be a matplotlib Axes"),
])
def test_bad_field_arguments(kwargs, message):
    arguments = dict(dictionary=bars_dictionary(3))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        plot_fields(**arguments)


def test_data_samples_show_the_chosen_points():
    x, _ = bars(50, side=4, seed=1)
    fig = plot_data_samples(x, n=6, seed=3, ncols=3)
    assert fig.axes[0].get_title() == "Data samples (6 of 50)"
    chosen = np.random.default_rng(3).choice(50, size=6, replace=False)
    for position, index in enumerate(chosen):
        sample = x[index].reshape(4, 4).numpy().astype(np.float64)
        np.testing.assert_allclose(tile(fig, position, 4, 4, ncols=3), (sample / np.abs(sample).max() + 1) / 2,
                                   atol=1e-6)
    first = plot_data_samples(x, n=4, seed=None, symmetric=False, normalize="common", ncols=4)
    common = x[:4].numpy().astype(np.float64)
    common = (common - common.min()) / (common.max() - common.min())
    for index in range(4):
        np.testing.assert_allclose(tile(first, index, 4, 4, ncols=4), common[index].reshape(4, 4), atol=1e-6)


def test_data_samples_n_larger_than_n_points_and_errors():
    x = np.random.default_rng(0).normal(size=(3, 6))
    fig = plot_data_samples(x, shape=(2, 3), n=16, seed=None, ncols=2)
    assert fig.axes[0].get_title() == "Data samples (3 of 3)"
    for index in range(3):  # non-square tiles: rows and columns must not be swapped
        sample = x[index].reshape(2, 3)
        np.testing.assert_allclose(tile(fig, index, 2, 3, ncols=2), (sample / np.abs(sample).max() + 1) / 2,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="x must have shape \\(N, D\\)"):
        plot_data_samples(x[0])
    with pytest.raises(ValueError, match="not a square number: pass shape"):
        plot_data_samples(x)
    with pytest.raises(ValueError, match="x must be finite"):
        plot_data_samples(np.full((2, 4), np.inf))
    with pytest.raises(ValueError, match="seed must be a non-negative int or None"):
        plot_data_samples(np.zeros((2, 4)), seed=1.5)


def _histories():
    steps = list(range(0, 200, 10))
    return {
        "full": History(steps, [-50.0] + [-2 + 1 / (s + 10) for s in steps[1:]], [0.1 * s for s in steps],
                        [s / 100 for s in steps]),
        "diag": History(steps, [-40.0] + [-2.5 + 1 / (s + 10) for s in steps[1:]], [0.05 * s for s in steps],
                        [s / 100 for s in steps]),
    }


@pytest.mark.parametrize("x, label", [("step", "step"), ("wall_time", "wall-clock time (s)"), ("epoch", "epoch")])
def test_training_curves_plot_the_chosen_axis(x, label):
    histories = _histories()
    fig = plot_training_curves(histories, x=x, title="Bars")
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["full", "diag"]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["full", "diag"]
    for line, history in zip(lines, histories.values()):
        np.testing.assert_allclose(line.get_xdata(), getattr(history, x))
        np.testing.assert_allclose(line.get_ydata(), history.elbo)
    assert ax.get_xlabel() == label and "higher is better" in ax.get_ylabel() and ax.get_title() == "Bars"
    # "auto": the first, far lower values are cut off; the rest of every run is in view.
    bottom, top = ax.get_ylim()
    assert -40 < bottom < -2.5 + 1 / 20 and top >= -2 + 1 / 20


def test_training_curves_accept_mappings_and_fixed_limits():
    history = {"step": [0, 1, 2], "elbo": [-3.0, -2.0, -1.5], "wall_time": [0, 1, 2], "epoch": [0, 0, 1]}
    fig = plot_training_curves({"run": history}, ylim=(-4, 0))
    assert fig.axes[0].get_ylim() == (-4, 0)
    fig = plot_training_curves({"run": history}, ylim=None)
    assert fig.axes[0].get_ylim()[0] < -3


@pytest.mark.parametrize("histories, kwargs, message", [
    ({}, {}, "histories must be a non-empty mapping"),
    ([History([1], [1.0], [1.0], [1])], {}, "histories must be a non-empty mapping"),
    ({"a": History([1, 2], [1.0], [1.0], [1])}, {}, "has 2 step values but 1 elbo values"),
    ({"a": History([], [], [], [])}, {}, r"histories\['a'\] is empty"),
    ({"a": History([1], [float("nan")], [1.0], [1])}, {}, "NaN or inf"),
    ({"a": object()}, {}, r"histories\['a'\] has no 'step'"),
    ({"a": History([1], [1.0], [1.0], [1])}, dict(x="time"), "x must be one of"),
    ({"a": History([1], [1.0], [1.0], [1])}, dict(ylim="tight"), "ylim must be 'auto', None or a pair"),
])
def test_bad_training_curves(histories, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plot_training_curves(histories, **kwargs)


def test_save_figure_writes_a_png_and_closes(tmp_path):
    fig = plot_fields(bars_dictionary(3))
    path = save_figure(fig, tmp_path / "nested" / "folder" / "fields.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.imread(path).shape[0] > 50
    assert not plt.fignum_exists(fig.number)
    with pytest.raises(ValueError, match="fig must be a matplotlib Figure"):
        save_figure("fig", tmp_path / "x.png")
    with pytest.raises(ValueError, match="dpi must be a finite number > 0"):
        save_figure(plot_fields(bars_dictionary(3)), tmp_path / "x.png", dpi=0)


def test_fields_caption_can_be_left_out():
    import matplotlib.pyplot as plt

    from pyro_esc.data import bars_dictionary
    from pyro_esc.plots import plot_fields

    with_caption = plot_fields(bars_dictionary(3))
    without = plot_fields(bars_dictionary(3), caption=False)
    assert "mid-grey = 0" in with_caption.axes[0].get_xlabel()
    assert without.axes[0].get_xlabel() == ""
    plt.close(with_caption)
    plt.close(without)
