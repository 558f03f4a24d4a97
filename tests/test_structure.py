"""The house rules, checked from the source: no module imports another's private names, the
package has no import cycle, and no module grows past 500 lines."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "tokendance_jax").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"),
                  *(ROOT / "benchmarks").glob("*.py")])
LIMIT = 500  # lines per module


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = list(rel.parts)
  if parts[0] == "kernels":  # installed as tokendance_jax.kernels
    parts = ["tokendance_jax", *parts]
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def imports(path: pathlib.Path):
  """(imported module, name or None) for every import in the file, at any depth."""
  mod = module_name(path)
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against this module's package
        pkg = mod.split(".")[:len(mod.split(".")) - node.level + (path.name == "__init__.py")]
        base = ".".join([*pkg, *([base] if base else [])])
      for alias in node.names:
        yield base, alias.name
    elif isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, None


def test_no_module_imports_another_modules_private_names():
  bad = []
  for path in SOURCES:
    for base, name in imports(path):
      if name and name.startswith("_") and not name.startswith("__") and base != module_name(path):
        bad.append(f"{path.relative_to(ROOT)}: from {base} import {name}")
  assert not bad, "\n".join(bad)


def test_the_package_has_no_import_cycle():
  modules = {module_name(p): p for p in SOURCES if module_name(p).startswith("tokendance_jax")}
  graph = {}
  for mod, path in modules.items():
    deps = set()
    for base, name in imports(path):
      for cand in (f"{base}.{name}" if name else None, base):
        if cand in modules and cand != mod:
          deps.add(cand)
          break
    graph[mod] = deps
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_modules_stay_under_500_lines():
  over = {}
  for path in SOURCES:
    n = len(path.read_text().splitlines())
    if n > LIMIT:
      over[str(path.relative_to(ROOT))] = n
  assert not over, f"modules over {LIMIT} lines (split them): {over}"
