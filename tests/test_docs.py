"""The documentation cannot rot: its generated tables equal the commands' output, every
Python example on its pages is executed by the strict build, and the pages it promises
exist.

How the examples run: every ```python block in docs/*.md carries ``exec="on"``, so
markdown-exec executes it while ``mkdocs build --strict`` renders the page (``nox -s
docs``, in CI) and shows its printed output underneath. A block that raises is a build
warning, and strict mode turns it into a failed build. We chose the build over a pytest
that extracts the blocks because the output readers see is then produced by that very
code at every build: the code and the numbers shown beside it cannot drift apart.
Here we only check that no block escapes execution.

The tables (docs/generated/) are regenerated with ``python docs/generate.py --out TMP``
and compared cell by cell. Which cells are compared:

- stablemath's own cells always: they depend only on this library (values rounded to 4
  significant digits, error messages);
- a framework's cells (scipy, torch, jax.nn / optax) only when the installed versions
  equal those recorded in docs/generated/provenance.json: another release may change
  what its function returns or how its error reads;
- accuracy rows (ulp counts, which depend on each backend's ``exp`` and ``log1p`` to the
  last bit) only when that backend's versions and the machine architecture match; on a
  CPU with another vector extension than the recorded one (AVX2 and AVX-512: the
  libraries' vector ``exp`` and ``log`` round differently) to within 0.5 ulp and 5 %,
  exactly on the same one.

Columns of frameworks that are not installed are not regenerated and so not compared.
``nox -s docs`` installs every framework, at the versions that made the tables.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATED = DOCS / "generated"
TABLES = ("conformance.md", "accuracy.md", "errors.md")
PAGES = (
    "index.md",
    "getting-started.md",
    "nan.md",
    "semantics.md",
    "accuracy.md",
    "benchmarks.md",
    "backends.md",
    "api.md",
    "contributing.md",
)
PUBLIC = ("logsumexp", "softmax", "log_softmax", "cross_entropy", "nll_loss")

# The versions that decide a framework column (conformance, errors) or an accuracy row.
COLUMN_PACKAGES = {
    "scipy.special": ("numpy", "scipy"),
    "torch": ("torch",),
    "jax.nn / optax": ("jax", "jaxlib", "optax"),
}
BACKEND_PACKAGES = {"numpy": ("numpy", "machine"), "torch": ("torch", "machine")}
BACKEND_PACKAGES["jax"] = BACKEND_PACKAGES["jax (x64 off)"] = ("jax", "jaxlib", "machine")

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$", re.MULTILINE)


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if GENERATED not in p.parents)


def _fences(text: str) -> list[str]:
    """The info strings of the opening fences of ``text``'s code blocks."""
    infos = []
    closing = None
    for m in FENCE.finditer(text):
        if closing is None:
            closing = m["fence"]
            infos.append(m["info"].strip())
        elif m["fence"].startswith(closing) and not m["info"].strip():
            closing = None
    return infos


def test_every_python_example_is_executed_by_the_build() -> None:
    blocks = 0
    for page in _pages():
        for info in _fences(page.read_text()):
            lang = info.split()[0].lower() if info else ""
            if lang in ("python", "py", "pycon"):
                blocks += 1
                assert 'exec="on"' in info, (
                    f"{page.relative_to(ROOT)}: a ```{info} block is not executed; "
                    'add exec="on" (or use ```text for code that must not run)'
                )
    assert blocks >= 10, f"only {blocks} python examples found under docs/"


def test_pages_exist_and_are_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert (DOCS / page).is_file(), page
        assert re.search(rf"^\s*- [^\n]*: {re.escape(page)}$", config, re.MULTILINE), page


def test_snippets_point_at_files() -> None:
    included = set()
    for page in _pages():
        for name in re.findall(r'^--8<-- "([^"]+)"$', page.read_text(), re.MULTILINE):
            assert (DOCS / name).is_file(), f"{page.name} includes missing {name}"
            included.add(name)
    for table in (*TABLES, "benchmarks.md"):
        assert f"generated/{table}" in included, f"no page includes generated/{table}"


def test_api_reference_documents_every_public_function() -> None:
    api = (DOCS / "api.md").read_text()
    for name in PUBLIC:
        assert re.search(rf"^::: stablemath\.{name}$", api, re.MULTILINE), name


# --- the generated tables ------------------------------------------------------------------


def _cells(md: str, keys: int) -> dict[tuple[str, tuple[str, ...], str], str]:
    """Every table cell of ``md``: (section heading, first ``keys`` cells, column) -> text."""
    out = {}
    section, header = "", None
    for line in md.splitlines():
        if line.startswith("#"):
            section, header = line.lstrip("#").strip(), None
            continue
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(line) <= set("|-: "):
            for column, value in zip(header[keys:], cells[keys:], strict=True):
                out[(section, tuple(cells[:keys]), column)] = value
    return out


def _installed() -> dict[str, str]:
    """What ``docs/generate.py`` records in provenance.json, for this environment."""
    spec = importlib.util.spec_from_file_location("_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.versions()


def _close(committed: str, fresh: str) -> bool:
    """Two ulp counts of the accuracy table within 0.5 ulp and 5 % of each other."""
    try:
        a, b = float(committed), float(fresh)
    except ValueError:
        return committed == fresh
    return abs(a - b) <= 0.5 + 0.05 * max(abs(a), abs(b))


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    # the tables are made in the default configuration: the fast paths on, also in
    # the sessions that test the generic kernels (the jax (x64 off) rows differ)
    env = {k: v for k, v in os.environ.items() if k != "STABLEMATH_DISABLE_FASTPATHS"}
    subprocess.run(
        [sys.executable, "docs/generate.py", "--out", str(out)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=900,
        env=env,
    )
    return out


@pytest.mark.parametrize("table", TABLES)
def test_generated_table_matches_the_command(table: str, regenerated: Path) -> None:
    recorded = json.loads((GENERATED / "provenance.json").read_text())
    installed = _installed()

    def same(packages: tuple[str, ...]) -> bool:
        return all(installed.get(p) == recorded.get(p) for p in packages)

    keys = 4 if table == "accuracy.md" else 1
    committed = _cells((GENERATED / table).read_text(), keys)
    fresh = _cells((regenerated / table).read_text(), keys)
    assert fresh, f"the regenerated {table} holds no table"
    missing = sorted(set(fresh) - set(committed))
    assert not missing, f"docs/generated/{table} lacks {missing[:5]}: run python docs/generate.py"
    compared = 0
    for key, value in fresh.items():
        _, row, column = key
        if table == "accuracy.md":
            deciding = BACKEND_PACKAGES.get(row[2], tuple(installed))
            if row[3] == "scipy.special":
                deciding += ("scipy",)
        else:
            deciding = () if column.startswith("stablemath") else COLUMN_PACKAGES.get(column)
            deciding = tuple(installed) if deciding is None else deciding
        if same(deciding):
            compared += 1
            if table == "accuracy.md" and not same(("simd",)):
                assert _close(committed[key], value), (
                    f"docs/generated/{table}, {key}: committed {committed[key]!r}, the "
                    f"command gives {value!r} on a {installed['simd']} CPU (the table "
                    f"was made on a {recorded.get('simd')} one); run python docs/generate.py"
                )
                continue
            assert committed[key] == value, (
                f"docs/generated/{table}, {key}: committed {committed[key]!r}, the command "
                f"gives {value!r}; run python docs/generate.py"
            )
    if not compared:
        pytest.skip(f"every cell of {table} depends on versions other than the recorded ones")
    if all(installed.get(p) == recorded[p] for p in recorded if p not in ("python", "stablemath")):
        # the environment that made the tables: the whole file must be the same
        assert set(fresh) == set(committed)
