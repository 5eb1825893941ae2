"""The README and docs/ stay usable: every relative link resolves (anchors too) and every command
shown in a ```bash block parses: our own CLI through its argparse parsers, the rest with `bash -n`.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from internlm2_graph import cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "benchmarks").rglob("README.md"), *(ROOT / "docs").rglob("*.md")]
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
OUR_CLI = ("internlm2-graph", "python -m internlm2_graph")


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # code is not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if (
            not resolved.exists()
            or anchor
            and resolved.suffix == ".md"
            and anchor not in anchors(resolved)
        ):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, `&&` chains split."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";", "|"):
                if command:
                    out.append(shlex.join(command))
                command = []
            else:
                command.append(word)
    return out


def parse_ours(words: list[str]) -> None:
    """What `internlm2-graph WORDS` would parse, without running anything."""
    subcommand = words[0] if words and words[0] in cli.SUBCOMMANDS else None
    parser = cli.PARSERS[subcommand or "build"]()
    parser.parse_args(words[1:] if subcommand else words)


def check_command(command: str) -> None:
    words = shlex.split(command)
    for prefix in OUR_CLI:
        head = prefix.split()
        if words[: len(head)] == head:
            parse_ours(words[len(head) :])
            return
    if words[:2] == ["python", "-m"] or words[:2] == ["python3", "-m"]:
        module = words[2]
        if module.split(".")[0] in ("benchmarks", "internlm2_graph"):
            assert importlib.util.find_spec(module) is not None, f"no module {module}"
        if module == "benchmarks":
            from benchmarks import harness
            from benchmarks.__main__ import build_parser
            from benchmarks.suites import SUITES

            args = build_parser().parse_args(words[3:])
            if args.command == "run":  # the suites, the study and its settings exist
                names = args.suites.split(",")
                assert set(names) <= set(SUITES), f"unknown suite in {names}"
                harness.modules(names, dict(p.split("=", 1) for p in args.param))


def bash_blocks() -> list[tuple[str, str]]:
    return [
        (f"{page.relative_to(ROOT)}#{n}", block)
        for page in PAGES
        for n, block in enumerate(BLOCK.findall(page.read_text()))
    ]


@pytest.mark.parametrize(("where", "block"), bash_blocks(), ids=[w for w, _ in bash_blocks()])
def test_bash_blocks_parse(where, block):
    assert shutil.which("bash"), "bash is needed to check the shell blocks"
    syntax = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
    assert syntax.returncode == 0, f"{where}: {syntax.stderr}"
    for command in commands(block):
        try:
            check_command(command)
        except SystemExit as err:
            pytest.fail(f"{where}: `{command}` does not parse ({err})")


def test_checks_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [bad](missing.md) [anchor](#nowhere)\n")
    assert relative_links(page) == ["#title", "missing.md", "#nowhere"]
    assert anchors(page) == {"title"}
    with pytest.raises(SystemExit):
        parse_ours(["-i", "ckpt", "-p", "int3"])
    with pytest.raises(SystemExit):
        parse_ours(["chat", "model", "--no-such-flag"])
    assert commands("a && b # c\nd \\\n  e") == ["a", "b", "d e"]
    with pytest.raises(SystemExit):
        check_command("python -m benchmarks run quality --param study=nope")
    with pytest.raises(SystemExit):
        check_command("python -m benchmarks run decode --param study=long_context lenghts=1")


def test_first_commands_are_the_two_fresh_machine_commands():
    """The README opens with the main job and the tests; .ci/run runs the second exactly."""
    blocks = BLOCK.findall((ROOT / "README.md").read_text())
    assert "python -m internlm2_graph -i ckpt" in blocks[0]
    ci = (ROOT / ".ci" / "run").read_text().replace("pip install -q ", "pip install ")
    assert blocks[1].strip() in ci


def test_lab_notes_are_dated_and_frozen():
    """A lab note is a dated record: its name starts with the date, it says it is frozen, and
    the index lists it (new findings go into a new note, not into an old one)."""
    folder = ROOT / "docs" / "lab-notes"
    notes = sorted(p for p in folder.glob("*.md") if p.name != "README.md")
    index = (folder / "README.md").read_text()
    assert notes
    for note in notes:
        assert re.match(r"\d{4}-\d{2}-\d{2}-[\w-]+\.md$", note.name), note.name
        assert "Never rewritten" in note.read_text(), note.name
        assert f"]({note.name})" in index, f"{note.name} is not in lab-notes/README.md"
