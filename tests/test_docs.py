"""README.md and docs/*.md: every relative link and image resolves, and every command they show is
one the project's scripts accept, so a renamed flag or a moved page breaks the suite and not a
reader.

A command is a line of a ``` block that runs one of the repository's own .py files (with python,
under torchrun, or directly). Its arguments go through that script's `parse_args(argv)`:
argparse-level checks only, so placeholders such as MODEL.pt and DIR are fine. Flags written in
inline code (`--flag value`) must be flags of one of the scripts. New pages under docs/ are picked
up on their own.
"""
import contextlib
import functools
import glob
import importlib
import io
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pages():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def page_id(path):
    return os.path.relpath(path, ROOT)


# --------------------------------------------------------------------------------------------------
# Reading a Markdown page: prose lines, code blocks, headings.

def split_page(text):
    """(prose, blocks): the page with its ``` blocks blanked out (line numbers kept), and each block
    that may hold commands as (line number of its first line, its lines); a ```text block (a file
    tree, a log) holds none."""
    prose, blocks, block, is_text = [], [], None, False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            if block is None:
                block, is_text = (number + 1, []), line.strip() == "```text"
            else:
                if not is_text:
                    blocks.append(block)
                block = None
            prose.append("")
        elif block is not None:
            block[1].append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


INLINE_CODE = re.compile(r"`([^`\n]+)`")


def github_slug(heading):
    """The anchor GitHub gives a heading: its rendered text, lower case, without punctuation, spaces
    as '-'."""
    text = INLINE_CODE.sub(r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text):
    """Every heading anchor of a page; a repeated heading gets -1, -2, ... as on GitHub."""
    prose, _ = split_page(text)
    seen, found = {}, set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M):
        slug = github_slug(match.group(1))
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


# --------------------------------------------------------------------------------------------------
# Links.

# [text](target "title")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.I)
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)  # [name]: target
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def link_errors(path, root=ROOT):
    """One line per relative link or image of the page that does not resolve inside the repository
    `root`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    prose, _ = split_page(text)
    prose = INLINE_CODE.sub("", prose)
    targets = [m.group(1) for pattern in (LINK, HTML_LINK, REFERENCE)
               for m in pattern.finditer(prose)]
    errors = []
    for target in targets:
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path),
                                                 file_part)) if file_part else path
        if os.path.commonpath([resolved, root]) != root:
            errors.append(f"{target}: points outside the repository")
        elif not os.path.exists(resolved):
            errors.append(f"{target}: no such file")
        elif anchor and resolved.endswith(".md"):
            with open(resolved, encoding="utf-8") as f:
                if anchor not in anchors(f.read()):
                    errors.append(f"{target}: no heading with anchor #{anchor} in "
                                  f"{os.path.relpath(resolved, ROOT)}")
    return errors


# --------------------------------------------------------------------------------------------------
# Commands.

OTHER_PROGRAMS_FLAGS = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank",
                        "--master_addr",
                        "--master_port"}  # torchrun's, which the docs name in prose
LOOP = re.compile(r"^for\s+(\w+)\s+in\s+(.+?)\s*;\s*do$")
ENV_ASSIGNMENT = re.compile(r"^\w+=\S*$")
CONTROL_OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTION = re.compile(r"^\d?(>>?|<)(&\d)?$")  # >, >>, 2>, <, 2>&1 (a target follows unless &N)


def logical_lines(lines, first_number):
    """(line number, line) with backslash continuations joined."""
    pending, start = "", None
    for number, line in enumerate(lines, start=first_number):
        start = start or number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending, start = "", None
    if pending:
        yield start, pending


def simple_commands(tokens):
    """The tokens of each command of a shell line (a && b | c ...), without its redirections."""
    commands, current, tokens = [], [], iter(tokens)
    for token in tokens:
        if token in CONTROL_OPERATORS:
            commands.append(current)
            current = []
        elif REDIRECTION.match(token):
            if not token.endswith(("&1", "&2")):
                next(tokens, None)  # the file it redirects to
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def script_call(tokens):
    """(script path relative to the repository, argv) if the tokens run one of its .py files, else
    None."""
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]  # OMP_NUM_THREADS=1 python ...
    if not tokens:
        return None
    program = os.path.basename(tokens[0])
    if program.endswith(".py"):
        script_at = 0
    elif program.startswith("python"):
        options = [i for i, t in enumerate(tokens[1:], start=1) if not t.startswith("-")]
        if "-m" in tokens[1:2] or not options:
            return None  # python -m pytest ..., python -c ...
        script_at = options[0]
    elif program == "torchrun":
        script_at = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        if script_at is None:
            return None
    else:
        return None
    return tokens[script_at], tokens[script_at + 1:]


def doc_commands(path):
    """(line number, command text, script, argv) for every command of the page's ``` blocks that
    runs one of the repository's scripts; a `for VAR in a b; do ... done` loop gives one command per
    value."""
    with open(path, encoding="utf-8") as f:
        _, blocks = split_page(f.read())
    commands = []
    for first_number, lines in blocks:
        loop_values = {}
        for number, line in logical_lines(lines, first_number):
            line = line.strip()
            loop = LOOP.match(line)
            if loop:
                loop_values[loop.group(1)] = loop.group(2).split()
                continue
            if line == "done":
                loop_values.clear()
                continue
            if ".py" not in line:
                continue
            variants = [line]
            for name, values in loop_values.items():
                pattern = re.compile(r"\$(?:\{%s\}|%s\b)" % (name, name))
                variants = [pattern.sub(value, v) for v in variants for value in values]
            for command in variants:
                calls = map(script_call, simple_commands(shlex.split(command, comments=True)))
                commands += [(number, command, *call) for call in calls if call]
    return commands


def load_script(script):
    """The module of a repository script given by its path (train_wrn_ebm.py,
    scripts/noise_folder.py, ...)."""
    module_name = os.path.normpath(script)[:-len(".py")].replace(os.sep, ".")
    return importlib.import_module(module_name)


def command_error(script, argv):
    """Why the script's own parser rejects argv (argparse's message, or a flag that is only an
    abbreviation of one, which argparse lets through), or None when it accepts it."""
    if not os.path.isfile(os.path.join(ROOT, script)):
        return f"{script}: no such script in the repository"
    module = load_script(script)
    if not hasattr(module, "parse_args"):
        return f"{script} has no parse_args(argv) to check its command lines with"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            module.parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):  # 0: --help
            return stderr.getvalue().strip().splitlines()[-1]
    inexact = [arg for arg in argv
               if arg.startswith("--") and arg.split("=")[0] not in script_flags(script)]
    if not inexact:
        return None
    return f"{script}: not its flags, only abbreviations of them: {' '.join(inexact)}"


@functools.lru_cache(maxsize=None)
def script_flags(script):
    """Every --flag a script accepts, read from its --help."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit):
        load_script(script).parse_args(["--help"])
    return set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", stdout.getvalue()))


def entry_scripts():
    scripts = sorted(glob.glob(os.path.join(ROOT, "*.py"))
                     + glob.glob(os.path.join(ROOT, "scripts", "*.py")))
    scripts = [os.path.relpath(s, ROOT) for s in scripts]
    return [s for s in scripts if hasattr(load_script(s), "parse_args")]


def inline_flags(path):
    """(line number, flag) for every --flag written in inline code outside ``` blocks."""
    with open(path, encoding="utf-8") as f:
        prose, _ = split_page(f.read())
    return [(number, flag) for number, line in enumerate(prose.splitlines(), start=1)
            for span in INLINE_CODE.findall(line)
            for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", span)]


# --------------------------------------------------------------------------------------------------
# The tests.

ALL_COMMANDS = [(page, *command) for page in pages() for command in doc_commands(page)]


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_every_relative_link_and_image_resolves(page):
    assert link_errors(page) == []


@pytest.mark.parametrize("page, number, command, script, argv", ALL_COMMANDS,
                         ids=[f"{page_id(c[0])}:{c[1]}" for c in ALL_COMMANDS])
def test_every_command_shown_is_accepted_by_its_script(page, number, command, script, argv):
    error = command_error(script, argv)
    assert error is None, f"{page_id(page)}:{number}: {command}\n{error}"


def test_every_flag_in_inline_code_is_a_flag_of_a_script():
    """A flag renamed in a script and left in the prose fails here; a flag of another program
    (torchrun, the paper's scripts) belongs in OTHER_PROGRAMS_FLAGS or outside backticks."""
    known = set().union(OTHER_PROGRAMS_FLAGS, *(script_flags(s) for s in entry_scripts()))
    unknown = [f"{page_id(page)}:{number}: {flag}" for page in pages()
               for number, flag in inline_flags(page) if flag not in known]

    assert unknown == []


def test_the_docs_show_the_entry_scripts():
    """The extraction finds commands at all: the README shows training and evaluation, docs the
    rest."""
    shown = {script for *_, script, _ in ALL_COMMANDS}
    assert {"train_wrn_ebm.py", "eval_wrn_ebm.py", "bench.py", "scripts/plot_attack.py",
            "scripts/small_scale_study.py"} <= shown


def test_the_checks_catch_a_renamed_flag_a_missing_page_and_a_wrong_anchor(tmp_path):
    """The checks themselves, on a page written to fail them."""
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n[fine](#a-page) [gone](missing.md) [bad anchor](#no-such-heading) "
        "![img](../nowhere.png)\n\n"
        "```\n"
        "OMP_NUM_THREADS=1 python train_wrn_ebm.py --depth 10 \\\n    --n_sgld_steps 5   # a "
        "renamed flag\n"
        "for r in 0 1; do\n  python eval_wrn_ebm.py --load_path M.pt --n_steps_refine $r\ndone\n"
        "torchrun --standalone --nproc_per_node=2 train_wrn_ebm.py --width 1\n"
        "python -m pytest -q tests/test_docs.py && python bench.py --iters 3 > bench.txt 2>&1\n"
        "```\n")
    errors = link_errors(str(page), root=str(tmp_path))
    assert [e.split(": ")[0] for e in errors] == ["missing.md", "#no-such-heading",
                                                   "../nowhere.png"]


    commands = doc_commands(str(page))
    assert [(number, script, argv) for number, _, script, argv in commands] == [
        (6, "train_wrn_ebm.py", ["--depth", "10", "--n_sgld_steps", "5"]),
        (9, "eval_wrn_ebm.py", ["--load_path", "M.pt", "--n_steps_refine", "0"]),
        (9, "eval_wrn_ebm.py", ["--load_path", "M.pt", "--n_steps_refine", "1"]),
        (11, "train_wrn_ebm.py", ["--width", "1"]),
        (12, "bench.py", ["--iters", "3"]),
    ]
    assert "unrecognized arguments: --n_sgld_steps 5" in command_error("train_wrn_ebm.py",
                                                                       commands[0][3])
    assert [command_error(script, argv) for _, _, script, argv in commands[1:]] == [None] * 4
    assert "unrecognized arguments: --n_step 5" in command_error("train_wrn_ebm.py",
                                                                 ["--n_step", "5"])
    assert "no such script" in command_error("no_such_script.py", [])
