"""The docs keep up with the code: every error message a user can reach is in docs/troubleshooting.md, every
module in docs/layout.md, every docs page is linked from the README and every relative link resolves."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAISERS = {"FeatcacheError": 0, "DataError": 0, "BudgetError": 0, "BadImage": 0, "_fail": 2, "require": 3}  # callable -> position of the message argument


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
    section = (ROOT / "docs" / "troubleshooting.md").read_text().split("## Troubleshooting", 1)[1]
    found = messages()
    assert len(found) > 60  # the scan sees the messages at all
    missing = [f"{where}: {text!r}" for where, text in found if text not in section]
    assert not missing, "add these to docs/troubleshooting.md:\n" + "\n".join(missing)


def test_the_readmes_layout_names_every_module():
    """Each module of featcache/ is named in docs/layout.md's block, under its own package's entry."""
    text = (ROOT / "docs" / "layout.md").read_text()
    block = text.split("```")[1]
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
    assert not missing, f"docs/layout.md does not name: {missing}"


def test_every_docs_page_is_linked_from_the_readme_and_every_relative_link_resolves():
    readme = (ROOT / "README.md").read_text()
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages and all(f"](docs/{p.name})" in readme for p in pages), "a docs page the README does not link"
    broken = []
    for page in [ROOT / "README.md", *pages]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
    assert len(readme.splitlines()) < 150, "the README is the question and the first steps; the reference is docs/"
