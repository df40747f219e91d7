"""The package's layout rules: no import cycles, the core never imports the offline tools,
function-local imports only where a comment says why, and the wheel's package list matches
the tree (configs/ ships as sora_jax.configs)."""

import ast
import os
import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ROOT / "sora_jax"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in CORE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: pathlib.Path):
    """(imported module names, line, column) of every import statement, nested ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield [a.name for a in node.names], node.lineno, node.col_offset
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # "from pkg import mod" imports pkg.mod when it is a module
            yield [node.module] + [f"{node.module}.{a.name}" for a in node.names], node.lineno, node.col_offset


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name):  # the sora_jax module a dotted name lives in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for names, _, _ in _imports(path):
            graph[m] |= {owner(n) for n in names if n.startswith("sora_jax")} - {m, ""}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_sora_jax():
    graph = _graph()
    assert len(graph) > 50  # the walk saw the package
    assert _cycles(graph) == []


# The layers, low to high (README "Layout"); a module imports only from its own layer or below.
LAYERS = {
    "sora_jax": 0, "sora_jax.errors": 0, "sora_jax.io": 0, "sora_jax.config": 0, "sora_jax.configs": 0,
    "sora_jax.parallel": 0, "sora_jax.data": 1, "sora_jax.evaluation": 2, "sora_jax.models": 3,
    "sora_jax.diffusion": 4, "sora_jax.train": 5, "sora_jax.inference": 6, "sora_jax.interop": 6,
    "sora_jax.config_validation": 7, "sora_jax.stages": 7, "sora_jax.sweeps": 7, "sora_jax.cli": 8,
}


def _layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return LAYERS[module]


def test_imports_point_down_the_layers():
    upward = [f"{m} -> {t}" for m, targets in _graph().items() for t in targets
              if t != "sora_jax" and _layer(t) > _layer(m)]
    assert upward == []
    assert _layer("sora_jax.models.factory") == 3 and _layer("sora_jax.train.run_folder") == 5


def test_core_never_imports_the_offline_tools():
    offenders = [(str(p.relative_to(ROOT)), line) for p in _modules().values()
                 for names, line, _ in _imports(p) if any(n.split(".")[0] == "data_pipelines" for n in names)]
    assert offenders == []


def test_function_local_imports_say_why():
    """A function-local import of the project is allowed where the lines just above it say it
    buys import speed (or must wait for jax.distributed)."""
    unexplained = []
    for path in _modules().values():
        lines = path.read_text().splitlines()
        for names, line, col in _imports(path):
            if col == 0 or not any(n.startswith("sora_jax") for n in names):
                continue
            i = line - 2  # the line above, 0-based: skip up over the import block to its comment
            while i >= 0 and lines[i].strip().startswith(("from ", "import ", ")")) or (
                    i >= 0 and not lines[i].strip()):
                i -= 1
            comment = []
            while i >= 0 and lines[i].strip().startswith("#"):
                comment.append(lines[i].lower())
                i -= 1
            if "import speed" not in " ".join(comment):
                unexplained.append(f"{path.relative_to(ROOT)}:{line}")
    assert unexplained == []


def test_wheel_packages_match_the_tree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in CORE.rglob("__init__.py")}
    on_disk |= {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "data_pipelines").rglob("__init__.py")}
    on_disk.add("sora_jax.configs")
    assert listed == on_disk
    assert setuptools["package-dir"] == {"sora_jax.configs": "configs"}
    assert not (CORE / "configs").exists()  # one copy of the configs: the top-level folder


def test_packaged_configs_are_the_repo_configs_folder():
    from sora_jax import config as config_lib
    from sora_jax import configs

    assert pathlib.Path(configs.__file__).parent == ROOT / "configs"
    path, arg = config_lib.resolve_config_path("dit_ladder:XL")
    assert pathlib.Path(path) == ROOT / "configs" / "dit_ladder.py" and arg == "XL"
    by_name = config_lib.load_config("tiny")
    by_path = config_lib.load_config(str(ROOT / "configs" / "tiny.py"))
    assert config_lib.to_json(by_name) == config_lib.to_json(by_path)
    with pytest.raises(config_lib.ConfigError, match="packaged config: .*quickstart"):
        config_lib.load_config("no_such_config")


def test_a_copied_config_loads_outside_the_repo(tmp_path):
    """Configs import their siblings as sora_jax.configs.*, so a copy anywhere loads the same."""
    from sora_jax import config as config_lib

    copy = tmp_path / "elsewhere" / "mine.py"
    copy.parent.mkdir()
    copy.write_text((ROOT / "configs" / "tiny.py").read_text())
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        cfg = config_lib.load_config(str(copy))
    finally:
        os.chdir(cwd)
    assert cfg.name == "tiny"
