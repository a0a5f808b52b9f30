"""Execute notebooks in place, at full size, and stamp them with what produced their outputs.

    .venv/bin/python notebooks/execute.py notebooks/0*.ipynb

Like ``jupyter execute --inplace``, with the environment's "python3" kernel and each notebook's
folder as the working directory, plus two things:

- stream outputs are coalesced, so a progress bar is saved as its final line (``jupyter execute``
  keeps every redraw);
- the notebook ends with a generated cell, and carries metadata, naming the commit, date, versions,
  thread count and runtime of the run (``STAMP_TAG``). It refuses to stamp outputs of a package with
  uncommitted changes: the commit must name the code that made them.

``PYRO_ESC_FAST=1`` gives the smoke-test sizes instead, and removes the stamp: those outputs were made
by no full run (``tests/test_notebooks.py`` then fails until the notebook is executed at full size).
"""

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent
#: The tag of the generated last cell (a markdown cell), replaced at every run.
STAMP_TAG = "provenance"


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def package_commit():
    """The commit whose ``pyro_esc/`` produced the outputs; refuses uncommitted package changes."""
    if _git("status", "--porcelain", "--", "pyro_esc", "pyproject.toml"):
        sys.exit("pyro_esc/ has uncommitted changes: commit them first, so the stamp names the code that ran")
    return _git("rev-parse", "--short=7", "HEAD")


def stamp(notebook, commit, seconds):
    """Replace the notebook's provenance cell and metadata with this run's."""
    import pyro
    import torch

    import pyro_esc

    record = {"commit": commit, "date": datetime.date.today().isoformat(), "seconds": round(seconds),
              "pyro_esc": pyro_esc.__version__, "torch": torch.__version__, "pyro": pyro.__version__}
    notebook.metadata["pyro_esc"] = record
    notebook.cells = [cell for cell in notebook.cells if STAMP_TAG not in cell.metadata.get("tags", [])]
    text = (f"*These outputs were produced by `python notebooks/execute.py` at commit `{record['commit']}` on "
            f"{record['date']} (pyro_esc {record['pyro_esc']}, torch {record['torch']}, Pyro {record['pyro']}, "
            f"one torch thread on a CPU), in {record['seconds']} s.*")
    notebook.cells.append(nbformat.v4.new_markdown_cell(text, metadata={"tags": [STAMP_TAG]}))


def execute(path, commit=None):
    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=-1, startup_timeout=120,
                                     coalesce_streams=True, record_timing=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    if commit is not None:
        stamp(notebook, commit, seconds)
    else:  # smoke-test outputs: no stamp may claim a full run made them
        notebook.metadata.pop("pyro_esc", None)
        notebook.cells = [cell for cell in notebook.cells if STAMP_TAG not in cell.metadata.get("tags", [])]
    nbformat.write(notebook, path)
    return seconds


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    fast = os.environ.get("PYRO_ESC_FAST", "0") != "0"
    commit = None if fast else package_commit()
    for name in sys.argv[1:]:
        print(f"{name}: {execute(name, commit):.0f} s", flush=True)
