"""Count logical lines of lorakit: every source line that holds code, not blank, not a comment, not a docstring.

    python tools/loc.py            # core / app / total, per file with --files
    python tools/loc.py --root .venv/lib/python3.11/site-packages/peft --files   # another package, same rules

"Core" is the library: ``src/lorakit`` minus the app (``src/lorakit/app``). A line counts once however many
statements it holds; a statement spanning several lines counts each of its non-blank code lines.
"""

from __future__ import annotations

import argparse
import ast
import io
import pathlib
import sys
import tokenize

ROOT = pathlib.Path(__file__).resolve().parent.parent / "src" / "lorakit"
APP = "app"

# The core's concerns, by file (ARCHITECTURE.md's layout); ``--groups`` prints their sizes.
GROUPS = {
    "pipeline": ["plan", "apply", "targeting", "ties", "token_plan", "replication", "adapter_rules"],
    "layer and kinds": ["layer", "kinds", "kinds_builtin", "kinds_mha", "kinds_param", "ops", "dropout",
                        "saved_modules", "trainable_tokens"],
    "inits": ["init_registry", "inits", "calibrate", "corda", "loraga", "loftq"],
    "variants": ["variants/"],
    "quantized bases": ["quant", "quant_backends", "quant_gptq", "quant_hqq", "quant_torchao", "kbit", "nf4"],
    "files (codec, io)": ["codec", "io", "atomic", "convert", "load_options", "hub", "model_card", "sharded_save",
                          "save_checks"],
    "model API": ["__init__", "__main__", "config", "tuner", "model", "combine", "functional", "status", "hotswap",
                  "intruders", "merge_check", "training_checks", "errors", "version"],
    "runtime": ["distributed", "precision", "compiling"],
    "integrations": ["integrations/"],
}


def group(name: str) -> str:
    stem = name[:-3] if name.endswith(".py") else name
    for label, members in GROUPS.items():
        if any(stem == m or (m.endswith("/") and stem.startswith(m)) for m in members):
            return label
    return "other"


def docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers covered by module, class and function docstrings."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    return lines


def logical_lines(source: str) -> int:
    """Lines carrying at least one code token that is not part of a docstring."""
    skip = docstring_lines(ast.parse(source))
    code: set[int] = set()
    ignored = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
               tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in ignored:
            continue
        code.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in skip)
    return len(code)


def part(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    return "app" if path.relative_to(root).parts[0] == APP else "core"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", action="store_true", help="print every file's count")
    parser.add_argument("--groups", action="store_true", help="print the core's count per concern (GROUPS)")
    parser.add_argument("--root", type=pathlib.Path, default=ROOT, help="the package to count (default: lorakit)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    totals: dict[str, list[int]] = {"core": [0, 0], "app": [0, 0]}
    rows = []
    for path in sorted(root.rglob("*.py")):
        n, where = logical_lines(path.read_text()), part(path, root)
        totals[where][0] += n
        totals[where][1] += 1
        rows.append((n, str(path.relative_to(root)), where))
    if args.files:
        for n, name, where in sorted(rows, reverse=True):
            print(f"{n:6d}  {where:4s}  {name}")
    if args.groups:
        sizes: dict[str, int] = {}
        for n, name, where in rows:
            if where == "core":
                sizes[group(name)] = sizes.get(group(name), 0) + n
        for label, n in sorted(sizes.items(), key=lambda item: -item[1]):
            print(f"{n:6d}  {label}")
    for where, (n, files) in totals.items():
        print(f"{where}: {n} logical lines in {files} files")
    print(f"total: {sum(t[0] for t in totals.values())} logical lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
