"""The user docs cannot drift from the code: every `fastseed-*` command line shown in README.md
and docs/*.md goes through the real parser of its entry point, every relative link resolves, the
README stays short, no commit hash sits in the prose, and docs/results.md is what
benchmarks/results_page.py makes of benchmarks/results/ now.

Commands are read from fenced blocks whose language is empty, bash, sh, shell or console (text,
python and yaml blocks are output or code, not commands). A line ending in a backslash continues
on the next; `#` starts a comment; `;`, `&&`, `||` and `|` separate commands; the first token
named `fastseed-<entry point>` (any directory before it: `.venv/bin/fastseed-train`, torchrun's
`--no-python fastseed-train`) starts the command and the rest of its segment are its arguments.
A `...` argument stands for "the rest of your command" and is dropped; the flags around it are
still checked. A line with the comment `docs-test: skip` is not checked: keep those rare.

docs/results.md is exempt from the hash and wording checks: it is generated verbatim from the
results rows, whose provenance (commit, date, device) is what it exists to show; its own test is
that it is not stale.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
GENERATED = ROOT / "docs" / "results.md"
PROSE = [p for p in PAGES if p != GENERATED]
SHELL = {"", "bash", "sh", "shell", "console"}
ENTRY = re.compile(r"^fastseed-(train|eval|prep|cache|export|embed)$")
OPERATORS = {";", "&&", "||", "|", "&"}
README_MAX_LINES = 200


def _parsers() -> dict:
    from fastseed import cli
    from fastseed.data_prep.write import build_parser
    return {"fastseed-train": cli.train_parser, "fastseed-eval": cli.eval_parser, "fastseed-prep": build_parser,
            "fastseed-cache": cli.cache_parser, "fastseed-export": cli.export_parser,
            "fastseed-embed": cli.embed_parser}


@functools.cache
def parser(prog: str) -> argparse.ArgumentParser:
    """The entry point's parser as the command line builds it, with abbreviations off (a doc
    names every flag in full) and errors raised instead of exiting."""
    p = _parsers()[prog]()
    p.allow_abbrev = False

    def error(message):
        raise ValueError(message)
    p.error = error
    return p


def fenced_blocks(path: Path):
    """(language, [(line number, text)]) of each fenced block of a Markdown file."""
    block, lang = None, ""
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        fence = re.match(r"^\s*```(\S*)", line)
        if fence and block is None:
            block, lang = [], fence.group(1).lower()
        elif fence:
            yield lang, block
            block = None
        elif block is not None:
            block.append((n, line))


def logical_lines(lines):
    """Join backslash continuations: (number of the first line, text)."""
    start, parts = None, []
    for n, text in lines:
        if start is None:
            start = n
        if text.rstrip().endswith("\\"):
            parts.append(text.rstrip()[:-1])
            continue
        parts.append(text)
        yield start, " ".join(parts)
        start, parts = None, []
    if parts:
        yield start, " ".join(parts)


def tokens(text: str) -> list[str]:
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def commands(path: Path):
    """(line, entry point, arguments) of each fastseed-* command shown in `path`."""
    for lang, block in fenced_blocks(path):
        if lang not in SHELL:
            continue
        for line, text in logical_lines(block):
            if "docs-test: skip" in text:
                continue
            try:
                words = tokens(text)
            except ValueError as e:  # an unbalanced quote
                if "fastseed-" in text:
                    yield line, "unreadable", [f"{e}: {text}"]
                continue
            segment: list[str] = []
            for tok in words + [";"]:
                if tok not in OPERATORS:
                    segment.append(tok)
                    continue
                for i, word in enumerate(segment):
                    if ENTRY.match(word.rsplit("/", 1)[-1]):
                        yield line, word.rsplit("/", 1)[-1], [a for a in segment[i + 1:] if a != "..."]
                        break
                segment = []


COMMANDS = [(path, line, prog, args) for path in PAGES for line, prog, args in commands(path)]


def test_the_docs_show_commands_of_every_entry_point():
    assert len(COMMANDS) >= 30, f"only {len(COMMANDS)} commands found: is the extraction broken?"
    shown = {prog for _, _, prog, _ in COMMANDS} - {"unreadable"}
    setup = (ROOT / "setup.py").read_text()
    scripts = set(re.findall(r'"(fastseed-[a-z]+)=fastseed\.cli:', setup))
    assert scripts == set(_parsers()), f"setup.py's entry points {scripts} are not the parsers this test knows"
    assert shown == scripts, f"no command of {sorted(scripts - shown)} in README.md or docs/"


@pytest.mark.parametrize("path,line,prog,args", COMMANDS,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _, _ in COMMANDS])
def test_a_documented_command_parses(path, line, prog, args):
    where = f"{path.relative_to(ROOT)}:{line}: {prog} {shlex.join(args)}"
    assert prog != "unreadable", f"{path.relative_to(ROOT)}:{line}: the shell cannot read it: {args[0]}"
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            parser(prog).parse_args(args)
    except ValueError as e:
        pytest.fail(f"{where}\n  {prog}: error: {e}")
    except SystemExit as e:  # --help
        assert e.code == 0, f"{where}\n  exit {e.code}"


def test_the_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move details to docs/"


HASH = re.compile(r"(?<![\w./-])[0-9a-f]{7,40}(?![\w-])")


@pytest.mark.parametrize("path", PROSE, ids=[str(p.relative_to(ROOT)) for p in PROSE])
def test_no_commit_hashes_in_the_prose(path):
    """Provenance lives in the results rows (docs/results.md), not in the pages: a token of 7 to
    40 hex digits with a digit and a letter in it reads as a commit (a file name's hash, after a
    hyphen or underscore, does not)."""
    found = [(n, m.group()) for n, line in enumerate(path.read_text().splitlines(), start=1)
             for m in HASH.finditer(line) if re.search(r"\d", m.group()) and re.search(r"[a-f]", m.group())]
    assert not found, f"{path.relative_to(ROOT)}: commit-like tokens {found}"


WORK_TRACKING = re.compile(r"\bissue \d+|\bitem \d+\b|\bthis stop\b|\bpeer \+ 1\b", re.IGNORECASE)


@pytest.mark.parametrize("path", PROSE, ids=[str(p.relative_to(ROOT)) for p in PROSE])
def test_the_pages_speak_to_users(path):
    found = [(n, m.group()) for n, line in enumerate(path.read_text().splitlines(), start=1)
             for m in WORK_TRACKING.finditer(line)]
    assert not found, f"{path.relative_to(ROOT)}: work-tracking words {found}"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    inside, out = False, set()
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif not inside and re.match(r"^#{1,6} ", line):
            out.add(slug(line.lstrip("#")))
    return out


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(path):
    broken = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
                broken.append((n, target))
    assert not broken, f"{path.relative_to(ROOT)}: links that resolve to nothing {broken}"


def test_results_page_is_not_stale():
    if str(ROOT / "benchmarks") not in sys.path:  # as `python benchmarks/results_page.py` has it: its _bench
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("results_page", ROOT / "benchmarks" / "results_page.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert GENERATED.read_text() == module.page(), \
        "docs/results.md is stale: run `python benchmarks/results_page.py` (make results-page)"
