"""The import graph of medvlm's packages read from the source with ``ast``, every import counted (also those inside
functions, which import-linter counts too). Used by tests/test_architecture.py; run it directly for a report:
``python -m tests.import_graph``."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("medvlm", "prompts", "segmentation", "agents", "finetune", "eval")


@dataclass
class ImportGraph:
    modules: dict[str, Path]
    imports: dict[str, set[str]] = field(default_factory=dict)
    private: list[tuple[str, str, str]] = field(default_factory=list)

    @classmethod
    def from_tree(cls, root: Path) -> ImportGraph:
        modules: dict[str, Path] = {}
        for pkg in PACKAGES:
            for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
                parts = path.relative_to(root).with_suffix("").parts
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
        graph = cls(modules)
        for name, path in modules.items():
            graph._read(name, path)
        return graph

    def _read(self, name: str, path: Path) -> None:
        is_pkg = path.name == "__init__.py"
        out = self.imports.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in self.modules and a.name != name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_pkg else name.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in self.modules else base
                    if target not in self.modules or target == name:
                        continue
                    out.add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target == base:
                        self.private.append((name, base, alias.name))

    def edges(self) -> Iterator[tuple[str, str]]:
        for a, targets in sorted(self.imports.items()):
            for b in sorted(targets):
                yield a, b

    def private_imports(self) -> list[tuple[str, str, str]]:
        """``(importer, module, name)`` for every ``_private`` name imported from another module."""
        return sorted(self.private)

    def cycles(self) -> list[list[str]]:
        """Strongly connected groups of more than one module (Tarjan), each sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []
        counter = [0]

        def visit(v: str) -> None:
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on_stack.add(v)
            for w in self.imports.get(v, ()):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    found.append(sorted(group))

        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(self.modules)))
        for v in self.modules:
            if v not in index:
                visit(v)
        return sorted(found)


if __name__ == "__main__":
    g = ImportGraph.from_tree(Path(__file__).resolve().parents[1])
    print(f"{len(g.modules)} modules, {sum(len(v) for v in g.imports.values())} imports")
    print("cycles:", g.cycles() or "none")
    print("private names imported across modules:", g.private_imports() or "none")
