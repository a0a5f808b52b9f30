"""Execute notebooks in place, at full size, as the committed outputs were made.

    .venv/bin/python notebooks/execute.py notebooks/0*.ipynb

Like ``jupyter execute --inplace``, with the environment's "python3" kernel and each notebook's
folder as the working directory, and one addition: stream outputs are coalesced, so a progress
bar is saved as its final line (``jupyter execute`` keeps every redraw). ``PYRO_ESC_FAST=1``
gives the smoke-test sizes instead.
"""

import sys
import time
from pathlib import Path

import nbclient
import nbformat


def execute(path):
    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=-1, startup_timeout=120,
                                     coalesce_streams=True, record_timing=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    nbformat.write(notebook, path)
    return time.perf_counter() - start


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for name in sys.argv[1:]:
        print(f"{name}: {execute(name):.0f} s", flush=True)
