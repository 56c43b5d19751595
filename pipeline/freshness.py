"""What a stage's fingerprint covers, and why a built stage is stale.

A fingerprint hashes four parts: the stage's config sections, the content of its input
files, its parents' fingerprints, and the source of every project module the stage uses:
its own module and, followed through ``import`` statements (lazy ones inside functions
included), every ``pipeline``/``service`` module those import. Paths enter only as names
relative to the repository or to an input's folder, never absolute, so a second clone or a
container sees the same artifacts as built.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("pipeline", "service")


def _imported_names(path: Path, module_name: str, is_package: bool) -> list[str]:
    """Every module name an import statement in ``path`` may refer to (absolute form)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module_name.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # "from pkg import module"
    return [n for n in names if n.split(".")[0] in PROJECT_PACKAGES]


def _spec_path(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, AttributeError, ValueError):  # "pkg.module.function": not a module
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).resolve()


def code_files(module_name: str) -> dict[str, Path]:
    """{module name: file} for ``module_name`` and every project module it imports, transitively."""
    found: dict[str, Path] = {}
    todo = [module_name]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _spec_path(name)
        if path is None:
            continue
        found[name] = path
        todo += _imported_names(path, name, path.name == "__init__.py")
    return found


def relative_name(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.name


def code_digests(module_name: str) -> dict[str, str]:
    """{repository-relative file: sha256 of its content} for the code a stage runs."""
    return {relative_name(path): hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            for path in code_files(module_name).values()}


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_parts(config: dict, inputs: dict[str, str], parents: dict[str, str],
                      code: dict[str, str]) -> dict:
    """The recorded parts of a fingerprint; ``stale_reasons`` compares two of these."""
    return {"config": digest(config), "inputs": inputs, "parents": parents, "code": code}


def stale_reasons(recorded: dict | None, current: dict) -> list[str]:
    """Human-readable reasons why ``recorded`` parts differ from ``current`` ones."""
    if not recorded:
        return ["built by an older runner (no fingerprint parts recorded)"]
    reasons = []
    if recorded.get("config") != current["config"]:
        reasons.append("config changed")
    for kind in ("inputs", "parents", "code"):
        old, new = recorded.get(kind, {}), current[kind]
        label = {"inputs": "input", "parents": "parent", "code": "code"}[kind]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        reasons += [f"{label} {name} " + ("added" if name not in old else "removed" if name not in new
                                         else "changed") for name in changed]
    return reasons
