"""The documentation stays true to the code.

- every "RECIPE section N" (or "N.M", or "sections 3 and 6") in the code and docs names a real heading of RECIPE.md;
- nothing in the repository points at material a reader does not have (outside folders, tracker numbers);
- every command line documented in README.md and in the scripts' docstrings parses with that script's real parser,
  so renaming or removing a flag without updating the docs fails here;
- every top-level script is at most 600 lines (one job per file).
"""
import ast
import contextlib
import importlib
import io
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Scripts whose module docstrings document command lines (those that do not exist yet are skipped).
DOCSTRING_SCRIPTS = ("train.py", "data.py", "sample.py", "bench.py", "model.py", "mixing.py", "toydata.py")


def repo_files():
    """Paths (relative to the root) of the files git tracks or would track (untracked but not ignored);
    every file under the root when git is not available (e.g. an unpacked archive)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        paths = [Path(line) for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        paths = [p.relative_to(ROOT) for p in ROOT.rglob("*") if ".git" not in p.parts]
    return sorted({p for p in paths if (ROOT / p).is_file()})


def doc_files(with_ci=False):
    """Root *.py and *.md, tests/*.py, and optionally .ci/run."""
    for p in repo_files():
        if len(p.parts) == 1 and p.suffix in (".py", ".md"):
            yield p
        elif len(p.parts) == 2 and p.parts[0] == "tests" and p.suffix == ".py":
            yield p
        elif with_ci and p.as_posix() == ".ci/run":
            yield p


def read(rel):
    return (ROOT / rel).read_text(encoding="utf-8", errors="replace")


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


# -------------------------------------------------------------------------------------------------
# 1. RECIPE references

# "RECIPE section 4", "RECIPE section 4.2", "RECIPE sections 3 and 6", "RECIPE.md sections 2, 4 and 5"; the words
# may be split over lines, also across comment markers ("# RECIPE section\n# 5").
_NUM = r"\d+(?:\.\d+)?"
RECIPE_REF = re.compile(r"\bRECIPE(?:\.md)?[\s#*]+sections?[\s#*]+(" + _NUM
                        + r"(?:(?:[\s#*]*,[\s#*]*|[\s#*]+(?:and|&)[\s#*]+)" + _NUM + r")*)")
RECIPE_HEADING = re.compile(r"^#{2,}\s+(\d+(?:\.\d+)*)\.?(?=\s)", re.M)


def recipe_sections():
    return set(RECIPE_HEADING.findall(read("RECIPE.md")))


def test_recipe_references_resolve():
    assert (ROOT / "RECIPE.md").is_file(), "RECIPE.md is missing"
    sections = recipe_sections()
    assert sections, "RECIPE.md has no numbered headings ('## N. Title', '### N.M Title')"
    unresolved, n_refs = [], 0
    for rel in doc_files():
        if rel.as_posix() == "RECIPE.md":
            continue
        text = read(rel)
        for m in RECIPE_REF.finditer(text):
            for num in re.findall(_NUM, m.group(1)):
                n_refs += 1
                if num not in sections:
                    unresolved.append(f"{rel}:{line_of(text, m.start())}: RECIPE section {num}")
    assert not unresolved, (f"{len(unresolved)} reference(s) to no heading of RECIPE.md (headings: "
                            f"{', '.join(sorted(sections, key=lambda s: [int(x) for x in s.split('.')]))}):\n"
                            + "\n".join(unresolved))
    assert n_refs, "no 'RECIPE section N' reference found at all: is the pattern still right?"


# -------------------------------------------------------------------------------------------------
# 2. Nothing that points outside the repository

# Built by concatenation so that this file does not match its own check.
FORBIDDEN_STRINGS = ("sha" + "red/", "../" + "shared")
FORBIDDEN_PATTERNS = re.compile(
    r"\bissues?(?:\s*#\s*|\s+|/)\d+"  # a tracker number after the word, or an issues URL
    r"|\(#\d+\)"                      # a bare tracker number in parentheses
    r"|\bPR\s*#\s*\d+", re.I)


def test_no_outside_references():
    found = []
    for rel in doc_files(with_ci=True):
        for i, line in enumerate(read(rel).splitlines(), 1):
            hits = [s for s in FORBIDDEN_STRINGS if s in line] + [m.group(0) for m in FORBIDDEN_PATTERNS.finditer(line)]
            if hits:
                found.append(f"{rel}:{i}: {', '.join(repr(h) for h in hits)}: {line.strip()[:140]}")
    assert not found, ("references to material a reader of the repository does not have (cite RECIPE.md, the "
                       "paper or the official scripts instead):\n" + "\n".join(found))


# -------------------------------------------------------------------------------------------------
# 3. Documented command lines parse

# Values for shell placeholders that the documentation never assigns ($NODE_RANK, $MASTER_ADDR, ...).
PLACEHOLDERS = {"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "0",
                "LOCAL_RANK": "0", "WORLD_SIZE": "1", "NNODES": "1", "NPROC": "1"}
DUMMY = "1"  # any other unassigned variable: a value that is a valid int, float and path
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&"}


def readme_code_blocks(text):
    """Fenced blocks (not ```python ones) and indented blocks (4+ spaces after a blank line or a heading), as
    [(first line number, [lines])]."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence:
            marker, lang, start, body = fence.group(1), fence.group(2).lower(), i + 2, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(marker):
                body.append(lines[i])
                i += 1
            if lang not in ("python", "py", "pycon"):
                blocks.append((start, body))
        elif line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()
                                                             or lines[i - 1].startswith("#")):
            start, body = i + 1, []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                body.append(lines[i])
                i += 1
            blocks.append((start, body))
            continue
        i += 1
    return blocks


def docstring_code_blocks(source):
    """Runs of indented (4+ spaces) lines of a module docstring, as [(line number, [lines])]."""
    tree = ast.parse(source)
    doc = ast.get_docstring(tree, clean=True)
    if not doc:
        return []
    first = tree.body[0].lineno  # approximate line numbers: backslash-newlines in the source are folded
    blocks = []
    for n, line in enumerate(doc.splitlines()):
        if not line.startswith("    "):
            continue
        if blocks and blocks[-1][0] + len(blocks[-1][1]) == first + 1 + n:
            blocks[-1][1].append(line)
        else:
            blocks.append((first + 1 + n, [line]))
    return blocks


def logical_lines(blocks):
    """Join backslash continuations: [(line number, line)]."""
    out = []
    for start, body in blocks:
        pending, pending_no = "", None
        for n, line in enumerate(body):
            if pending_no is None:
                pending_no = start + n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append((pending_no, pending + line))
            pending, pending_no = "", None
        if pending:
            out.append((pending_no, pending))
    return out


def strip_comment(line):
    """Drop a shell comment: a '#' that starts a word outside quotes (an apostrophe in a comment is no quote)."""
    quote, prev = None, " "
    for k, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"" and prev != "\\":
            quote = ch
        elif ch == "#" and prev.isspace():
            return line[:k]
        prev = ch
    return line


def tokenize(line):
    lexer = shlex.shlex(strip_comment(line), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, ""
    return list(lexer)


def commands_in(blocks):
    """[(line number, script, argv)] of `python SCRIPT.py ...` / `torchrun ... SCRIPT.py ...` lines, with shell
    variables expanded (assignments made earlier in the same document, for-loop variables, placeholders)."""
    variables, found = {}, []
    for no, line in logical_lines(blocks):
        line = re.sub(r"^\s*\$\s+", "", line).strip()  # a "$ " prompt
        if not line:
            continue
        loop = re.match(r"^for\s+(\w+)\s+in\s+(\S+)", line)
        if loop:
            variables[loop.group(1)] = loop.group(2).rstrip(";")
            continue
        assign = re.match(r"^([A-Za-z_]\w*)=", line)
        if assign and len(tokenize(line)) == 1:  # VAR=value or VAR="a b c" alone: an assignment, not an env prefix
            variables[assign.group(1)] = tokenize(line)[0].split("=", 1)[1]
            continue
        line = re.sub(r"\$\{?([A-Za-z_]\w*)\}?",
                      lambda m: variables.get(m.group(1), PLACEHOLDERS.get(m.group(1), DUMMY)), line)
        line = re.sub(r"\[(\s*-[^\[\]]*)\]", r"\1", line)  # "[--json]": an optional flag, checked too
        tokens = [t for t in tokenize(line) if t not in ("...", "\u2026")]
        command = []
        for tok in tokens + [";"]:
            if tok not in SHELL_SEPARATORS:
                command.append(tok)
                continue
            while command and (re.match(r"^[A-Za-z_]\w*=", command[0]) or command[0] in ("time", "env", "do")):
                command.pop(0)  # OMP_NUM_THREADS=1, `time`, `do` of a loop body on the same line
            if len(command) >= 2 and command[0] in ("python", "python3") and re.fullmatch(r"[\w.-]+\.py", command[1]):
                found.append((no, command[1], command[2:]))
            elif command and command[0] == "torchrun":
                scripts = [k for k, t in enumerate(command) if t.endswith(".py")]
                if scripts and re.fullmatch(r"[\w.-]+\.py", command[scripts[0]]):
                    found.append((no, command[scripts[0]], command[scripts[0] + 1:]))
            command = []
    return found


def documented_commands():
    """[(where, script, argv)] from README.md code blocks and the DOCSTRING_SCRIPTS' module docstrings."""
    out = []
    if (ROOT / "README.md").is_file():
        out += [(f"README.md:{no}", s, argv) for no, s, argv in commands_in(readme_code_blocks(read("README.md")))]
    for script in DOCSTRING_SCRIPTS:
        if (ROOT / script).is_file():
            out += [(f"{script}:{no} (docstring)", s, argv)
                    for no, s, argv in commands_in(docstring_code_blocks(read(script)))]
    return out


def parse_with(module, argv):
    """None if `module.parse_args(argv)` accepts argv, else argparse's message. Only SystemExit(2) (unknown flag,
    bad choice, missing required argument, bad type) is a rejection; any other exception means the flags were
    accepted and a later check objected (e.g. a file that does not exist here)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            module.parse_args(list(argv))
    except SystemExit as e:
        if e.code == 2:
            return err.getvalue().strip() or "SystemExit(2)"
    except Exception:  # noqa: BLE001 - syntax accepted, the values are not checked here
        pass
    return None


def test_documented_commands_parse():
    commands = documented_commands()
    assert commands, "no documented `python SCRIPT.py` / `torchrun ... SCRIPT.py` command found"
    failures, modules = [], {}
    for where, script, argv in commands:
        if not (ROOT / script).is_file():
            continue  # documented ahead of the script (not written yet)
        if script not in modules:
            try:
                modules[script] = importlib.import_module(script[:-3])
            except Exception as e:  # noqa: BLE001
                modules[script] = f"cannot be imported: {type(e).__name__}: {e}"
            else:
                if not callable(getattr(modules[script], "parse_args", None)):
                    modules[script] = "has no parse_args(argv)"
        module = modules[script]
        command = f"python {script} {shlex.join(argv)}".rstrip()
        if isinstance(module, str):
            failures.append(f"{where}: {script} {module}\n    {command}")
            continue
        message = parse_with(module, argv)
        if message is not None:
            failures.append(f"{where}: {command}\n    " + message.replace("\n", "\n    "))
    assert not failures, (f"{len(failures)} of {len(commands)} documented command(s) do not parse:\n"
                          + "\n".join(failures))


def test_command_extraction():
    """The extractor itself: continuations, prompts, comments, env prefixes, variables, optional flags, pipes."""
    readme = "\n".join([
        "```bash",
        "$ OMP_NUM_THREADS=1 python train.py --size toy \\",
        "    --max-steps 10   # a comment",
        'ARGS="--stage sft --lr 1e-3"',
        "torchrun --nnodes 2 --node-rank $NODE_RANK train.py $ARGS --out-dir out/$name ...",
        "python data.py mix [--json] && python -m pytest -q",
        "pip install -r requirements.txt",
        "```",
        "",
        "    for run in a b; do",
        "      python sample.py --ckpt out/$run",
        "    done",
        "```python",
        "print('python train.py --not-a-command')",
        "```",
    ])
    got = [(s, argv) for _, s, argv in commands_in(readme_code_blocks(readme))]
    assert got == [("train.py", ["--size", "toy", "--max-steps", "10"]),
                   ("train.py", ["--stage", "sft", "--lr", "1e-3", "--out-dir", "out/1"]),
                   ("data.py", ["mix", "--json"]),
                   ("sample.py", ["--ckpt", "out/a"])], got


def test_every_script_fits_one_job():
    """A top-level file past ~600 lines is doing two jobs (the house rule): split it by job instead."""
    long = {p.name: n for p in ROOT.glob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"over 600 lines: {long}"
