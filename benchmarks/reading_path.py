"""How much code a reader goes through to learn an algorithm: its file plus the top-level
definitions of common.py it uses, directly or through each other (running.py, the machinery
around the method, is not on the reading path).

Code lines are the lines that hold a Python token other than a comment: blank lines, comment
lines and docstrings (a module's, a function's or class's, and the string under each Args
field) are not counted. A definition of common.py counts whole when the algorithm file names
it (`common.X`) or a counted definition does.

    python benchmarks/reading_path.py            # gorl_fm.py
    python benchmarks/reading_path.py gorl_diffusion ppo
"""

from __future__ import annotations

import ast
import io
import os
import sys
import tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_lines(source: str) -> set[int]:
    """Numbers of the lines of `source` that hold code (not blank, comment or docstring)."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            strings = node.body[:1] if not isinstance(node, ast.ClassDef) else node.body
            for st in strings:  # a class body: every bare string (the dataclass fields' docstrings)
                if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str):
                    docstrings.update(range(st.lineno, st.end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines - docstrings


def definitions(tree: ast.Module) -> dict[str, ast.AST]:
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, ast.Assign):
            found.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = node
    return found


def reading_path(algo: str, shared: str = "common") -> tuple[int, int, list[str]]:
    """(code lines of algo.py, code lines of the definitions of shared.py it uses, their names)."""
    algo_source = open(os.path.join(REPO, f"{algo}.py")).read()
    shared_source = open(os.path.join(REPO, f"{shared}.py")).read()
    defs = definitions(ast.parse(shared_source))
    used = {n.attr for n in ast.walk(ast.parse(algo_source))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == shared} & set(defs)
    todo = list(used)
    while todo:
        for n in ast.walk(defs[todo.pop()]):
            if isinstance(n, ast.Name) and n.id in defs and n.id not in used:
                used.add(n.id)
                todo.append(n.id)
    shared_lines = code_lines(shared_source)
    counted = set()
    for name in used:
        node = defs[name]
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        counted |= {line for line in shared_lines if start <= line <= node.end_lineno}
    return len(code_lines(algo_source)), len(counted), sorted(used)


if __name__ == "__main__":
    for algo in sys.argv[1:] or ["gorl_fm"]:
        own, shared, names = reading_path(algo)
        print(f"{algo}.py {own} + common.py {shared} ({len(names)} definitions) = {own + shared} code lines")
