"""The JSON-lines result files the benchmarks append to, one record per run, and resume from.

Imported by the scripts beside it (``python benchmarks/<name>.py`` puts this folder on the path).
Every record appended through :func:`append_record` says what produced it: the commit of the
checkout the script runs from (``-dirty`` when ``pyro_esc/`` has uncommitted changes; the
``PYRO_ESC_COMMIT`` environment variable names it for a copy outside git) and the date.
"""

import datetime
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_records(path):
    """Every record of the JSON-lines file ``path`` (none if it does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def provenance():
    """``{"commit": ..., "date": ...}`` for a record made now (no commit outside a git checkout)."""
    commit = os.environ.get("PYRO_ESC_COMMIT")
    if commit is None:
        try:
            def git(*args):
                return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                      check=True).stdout.strip()

            commit = git("rev-parse", "--short=7", "HEAD") + ("-dirty" if git("status", "--porcelain", "--",
                                                                                   "pyro_esc") else "")
        except (OSError, subprocess.CalledProcessError):
            commit = None
    stamp = {"date": datetime.date.today().isoformat()}
    return {"commit": commit, **stamp} if commit else stamp


def append_record(path, record):
    """Append ``record`` (a dict) to the JSON-lines file ``path``, stamped with :func:`provenance`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps({**record, **provenance()}) + "\n")
