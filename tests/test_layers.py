"""The layering of README's layout tour holds: every import between vdit's parts (a part is a
subpackage of vdit/ or a top-level module), including imports inside functions, points down the
layers or sideways to a part listed later in the same layer, so there are no cycles."""

from __future__ import annotations

import ast
import pathlib

VDIT = pathlib.Path(__file__).resolve().parent.parent / "vdit"

# Top to bottom. Within a layer a part may import the parts listed after it, never those before.
LAYERS = {
    "faces": ["__main__", "cli", "demo_distill", "demo", "serve", "serve_http", "serve_page", "serve_request",
              "sample_cli", "sample_flags", "cli_checks", "cli_errors"],
    "workflows": ["distill", "plan", "pipelines", "convert", "curate", "train", "eval"],
    "data": ["data"],
    "runs": ["runs"],
    "core": ["models", "diffusion", "parallel", "config"],
}
ORDER = [part for parts in LAYERS.values() for part in parts]


def _part(module: str) -> str | None:
    names = module.split(".")
    return names[1] if names[0] == "vdit" and len(names) > 1 else None


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    names = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def _imported(node, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against this module's package
        package = module.split(".")[: len(module.split(".")) - node.level + is_package]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{a.name}" for a in node.names] if base == "vdit" else [base]


def part_edges(root: pathlib.Path = VDIT) -> dict[tuple[str, str], list[str]]:
    """(from part, to part) -> ["file:line", ...] for every import between two parts."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        source = _part(module) or _part(module + ".x")
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(node, module, path.name == "__init__.py"):
                target = _part(name)
                if target and target != source:
                    where = f"{path.relative_to(root.parent)}:{node.lineno}"
                    edges.setdefault((source, target), []).append(where)
    return edges


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in VDIT.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__init__.py"}
    assert parts == set(ORDER), (
        f"parts missing from LAYERS: {sorted(parts - set(ORDER))}; "
        f"listed but gone: {sorted(set(ORDER) - parts)}")


def test_imports_point_down_the_layers():
    upward = {f"{a} -> {b}": where for (a, b), where in part_edges().items()
              if ORDER.index(a) > ORDER.index(b)}
    assert not upward, f"imports against the layering (README's layout tour): {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The scan counts imports inside functions and relative imports."""
    root = tmp_path / "vdit"
    (root / "models").mkdir(parents=True)
    (root / "models" / "__init__.py").write_text("")
    (root / "models" / "dit.py").write_text("def f():\n    from ..train import loop\n")
    assert part_edges(root) == {("models", "train"): ["vdit/models/dit.py:2"]}
