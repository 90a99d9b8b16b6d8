"""The README keeps up with the code: every error message a user can reach is in its troubleshooting
section, and every module is in its layout."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAISERS = {"FeatcacheError": 0, "BadImage": 0, "_fail": 2, "require": 3}  # callable -> position of the message argument


def literal_parts(node) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.BinOp):  # "..." + "..."
        return literal_parts(node.left) + literal_parts(node.right)
    return []


def messages():
    """(file:line, the longest literal piece) of every user-facing error message in featcache/."""
    found = []
    for path in sorted((ROOT / "featcache").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name not in RAISERS or len(node.args) <= RAISERS[name]:
                continue
            parts = [p.strip(" :;.,'\"") for p in literal_parts(node.args[RAISERS[name]])]
            parts = [p for p in parts if len(p) >= 6]
            if parts:
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", max(parts, key=len)))
    return found


def test_every_error_message_is_in_the_troubleshooting_section():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    found = messages()
    assert len(found) > 60  # the scan sees the messages at all
    missing = [f"{where}: {text!r}" for where, text in found if text not in section]
    assert not missing, "add these to README.md's troubleshooting section:\n" + "\n".join(missing)


def test_the_readmes_layout_names_every_module():
    """Each module of featcache/ is named in the README's Layout block, under its own package's entry."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):].split("```")[1]
    entries, current = {}, None
    for line in block.splitlines()[1:]:
        head = line[2:].split(" ", 1)[0] if line.startswith("  ") and not line.startswith("   ") else ""
        if head:
            current = head.rstrip("/")
        entries[current] = entries.get(current, "") + " " + line
    package = ROOT / "featcache"
    missing = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).parts
        if path.stem in ("__init__", "__main__"):
            continue
        if len(parts) == 1:
            if not any(path.name in words.split() for words in entries.values()):
                missing.append(path.name)
        elif not re.search(rf"\b{path.stem}\b", entries.get(parts[0], "")):
            missing.append("/".join(parts))
    assert not missing, f"README Layout does not name: {missing}"
