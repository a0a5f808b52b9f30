"""The README's quick start with one and with two torch threads: wall time, steps and ELBO.

Each run is its own subprocess (the thread count is set before anything runs), alternating, so that
machine noise hits both alike::

    python benchmarks/threads.py [--repeats 2] [--threads 1 2]

The thread count changes the order of float32 sums, so a run converges at another step, to the same
ELBO to the printed digits. Results: BENCHMARKS.md, "Threads".
"""

import argparse
import subprocess
import sys

RUN = """
import time, torch
torch.set_num_threads({threads})
from pyro_esc import SparseCoding, LocalMultivariateNormal, fit
from pyro_esc.data import bars
from pyro_esc.metrics import bars_recovery
start = time.perf_counter()
x, true_dictionary = bars(1000)
model = SparseCoding(data_dim=25, n_latents=10)
guide = LocalMultivariateNormal(model)
history = fit(model, guide, x, progress=False)
print(f"threads {threads}: {{time.perf_counter() - start:.1f}} s, ELBO {{history.final_elbo:.4f}}, "
      f"steps {{history.step[-1]}}, {{bars_recovery(model.dictionary, true_dictionary).num_found}} of 10 bars")
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    lines = []
    for _ in range(args.repeats):
        for threads in args.threads:
            done = subprocess.run([sys.executable, "-c", RUN.format(threads=threads)], capture_output=True, text=True,
                                  check=True)
            lines.append(done.stdout.strip())
            print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
