"""Sphinx configuration for the pyro_esc documentation.

Build (no network needed): ``sphinx-build -b html docs docs/_build/html`` (see docs/README.md).
"""

import argparse
import importlib
import os
import re
import sys

from docutils import nodes
from docutils.parsers.rst import Directive

# The command-line reference is argparse's help text: wrap it at a fixed width, whatever the terminal.
os.environ["COLUMNS"] = "100"

# Document the working tree's package, also when it is not installed.
sys.path.insert(0, os.path.abspath(".."))

project = "pyro_esc"
author = "pyro_esc contributors"
copyright = "pyro_esc contributors"

from pyro_esc import __version__ as release  # noqa: E402

version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store"]

# MyST: $...$ and $$...$$ math (as GitHub renders it), ```math blocks, and anchors for
# the headings of docs/theory.md and docs/lightning.md, so that "theory.md#theorem-2" links work.
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
myst_fence_as_directive = ["math"]

# Lightning is an optional extra: mock it, so the API pages build with or without it
# (and without the seconds that importing it takes).
autodoc_mock_imports = ["lightning"]
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autoclass_content = "both"

html_theme = "alabaster"
html_title = "pyro_esc"
html_static_path = []


def _resolve_reexport(app, env, node, contnode):
    """Resolve a reference to a re-exported name (``pyro_esc.fit``) to where it is documented
    (``pyro_esc.training.fit``), so that the docstrings' short cross-references link."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target.startswith("pyro_esc."):
        return None
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        break
    else:
        return None
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module is None or qualname is None or not module.startswith("pyro_esc"):
        return None
    canonical = f"{module}.{qualname}"
    if canonical == target:
        return None
    domain = env.get_domain("py")
    node = node.deepcopy()
    node["reftarget"] = canonical
    return domain.resolve_xref(env, node.get("refdoc"), app.builder, node.get("reftype"), canonical, node, contnode)


def _skip_generated(app, what, name, obj, skip, options):
    """Skip the ``set_*_request`` methods that scikit-learn's metadata routing generates on
    estimator classes: their docstrings are scikit-learn's and link into its own glossary."""
    if re.fullmatch(r"set_\w+_request", name):
        return True
    return None


#: Where the tutorials are rendered: generated at every build from the notebooks' stored outputs (gitignored).
TUTORIALS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tutorials")
NOTEBOOKS = os.path.join(os.path.dirname(TUTORIALS), "..", "notebooks")


def _benchmark_sections():
    # BENCHMARKS.md's headings by their GitHub anchors, so a notebook's link to one can name its section.
    path = os.path.join(NOTEBOOKS, "..", "BENCHMARKS.md")
    headings = re.findall(r"^#+ (.+?)\s*$", open(path, encoding="utf-8").read(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"): heading for heading in headings}


def render_notebooks(app=None):
    """Write each notebook as a page of ``docs/tutorials/``: its markdown, its code, and the outputs it was
    committed with (text and figures), nothing executed. Links into the documentation keep working from
    there (``../docs/theory.md`` becomes ``../theory.md``, ``02_x.ipynb`` the page ``02_x.md``); links to
    BENCHMARKS.md, outside the site, name the section instead."""
    import base64
    import glob
    import json

    os.makedirs(TUTORIALS, exist_ok=True)
    sections = _benchmark_sections()

    def benchmark_link(match):
        title = sections.get(match.group(2) or "")
        where = "`BENCHMARKS.md`" if title is None else f'`BENCHMARKS.md`, "{title}"'
        return f"{match.group(1)} ({where})"

    for path in sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb"))):
        name = os.path.splitext(os.path.basename(path))[0]
        cells = json.load(open(path, encoding="utf-8"))["cells"]
        parts, figures = [], 0
        for cell in cells:
            source = "".join(cell["source"]).rstrip()
            if cell["cell_type"] == "markdown":
                source = source.replace("](../docs/", "](../")
                source = re.sub(r"\[([^\]]+)\]\(\.\./BENCHMARKS\.md(?:#([\w\-]+))?\)", benchmark_link, source)
                source = re.sub(r"\]\((\d\d_\w+)\.ipynb\)", r"](\1.md)", source)  # another tutorial: its page
                parts.append(source)
                if len(parts) == 1:
                    parts.append(f"*Rendered from `notebooks/{name}.ipynb` as committed, with its outputs; "
                                 f"run the notebook to reproduce them.*")
                continue
            if cell["cell_type"] != "code" or not source:
                continue
            parts.append(f"```python\n{source}\n```")
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if "image/png" in data:
                    figures += 1
                    image = f"{name}_{figures}.png"
                    with open(os.path.join(TUTORIALS, image), "wb") as handle:
                        handle.write(base64.b64decode(data["image/png"]))
                    parts.append(f"![output]({image})")
                elif output.get("output_type") == "stream" and output.get("name") == "stdout":
                    parts.append("```text\n" + "".join(output["text"]).rstrip() + "\n```")
                elif "text/plain" in data:
                    parts.append("```text\n" + "".join(data["text/plain"]).rstrip() + "\n```")
        with open(os.path.join(TUTORIALS, f"{name}.md"), "w", encoding="utf-8") as handle:
            handle.write("\n\n".join(parts) + "\n")


#: Where BENCHMARKS.md is rendered, a page per section (generated at every build, gitignored).
BENCHMARK_PAGES = os.path.join(os.path.dirname(TUTORIALS), "benchmarks")


def render_benchmarks(app=None):
    """BENCHMARKS.md as pages of the site: its preamble as ``benchmarks/index``, each "## " section as a page
    of its own (one table and its commands each), with paths into the repository written from there."""
    with open(os.path.join(NOTEBOOKS, "..", "BENCHMARKS.md"), encoding="utf-8") as handle:
        text = handle.read()
    os.makedirs(BENCHMARK_PAGES, exist_ok=True)
    preamble, *sections = re.split(r"^## ", text, flags=re.M)

    def repository_paths(body):
        body = body.replace("](figures/", "](../../figures/").replace("](docs/", "](../")
        return re.sub(r"\[([^\]]+)\]\(README\.md\)", r"\1 (the repository's `README.md`)", body)

    names = []
    for number, section in enumerate(sections, 1):
        title, body = section.split("\n", 1)
        name = f"{number:02d}_" + re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
        names.append(name)
        body = re.sub(r"^#(#+) ", r"\1 ", body, flags=re.M)  # one level up: the section is the page
        with open(os.path.join(BENCHMARK_PAGES, f"{name}.md"), "w", encoding="utf-8") as handle:
            handle.write(f"# {title}\n{repository_paths(body)}")
    toctree = "\n".join(["```{toctree}", ":maxdepth: 1", ""] + names + ["```"])
    with open(os.path.join(BENCHMARK_PAGES, "index.md"), "w", encoding="utf-8") as handle:
        handle.write(repository_paths(preamble).rstrip() + "\n\nOne page per table, with the commands that made it:\n\n"
                     + toctree + "\n")


class _CommandLineHelp(Directive):
    """``command-line-help``: every sub-command's ``--help``, generated from ``pyro_esc.cli.build_parser()``
    at build time, so the reference cannot drift from the parser."""

    def run(self):
        from pyro_esc.cli import build_parser

        parser = build_parser()
        parser.prog = "pyro-esc"
        result = [nodes.literal_block(text=parser.format_help())]
        commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
        for name, command in commands.choices.items():
            command.prog = f"pyro-esc {name}"
            result += [nodes.rubric(text=f"pyro-esc {name}"), nodes.literal_block(text=command.format_help())]
        return result


def setup(app):
    app.connect("missing-reference", _resolve_reexport)
    app.connect("autodoc-skip-member", _skip_generated)
    app.add_directive("command-line-help", _CommandLineHelp)
    app.connect("builder-inited", render_notebooks)
    app.connect("builder-inited", render_benchmarks)
