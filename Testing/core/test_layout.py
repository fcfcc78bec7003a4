"""Size limits that keep the package's folders readable: no file over 400 lines, no class over 150 lines, no
function over 60 lines (end_lineno - lineno + 1, docstrings included) in LungSegCore/lungseg, LungSegExtension and
scripts, and no line over 120 characters there (ruff's line length).

A unit that is longer on purpose says why in a comment line starting with `# size:` directly above its `def` or
`class` (or above its decorators), or, for a file, within its first 5 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("LungSegCore/lungseg", "LungSegExtension", "scripts")
FILE_LINES, CLASS_LINES, FUNCTION_LINES, LINE_CHARS = 400, 150, 60, 120
MARK = "# size:"


def python_files() -> list[Path]:
    return sorted(path for folder in FOLDERS for path in (REPO / folder).rglob("*.py"))


def marked(lines: list[str], lineno: int) -> bool:
    """A comment block directly above line `lineno` (1-based) that starts with a `# size:` line."""
    index = lineno - 2
    while index >= 0 and lines[index].strip().startswith("#"):
        if lines[index].strip().startswith(MARK):
            return True
        index -= 1
    return False


def size_violations(text: str, name: str = "<text>") -> list[str]:
    """Each file, class and function of `text` over its limit without a `# size:` comment."""
    lines = text.splitlines()
    found = []
    if len(lines) > FILE_LINES and not any(line.strip().startswith(MARK) for line in lines[:5]):
        found.append(f"{name}: {len(lines)} lines (file limit {FILE_LINES})")
    for node in ast.walk(ast.parse(text, name)):
        if isinstance(node, ast.ClassDef):
            limit, kind = CLASS_LINES, "class"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            limit, kind = FUNCTION_LINES, "function"
        else:
            continue
        length = node.end_lineno - node.lineno + 1
        head = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if length > limit and not (marked(lines, head) or marked(lines, node.lineno)):
            found.append(f"{name}:{node.lineno}: {kind} {node.name} has {length} lines (limit {limit})")
    return found


def test_files_classes_and_functions_stay_within_their_size_or_say_why():
    found = [
        v for path in python_files() for v in size_violations(path.read_text("utf-8"), str(path.relative_to(REPO)))
    ]
    assert not found, "over the size limits without a `# size:` comment:\n" + "\n".join(found)


def test_the_size_check_finds_a_long_function_and_accepts_a_commented_one():
    body = "".join(f"    x{i} = {i}\n" for i in range(FUNCTION_LINES))
    assert size_violations(f"def long():\n{body}") == ["<text>:1: function long has 61 lines (limit 60)"]
    assert size_violations(f"# size: a table\ndef long():\n{body}") == []
    assert size_violations(f"def short():\n{body[: -len(body.splitlines()[-1]) - 1]}") == []


def test_no_line_is_longer_than_120_characters():
    found = [
        f"{path.relative_to(REPO)}:{number}: {len(line)} characters"
        for path in python_files()
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1)
        if len(line) > LINE_CHARS
    ]
    assert not found, f"lines over {LINE_CHARS} characters:\n" + "\n".join(found)
