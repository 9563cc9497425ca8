"""The documentation stays true: every ``python``/``torchrun``/``make`` command in README.md and docs/*.md names a
script or target that exists and only flags its parser accepts, and every figure or page the text links exists.

Commands are read from ```bash blocks (line continuations joined, ``NAME="..."`` assignments expanded, comments
dropped) and from inline code that starts like a command. Blocks that show another project's commands (DINO's,
run in its own clone) are fenced as ```text and not checked.
"""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED_BASH = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
COMMAND_START = re.compile(r"^(\.venv/bin/)?(python3?|torchrun) |^make ")
ASSIGNMENT = re.compile(r"^([A-Z_]+)=(.*)$", re.S)
# torchrun's own options that take a value (the script follows them).
TORCHRUN_VALUED = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port", "--max_restarts",
                   "--rdzv_backend", "--rdzv_id", "--rdzv_endpoint", "--shutdown_timeout"}


def block_commands(block: str) -> list[str]:
    """The command lines of a bash block: continuations joined, ``NAME="..."`` set and expanded, comments cut."""
    variables, commands = {}, []
    for line in block.replace("\\\n", " ").splitlines():
        for name in sorted(variables, key=len, reverse=True):
            line = line.replace(f"${name}", variables[name])
        words = shlex.split(line, comments=True)
        if len(words) == 1 and (assignment := ASSIGNMENT.match(words[0])):
            variables[assignment[1]] = assignment[2]
        elif words:
            commands.append(shlex.join(words))
    return commands


def documented_commands() -> list[tuple[str, str, bool]]:
    """``(page, command, whole)`` for every python, torchrun and make command of the pages; ``whole``: from a bash
    block (a command to run as written), not a fragment quoted in the prose."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in FENCED_BASH.findall(text):
            found += [(page.name, command, True) for line in block_commands(block) for command in re.split(
                r" '?(?:&&|;|\|)'? ", line)]
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        found += [(page.name, span.strip(), False) for span in INLINE_CODE.findall(prose)
                  if COMMAND_START.match(span) and (".py" in span or span.startswith("make "))]
    return [entry for entry in found if COMMAND_START.match(re.sub(r"^(\S+=\S+ )+", "", entry[1]))
            and not re.match(r"(\.venv/bin/)?python3? -m (pytest|venv)\b", entry[1])]


def script_and_arguments(words: list[str]) -> tuple[str, list[str]]:
    """The script a python or torchrun command runs, and the arguments it passes to it."""
    words = words[1:]
    if words[:2] == ["-m", "torch.distributed.launch"]:
        words = words[2:]
    while words and words[0].startswith("-") and not words[0].endswith(".py"):
        option = words.pop(0)
        if option in TORCHRUN_VALUED:
            words.pop(0)
    return words[0], words[1:]


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_-]+):", (ROOT / "Makefile").read_text(), re.M))


COMMANDS = documented_commands()


def test_the_pages_hold_commands_to_check():
    assert len(COMMANDS) > 40 and any(command.startswith("torchrun") for _, command, whole in COMMANDS if whole)


@pytest.mark.parametrize("page, command, whole", COMMANDS, ids=[f"{page}:{command[:60]}" for page, command, _ in COMMANDS])
def test_every_documented_command_is_accepted_by_its_script(page, command, whole):
    words = shlex.split(re.sub(r"^(\S+=\S+ )+", "", command))
    if words[0] == "make":
        unknown = [word for word in words[1:] if "=" not in word and word not in make_targets()]
        assert not unknown, f"{page}: `{command}` names no Makefile target {unknown}"
        return
    script, arguments = script_and_arguments(words)
    assert (ROOT / script).is_file(), f"{page}: `{command}` runs {script}, which is not in the repository"
    parsed = check_flags(page, command, script, arguments, whole)
    if script == "compare.py" and whole:  # the arguments it passes on to the scripts it runs
        for option, target in NESTED_ARGUMENTS.items():
            for value in getattr(parsed, option) or []:
                check_flags(page, command, target, shlex.split(value.partition("=")[2] if option == "variant"
                                                                else value), whole=False)


# compare.py's options that carry another script's arguments.
NESTED_ARGUMENTS = {"train_args": "patch_wise_dino.py", "variant": "patch_wise_dino.py",
                    "correspondence_args": "eval_correspondence.py", "segmentation_args": "eval_segmentation.py"}


def check_flags(page: str, command: str, script: str, arguments: list[str], whole: bool):
    """Every ``--flag`` of ``arguments`` is one of ``script``'s options; a ``whole`` command parses as written
    (its parsed arguments are returned, with list-valued options as lists)."""
    parser = importlib.import_module(Path(script).stem).get_args_parser()
    flags = [word.split("=")[0] for word in arguments if re.fullmatch(r"--[\w-]+(=.*)?", word)]
    unknown = [flag for flag in flags if flag not in parser._option_string_actions]
    assert not unknown, f"{page}: {script} has no option {unknown} (in `{command}`)"
    if not whole:
        return None
    try:
        parsed = parser.parse_args(arguments)
    except SystemExit as exit:
        assert exit.code == 0, f"{page}: {script} refuses the arguments of `{command}` (its error is above)"
        return None
    for option in NESTED_ARGUMENTS:
        if isinstance(getattr(parsed, option, None), str):
            setattr(parsed, option, [getattr(parsed, option)])
    return parsed


def linked_paths() -> list[tuple[Path, str]]:
    """``(page, target)`` of every relative link and image of the pages (web addresses left out)."""
    return [(page, target) for page in PAGES for target in LINK.findall(page.read_text())
            if not re.match(r"[a-z]+:", target)]


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCED_BASH.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page, target", linked_paths(), ids=lambda value: str(value)[-50:])
def test_every_linked_figure_page_and_heading_exists(page, target):
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), f"{page.name} links {target}, which does not exist"
    if anchor and linked.suffix == ".md":
        assert anchor in heading_anchors(linked), f"{page.name} links {target}: no such heading in {linked.name}"


def test_the_checks_catch_an_unknown_flag_a_bad_value_a_missing_script_and_a_broken_link(tmp_path):
    block = 'B="python eval_knn.py --nb_knn"\n$B 10 \\\n    --data_path d --no_such_flag 1   # a comment\nmake demo && make nope\n'
    commands = block_commands(block)
    assert commands == ["python eval_knn.py --nb_knn 10 --data_path d --no_such_flag 1", "make demo '&&' make nope"]
    with pytest.raises(AssertionError, match=r"has no option \['--no_such_flag'\]"):
        test_every_documented_command_is_accepted_by_its_script("page", commands[0], True)
    with pytest.raises(AssertionError, match="refuses the arguments"):
        test_every_documented_command_is_accepted_by_its_script("page", "python eval_knn.py --nb_knn ten", True)
    with pytest.raises(AssertionError, match="which is not in the repository"):
        test_every_documented_command_is_accepted_by_its_script("page", "python main_dino.py --arch vit_small", False)
    with pytest.raises(AssertionError, match=r"names no Makefile target \['nope'\]"):
        test_every_documented_command_is_accepted_by_its_script("page", "make nope", True)
    with pytest.raises(AssertionError, match="patch_wise_dino.py has no option"):
        test_every_documented_command_is_accepted_by_its_script(
            "page", "python compare.py --data_path d --train_args '--epochs 1 --not_a_training_flag 2'", True)
    page = tmp_path / "page.md"
    page.write_text("# A heading\n\n![figure](missing.png) [here](page.md#a-heading) [there](page.md#nowhere)\n")
    with pytest.raises(AssertionError, match="links missing.png, which does not exist"):
        test_every_linked_figure_page_and_heading_exists(page, "missing.png")
    test_every_linked_figure_page_and_heading_exists(page, "page.md#a-heading")
    with pytest.raises(AssertionError, match="no such heading"):
        test_every_linked_figure_page_and_heading_exists(page, "page.md#nowhere")
