"""The documentation: the Sphinx site builds without a warning, and covers every public module.

Building with ``-W`` makes any docstring that Sphinx cannot parse (a bad indentation, ``|x|``
read as a substitution, a broken cross-reference in docs/*.md) fail this test. The build
needs sphinx and myst-parser (the ``docs`` and ``dev`` extras) and skips without them.
"""

import importlib
import importlib.util
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DECIMAL_NUMBER

import pyro_esc

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Other pages link to these anchors of docs/theory.md (e.g. "docs/theory.md#theorem-2").
THEORY_SECTIONS = ("The model", "The ELBO", "Theorem 1", "Theorem 2", "The entropy-based objective",
                   "Gaussian posteriors", "Annealing", "The paper's experiments", "Citing")


def public_modules():
    """Every module of the package whose name has no leading underscore, e.g. ``pyro_esc.data.whitening``.

    The old flat paths of modules that moved into layers (``pyro_esc.objectives`` is
    ``pyro_esc.infer.objectives``) are documented under their new names.
    """
    from test_layers import ALIASES

    names = []
    for info in pkgutil.walk_packages(pyro_esc.__path__, "pyro_esc."):
        if not any(part.startswith("_") for part in info.name.split(".")) and info.name not in ALIASES:
            names.append(info.name)
    return sorted(names)


def test_every_public_module_has_an_api_page():
    documented = set()
    for page in (DOCS / "api").glob("*.rst"):
        documented.update(re.findall(r"^\.\. automodule:: (\S+)", page.read_text(), flags=re.M))
    missing = [name for name in public_modules() if name not in documented]
    assert not missing, f"add a page to docs/api/ (and to the toctree of docs/index.rst) for {missing}"


def test_theory_has_the_sections_that_others_link_to():
    headings = re.findall(r"^## (.+?)\s*$", (DOCS / "theory.md").read_text(), flags=re.M)
    assert [h for h in headings if h in THEORY_SECTIONS] == list(THEORY_SECTIONS)


def test_no_pointer_to_a_file_outside_the_repository():
    # The method's notes once lived in a file beside the repository; docs/theory.md replaces it.
    outside = "PAPER" + ".md"
    hits = []
    paths = [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    for folder in ("pyro_esc", "tests", "benchmarks", "docs", "notebooks"):
        paths += [path for path in (ROOT / folder).rglob("*") if "_build" not in path.parts
                  and path.suffix in (".py", ".md", ".rst", ".ipynb")]
    for path in paths:
        if outside in path.read_text(encoding="utf-8"):
            hits.append(str(path.relative_to(ROOT)))
    assert not hits, f"point to docs/theory.md instead of {outside} in {hits}"


def _exists_unimported(module):
    # The module's file is there (found on its package's path without running it).
    import importlib.machinery

    package, _, name = module.rpartition(".")
    try:
        path = importlib.import_module(package).__path__
    except (ImportError, AttributeError):
        return False
    return importlib.machinery.PathFinder.find_spec(name, path) is not None


def _resolves(dotted):
    # The longest importable module prefix, then attributes: "pyro_esc.rows.parameter_name", "pyro_esc.denoise".
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            found = importlib.import_module(module)
        except ImportError:
            if cut > 1 and _exists_unimported(module):
                return True  # it exists, and needs an optional extra that is not installed (pyro_esc.lightning)
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def test_every_name_the_prose_gives_imports():
    # README, notebooks and docs once documented pyro_esc.denoise, which did not exist (only
    # pyro_esc.denoising.denoise did): every dotted pyro_esc name they write must resolve.
    paths = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "notebooks" / "README.md"]
    paths += sorted(DOCS.glob("*.md")) + sorted(DOCS.glob("*.rst")) + sorted((ROOT / "notebooks").glob("*.ipynb"))
    dead = sorted({(name, path.name) for path in paths
                   for name in re.findall(r"\bpyro_esc(?:\.[A-Za-z_]\w*)+", path.read_text(encoding="utf-8"))
                   if not _resolves(name)})
    assert not dead, f"names that do not import: {dead}"


def test_every_install_line_names_an_extra_that_exists_as_a_checkout_installs_it():
    # "pip install pyro-esc[lightning]" was printed, but the package is not on a package index, and a message
    # suggested an extra, "extras", that does not exist. From a checkout: pip install -e '.[name]'.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    paths = [ROOT / "README.md", ROOT / "BENCHMARKS.md"] + [
        path for folder in ("pyro_esc", "benchmarks", "docs", "notebooks")
        for path in (ROOT / folder).rglob("*") if path.suffix in (".py", ".md", ".rst", ".ipynb")
        and "_build" not in path.parts and "tutorials" not in path.parts]
    wrong = sorted({(path.name, line) for path in paths for line in re.findall(
        r"pip install[^`\n]*?pyro[-_]esc\[\w+\]|pip install -e '\.\[(?!(?:" + "|".join(extras) + r")\])\w+\]'",
        path.read_text(encoding="utf-8"))})
    assert not wrong, f"install lines that do not work from a checkout: {wrong}"


def test_the_estimator_is_public_without_importing_scikit_learn_up_front():
    code = ("import sys, pyro_esc; assert 'sklearn' not in sys.modules; "
            "from pyro_esc import SparseCodingEstimator; from pyro_esc.sklearn import SparseCodingEstimator as E; "
            "assert SparseCodingEstimator is E and pyro_esc.denoise is __import__('pyro_esc.denoising').denoising.denoise")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_sphinx_build_has_no_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    env = dict(os.environ, MPLBACKEND="Agg")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
               "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    html = tmp_path / "html"
    assert (html / "theory.html").exists() and (html / "api" / "lightning.html").exists()
    # The maths of docs/theory.md went to MathJax (dollarmath and ```math blocks), not into text.
    theory = (html / "theory.html").read_text(encoding="utf-8")
    assert theory.count('class="math') > 20 and "```math" not in theory
    # autodoc found the documented objects (a failed import would leave the page empty).
    assert "pyro_esc.apps.lightning.SparseCodingModule" in (html / "api" / "lightning.html").read_text(encoding="utf-8")
    # The tutorials: every notebook rendered from its stored outputs, figures included, nothing executed.
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = (html / "tutorials" / f"{notebook.stem}.html").read_text(encoding="utf-8")
        assert "<img" in page and "Rendered from" in page, notebook.name
    # BENCHMARKS.md: a page per section (each table with its commands), figures included.
    sections = re.findall(r"^## (.+?)\s*$", (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8"), flags=re.M)
    pages = sorted((html / "benchmarks").glob("[0-9][0-9]_*.html"))
    assert len(pages) == len(sections) and "<img" in (html / "benchmarks" / pages[5].name).read_text(encoding="utf-8")
    # The command-line reference is the parser's help, every sub-command's.
    reference = (html / "guide" / "command_line.html").read_text(encoding="utf-8")
    from pyro_esc.cli import build_parser

    commands = next(action for action in build_parser()._actions if hasattr(action, "choices") and action.choices
                    and "bars" in action.choices).choices
    assert all(f"pyro-esc {name}" in reference for name in commands) and "--no-warm-start" in reference


def modules_with_examples():
    return [name for name in public_modules() if ">>>" in Path(importlib.util.find_spec(name).origin).read_text()]


def test_every_public_name_has_an_example():
    # Pyro's and scikit-learn's way: each entry point shows its use, and test_docstring_examples_run runs it.
    import inspect

    missing = [name for name in pyro_esc.__all__ if ">>>" not in (inspect.getdoc(getattr(pyro_esc, name)) or "")]
    assert not missing, f"add an Example:: block with >>> lines to the docstrings of {missing}"


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples_run(name):
    """Every ``>>>`` example in a public module's docstrings runs and prints what it says."""
    import doctest

    import pyro

    module = importlib.import_module(name)
    with pyro.get_param_store().scope():
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
    assert result.attempted > 0


#: Prose that names a section of a file: 'README, "Quick start"', 'BENCHMARKS.md, "Units"',
#: 'docs/guide/extending.md, "Adding a prior"' (double quotes; single ones when a parenthesis closes them).
SECTION_REFERENCE = re.compile(r"(README|BENCHMARKS\.md|docs/[\w/]+\.md)(?:'s)?,? (?:section )?"
                               r"(?:[\"“]([^\"”]+)[\"”]|'([^']+)'\))")


def _prose(path):
    if path.suffix == ".ipynb":
        return "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text(encoding="utf-8"))["cells"])
    return path.read_text(encoding="utf-8")


def _headings(path):
    return {heading.strip() for heading in re.findall(r"^#+ (.+?)\s*$", path.read_text(encoding="utf-8"), flags=re.M)}


def test_every_section_the_prose_refers_to_exists():
    # Sections moved (README -> BENCHMARKS.md -> the user guide) and references to them went dead: README,
    # "Paper scale" in three docstrings, "Minibatch statistics", "Learning at scale" in a notebook.
    files = [path for folder in ("pyro_esc", "benchmarks", "docs", "notebooks", "tests")
             for path in (ROOT / folder).rglob("*") if path.suffix in (".py", ".md", ".rst", ".ipynb")
             and "_build" not in path.parts and "results" not in path.parts]
    files += [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    dead = set()
    for path in files:
        for target, double, single in SECTION_REFERENCE.findall(_prose(path)):
            section = re.sub(r"\s*\n\s*(#:?)?\s*", " ", double or single).strip()
            document = ROOT / ("README.md" if target == "README" else target)
            if section and (not document.exists() or section not in _headings(document)):
                dead.add((str(path.relative_to(ROOT)), target, section))
    assert not dead, f"references to sections that do not exist: {sorted(dead)}"


def test_the_readme_is_a_front_door_and_the_guide_is_in_the_site():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150, "README.md is the front door: move detail into docs/guide/"
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    for page in sorted((DOCS / "guide").glob("*.md")):
        assert f"docs/guide/{page.name}" in readme, f"README does not point to {page.name}"
        assert re.search(rf"^   guide/{page.stem}$", index, flags=re.M), f"docs/index.rst does not list {page.name}"


def test_every_command_line_the_prose_gives_names_a_sub_command_and_flags_that_exist():
    # The README once showed `denoise [--latents 50]` and said every sub-command takes --device/--out: each
    # `pyro-esc SUB --flag` written in the prose must name a sub-command and flags its parser accepts.
    from pyro_esc.cli import build_parser

    sub_parsers = next(action for action in build_parser()._actions
                       if hasattr(action, "choices") and action.choices and "bars" in action.choices).choices
    flags = {name: {option for action in parser._actions for option in action.option_strings}
             for name, parser in sub_parsers.items()}
    paths = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "notebooks" / "README.md"]
    paths += sorted(DOCS.rglob("*.md")) + sorted((ROOT / "notebooks").glob("*.ipynb"))
    wrong, seen = set(), 0
    for path in paths:
        if {"_build", "tutorials", "benchmarks"} & set(path.relative_to(ROOT).parts[:-1]):
            continue  # generated at build time from the files checked here
        for command, rest in re.findall(r"pyro-esc ([a-z][\w-]*)((?:[ \t]+[^`\n|;)]*)?)", _prose(path)):
            if command not in flags:
                if command not in ("and", "or", "is", "uses", "runs", "itself"):  # prose, not a command
                    wrong.add((path.name, f"pyro-esc {command}"))
                continue
            seen += 1
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                if flag not in flags[command]:
                    wrong.add((path.name, f"pyro-esc {command} {flag}"))
    assert seen > 20, "the pattern found too few command lines to be checking anything"
    assert not wrong, f"command lines in the prose that the CLI does not accept: {sorted(wrong)}"


def test_the_results_page_quotes_only_numbers_the_benchmarks_hold():
    # docs/guide/results.md once held copies of BENCHMARKS.md's tables that drifted from them: every decimal
    # number on the page must be one BENCHMARKS.md (which names the commit of each table) also has.
    page = (DOCS / "guide" / "results.md").read_text(encoding="utf-8")
    benchmarks = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    numbers = set(DECIMAL_NUMBER.findall(page))
    assert len(numbers) > 5
    copied = sorted(number for number in numbers if number not in benchmarks)
    assert not copied, f"numbers on docs/guide/results.md that BENCHMARKS.md does not hold: {copied}"
