"""The documentation stays true.

- The manual (``docs/``, ``mkdocs.yml``) builds with ``mkdocs build --strict``: a broken
  link or anchor, a page missing from the navigation, a missing included file fails.
- Every relative link of ``README.md`` (the front page, read on GitHub, outside the site)
  resolves to a file of the repository, and its anchor, when it names one, to a heading.
- The README stays a front page (at most 250 lines) and keeps the two set-up commands.
- The README's fenced commands that can run offline are run. Each fenced ``bash`` /
  ``python`` block outside "Set up on a fresh machine" carries a marker on the line before
  it: ``<!-- doc-test: run -->``, or ``<!-- doc-test: skip (why) -->`` for what cannot run
  here: a block that needs a running server (curl, the SDK, ``openai``), one that downloads
  (``scripts/fetch_models.sh``). The two set-up commands (``scripts/serve.sh``, which starts
  a server and stays, and ``scripts/test.sh``, which runs this suite) are checked to be
  unchanged, never run. Blocks without a language are diagrams or output, not commands.
- The table of ``engine serve`` flags in ``docs/deployment.md`` is what
  ``scripts/docs_flags.py`` generates from the parser ``engine serve --help`` prints.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SETUP_SECTION = "Set up on a fresh machine"
SETUP_COMMANDS = ["scripts/serve.sh", "scripts/test.sh"]
COMMAND_LANGUAGES = {"bash", "sh", "shell", "console", "python", "py"}
MARKER = re.compile(r"^<!-- doc-test: (run|skip \((?P<why>[^)]+)\)) -->$")
QUESTION = ("Sally is a kirpus. Every kirpus is a sumpus. Gabriel is a pilpus. Every pilpus is a grulpus. "
            "Every grulpus is a screrpus. Is Gabriel a sumpus or screrpus?")


# ------------------------------------------------------------------ the site

def test_the_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs / mkdocs-material are not installed: pip install -e '.[docs]' "
                    "(scripts/setup.sh --test installs them)")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}   # Material's banner about its successor, not a warning
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    for page in ["index.html", "api/index.html", "deployment/index.html", "training/index.html",
                 "benchmarks/index.html", "sdk/index.html", "docker/index.html"]:
        assert (site / page).is_file(), page
    # the pages that include a README beside its code got its text, not the include line
    assert "coconut_client" in (site / "sdk" / "index.html").read_text()
    assert "--8&lt;--" not in (site / "docker" / "index.html").read_text()


# ------------------------------------------------------------------ the README's links

def _without_code(text: str) -> str:
    text = re.sub(r"(?ms)^```.*?^```\s*$", "", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _links(text: str) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _without_code(text))


def _slugs(markdown: str) -> set[str]:
    """The anchors of a page's headings, as GitHub and as Python-Markdown (MkDocs) make them."""
    slugs = set()
    for heading in re.findall(r"(?m)^#{1,6}\s+(.+?)\s*#*\s*$", _strip_fences(markdown)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
        text = re.sub(r"[^\w\- ]", "", text)
        slugs.add(text.replace(" ", "-"))                 # GitHub
        slugs.add(re.sub(r"[-\s]+", "-", text).strip("-"))  # Python-Markdown's toc
    return slugs


def _strip_fences(text: str) -> str:
    return re.sub(r"(?ms)^```.*?^```\s*$", "", text)


def test_every_relative_link_of_the_readme_resolves():
    text = README.read_text()
    checked = 0
    for target in _links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):     # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        assert not path.startswith("../"), f"README.md links outside the repository: {target}"
        file = (REPO / path).resolve() if path else README
        assert file.is_relative_to(REPO), f"README.md links outside the repository: {target}"
        assert file.exists(), f"README.md links to {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in _slugs(file.read_text()), f"README.md links to {target}: no such heading"
        checked += 1
    assert checked >= 10, "the README's links were not found: the pattern is broken"


def test_the_readme_is_a_front_page_with_the_set_up_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move the detail to docs/ (at most 250)"
    marker = lines.index("<!-- test-command -->")
    assert lines[marker + 2] == "scripts/test.sh", "the line CI runs (.ci/run) changed"
    assert [b.body.strip() for b in _blocks() if b.section == SETUP_SECTION] == SETUP_COMMANDS


# ------------------------------------------------------------------ the README's commands

class Block:
    def __init__(self, section: str, language: str, body: str, marker: str | None, line: int):
        self.section, self.language, self.body, self.marker, self.line = section, language, body, marker, line

    def __repr__(self) -> str:
        return f"README.md:{self.line} ({self.language}, {self.section!r})"


def _blocks() -> list[Block]:
    blocks, section, previous = [], "", ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            language = line[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            marker = previous if previous.startswith("<!-- doc-test") else None
            blocks.append(Block(section, language, "\n".join(lines[i + 1:end]), marker, i + 1))
            i, previous = end + 1, ""
            continue
        if line.strip():
            previous = line.strip()
        i += 1
    return blocks


COMMAND_BLOCKS = [b for b in _blocks() if b.language in COMMAND_LANGUAGES and b.section != SETUP_SECTION]
RUN_BLOCKS = [b for b in COMMAND_BLOCKS if b.marker == "<!-- doc-test: run -->"]


def test_every_command_block_says_whether_it_runs_offline():
    assert COMMAND_BLOCKS, "no fenced command blocks found: the parser is broken"
    for block in COMMAND_BLOCKS:
        assert block.marker is not None, (
            f"{block}: mark it <!-- doc-test: run --> if it runs offline, or "
            f"<!-- doc-test: skip (why) --> on the line before the fence")
        assert MARKER.match(block.marker), f"{block}: not a doc-test marker: {block.marker!r}"
    assert RUN_BLOCKS, "no README command is run: mark the offline ones <!-- doc-test: run -->"


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: f"line{b.line}-{b.language}")
def test_the_readme_commands_that_run_offline(block):
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if block.language in {"python", "py"}:
        argv = [sys.executable, "-c", block.body]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", block.body]
    run = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{block} failed:\n{block.body}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    if QUESTION in block.body:   # the README's question: the bundled model's answer, as the README shows it
        assert "Gabriel is a screrpus." in run.stdout, run.stdout


# ------------------------------------------------------------------ the flag table

def _docs_flags():
    spec = importlib.util.spec_from_file_location("docs_flags", REPO / "scripts" / "docs_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_serve_flag_table_is_the_parsers():
    flags = _docs_flags()
    page = flags.PAGE.read_text()
    assert flags.render(page, flags.table()) == page, (
        "docs/deployment.md's engine serve flag table differs from `engine serve --help`: "
        "run .venv/bin/python scripts/docs_flags.py")


def test_the_flag_table_has_every_setting_and_its_default():
    """Independently of the generator's formatting: every ServerSettings field is a row with
    its flag and environment variable, and a plain default (a number, a word) is the field's."""
    from server.settings import ServerSettings

    rows = {row["env"]: row for row in _docs_flags().flag_rows()}
    page = (REPO / "docs" / "deployment.md").read_text()
    for name, field in ServerSettings.model_fields.items():
        env = f"COCONUT_{name.upper()}"
        assert env in rows, f"{name}: no row"
        assert f"`--{name.replace('_', '-')}`" in page, f"--{name.replace('_', '-')} is not in docs/deployment.md"
        if isinstance(field.default, (int, float, str)) and not isinstance(field.default, bool) and field.default != "":
            assert rows[env]["default"] == str(field.default), (name, rows[env]["default"], field.default)
