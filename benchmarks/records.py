"""The JSON-lines result files the benchmarks append to, one record per run, and resume from.

Imported by the scripts beside it (``python benchmarks/<name>.py`` puts this folder on the path).
"""

import json
import os


def read_records(path):
    """Every record of the JSON-lines file ``path`` (none if it does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
