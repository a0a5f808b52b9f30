"""Every notebook in notebooks/ runs top to bottom without a cell error.

The notebooks run in fast mode (``PYRO_ESC_FAST=1`` shrinks every size) on a copy in a
temporary folder, so the committed, executed notebooks are never overwritten. The kernel is
this interpreter's: a kernelspec written for the test points at ``sys.executable``, and a
first cell injected into the copy checks that the kernel's ``sys.prefix`` is the test's (so
the notebooks import the pyro_esc installed here, not another environment's).
"""

import json
import sys
import time
from pathlib import Path

import pytest
from helpers import DECIMAL_NUMBER, commit_in_history

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ("01_bars.ipynb", "02_natural_image_patches.ipynb", "03_compare_estimators.ipynb",
            "04_custom_guide.ipynb", "05_denoising.ipynb", "06_your_own_images.ipynb",
            "07_sparse_coding_and_ppca.ipynb")
#: Seconds one notebook may take in fast mode, all cells together (they take well under a minute).
NOTEBOOK_TIMEOUT = 300
KERNEL_NAME = "python3"


def test_expected_notebooks_exist():
    missing = [name for name in EXPECTED if not (NOTEBOOKS / name).is_file()]
    assert not missing, f"notebooks missing from {NOTEBOOKS}: {missing}"


def _cells(name):
    return json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))["cells"]


def _text(value):
    return "".join(value) if isinstance(value, list) else value


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_says_which_commit_produced_its_outputs(name):
    # notebooks/execute.py appends this cell; a notebook edited after its run, or never run, has none.
    notebook = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    last = notebook["cells"][-1]
    record = notebook["metadata"].get("pyro_esc", {})
    assert "provenance" in last.get("metadata", {}).get("tags", []) and record.get("commit"), \
        f"{name}: run `python notebooks/execute.py notebooks/{name}` to execute and stamp it"
    assert f"`{record['commit']}`" in _text(last["source"]), f"{name}: the stamp cell and the metadata disagree"
    assert any(cell.get("outputs") for cell in notebook["cells"] if cell["cell_type"] == "code"), \
        f"{name}: stamped, but no cell has an output"
    assert commit_in_history(record["commit"]), \
        f"{name}: the commit its stamp names, {record['commit']}, is not in this history"


@pytest.mark.parametrize("name", EXPECTED)
def test_numbers_in_a_notebooks_prose_are_printed_by_its_cells(name):
    # Prose once quoted a run's numbers by hand ("444 s" where the cell printed 440 s). A decimal number in
    # markdown must appear in a code cell or an output, where the run writes it.
    cells = _cells(name)
    printed = "\n".join(_text(cell["source"]) + "".join(
        _text(output.get("text", "")) + _text(output.get("data", {}).get("text/plain", ""))
        for output in cell.get("outputs", [])) for cell in cells if cell["cell_type"] == "code")
    prose = [_text(cell["source"]) for cell in cells if cell["cell_type"] == "markdown"
             and "provenance" not in cell.get("metadata", {}).get("tags", [])]
    copied = sorted({number for text in prose for number in DECIMAL_NUMBER.findall(text)
                     if number not in printed})
    assert not copied, f"{name}: numbers in the prose that no cell prints: {copied}"


def _kernelspec(folder):
    """A 'python3' kernelspec that runs ipykernel in this interpreter; returns the JUPYTER_PATH entry."""
    spec = folder / "jupyter" / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.prefix})",
        "language": "python",
    }))
    return str(folder / "jupyter")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs_in_fast_mode(name, tmp_path, monkeypatch):
    committed = (NOTEBOOKS / name).read_bytes()
    copy = tmp_path / "run" / name
    copy.parent.mkdir()
    copy.write_bytes(committed)
    notebook = nbformat.read(copy, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys\nassert sys.prefix == {sys.prefix!r}, (sys.prefix, sys.executable)"))

    # The kernel inherits this environment. JUPYTER_PATH comes first in the kernelspec search,
    # before any user-level 'python3' kernel that could point at another interpreter.
    monkeypatch.setenv("PYRO_ESC_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JUPYTER_PATH", _kernelspec(tmp_path))
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT
    client = nbclient.NotebookClient(
        notebook, kernel_name=KERNEL_NAME, record_timing=False, startup_timeout=120,
        # One budget for the whole notebook: each cell may use what the cells before it left.
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(copy.parent)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{name}: a cell failed in fast mode:\n{error}", pytrace=False)
    except nbclient.exceptions.CellTimeoutError as error:
        pytest.fail(f"{name}: did not finish within {NOTEBOOK_TIMEOUT} s in fast mode: {error}", pytrace=False)

    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors, f"{name}: error outputs: {errors}"
    # The committed notebook, the executed full-size version, is untouched.
    assert (NOTEBOOKS / name).read_bytes() == committed
