"""Keep `# Copied from` code in sync across the self-contained architecture folders.

A definition (class or function) preceded by

    # Copied from hf_efficient.models.gmlp.modeling_gmlp.GMLPCache with GMLP->AFT, gmlp->aft

must equal the source definition after the replacements (applied in order). Whole files are copied too: every
`hf_efficient/models/<arch>/<name>.py` whose name is a file of `hf_efficient/models/shared/` (`state_cache.py`,
`common.py`) must equal that master byte for byte. Run from the repo root:

    python scripts/check_copies.py          # exit 1 and list the copies that drifted
    python scripts/check_copies.py --fix    # rewrite the copies from their sources
"""

import argparse
import ast
import importlib.util
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_efficient"
SHARED = PACKAGE / "models" / "shared"
MARKER = re.compile(r"^(?P<indent>\s*)# Copied from (?P<target>hf_efficient(?:\.\w+)+)(?: with (?P<subs>.+))?\s*$")


def definition_span(source: str, name: str) -> tuple[int, int]:
    """0-based [start, end) line span of a top-level `class name` / `def name` (decorators included)."""
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            return start, node.end_lineno
    raise KeyError(name)


def resolve(target: str) -> tuple[Path, str]:
    module, name = target.rsplit(".", 1)
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.is_file():
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(module)
        path = Path(spec.origin)
    return path, name


def apply_substitutions(code: str, subs: str | None) -> str:
    if not subs:
        return code
    for pair in subs.split(","):
        old, new = (part.strip() for part in pair.split("->"))
        code = code.replace(old, new)
    return code


def check_file(path: Path, fix: bool) -> list[str]:
    lines = path.read_text().splitlines(keepends=True)
    problems = []
    index = 0
    while index < len(lines):
        match = MARKER.match(lines[index])
        if not match or match.group("indent"):
            index += 1
            continue
        source_path, name = resolve(match.group("target"))
        source_text = source_path.read_text()
        start, end = definition_span(source_text, name)
        expected = apply_substitutions("".join(source_text.splitlines(keepends=True)[start:end]), match.group("subs"))
        # The copy is the definition that starts right after the marker.
        copy_name = apply_substitutions(name, match.group("subs"))
        try:
            copy_start, copy_end = definition_span("".join(lines), copy_name)
        except KeyError:
            problems.append(f"{os.path.relpath(path, ROOT)}:{index + 1}: no definition {copy_name!r} after the marker")
            index += 1
            continue
        if copy_start != index + 1:
            problems.append(f"{os.path.relpath(path, ROOT)}:{index + 1}: marker must directly precede {copy_name!r}")
            index += 1
            continue
        actual = "".join(lines[copy_start:copy_end])
        if actual != expected:
            problems.append(
                f"{os.path.relpath(path, ROOT)}:{copy_start + 1}: {copy_name} differs from {match.group('target')}"
            )
            if fix:
                lines[copy_start:copy_end] = expected.splitlines(keepends=True)
        index += 1
    if fix and problems:
        path.write_text("".join(lines))
    return problems


def check_whole_files(fix: bool, models: Path = PACKAGE / "models") -> tuple[int, list[str]]:
    """Compare every architecture folder's copy of a `models/shared/*.py` file with the master."""
    problems, count = [], 0
    shared = models / "shared"
    for master in sorted(shared.glob("*.py")):
        if master.name == "__init__.py":
            continue
        for copy in sorted(models.glob(f"*/{master.name}")):
            if copy.parent == shared:
                continue
            count += 1
            if copy.read_bytes() != master.read_bytes():
                problems.append(f"{os.path.relpath(copy, ROOT)}: differs from {os.path.relpath(master, ROOT)}")
                if fix:
                    copy.write_bytes(master.read_bytes())
    return count, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="rewrite drifted copies from their sources")
    args = parser.parse_args(argv)
    problems = []
    count = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        count += sum(1 for line in path.read_text().splitlines() if MARKER.match(line))
        problems += check_file(path, args.fix)
    whole_count, whole_problems = check_whole_files(args.fix)
    problems += whole_problems
    for problem in problems:
        print(problem)
    status = "fixed" if args.fix else "out of sync"
    print(
        f"check_copies: {count} marked copies and {whole_count} whole-file copies checked, {len(problems)} {status}."
    )
    return 1 if problems and not args.fix else 0


if __name__ == "__main__":
    sys.exit(main())
