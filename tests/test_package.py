"""The package's face: plain modules, eager exports, `python -m fastvlm_mlx <command>`, the
installed console scripts, and imports that run one way."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fastvlm_mlx

PACKAGE = Path(fastvlm_mlx.__file__).parent
COMMANDS = ("generate", "chat", "server", "convert", "benchmark", "verify", "caption")


def test_submodules_are_modules_and_the_api_is_exported():
    import types

    import fastvlm_mlx.generate as g

    assert isinstance(g, types.ModuleType) and g.stream_generate is fastvlm_mlx.stream_generate
    assert callable(fastvlm_mlx.generate)  # fastvlm_mlx.generate(model, processor, ...)
    for name in fastvlm_mlx.__all__:
        assert getattr(fastvlm_mlx, name) is not None, name


def run(*args):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def test_python_m_fastvlm_mlx_dispatches_to_every_tool():
    p = run(sys.executable, "-m", "fastvlm_mlx", "--help")
    assert p.returncode == 0 and all(c in p.stdout for c in COMMANDS)
    bad = run(sys.executable, "-m", "fastvlm_mlx", "frobnicate")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error:")
    usage = run(sys.executable, "-m", "fastvlm_mlx", "generate", "--max-tokens", "many")
    assert usage.returncode == 2 and usage.stderr.startswith("error:") and "Traceback" not in usage.stderr
    assert usage.stderr.count("\n") == 1  # one line, no argparse usage block


@pytest.mark.parametrize("command", COMMANDS)
def test_every_console_script_shows_its_help(command):
    p = run(str(Path(sys.executable).with_name(f"fastvlm-{command}")), "--help")
    assert p.returncode == 0, p.stderr
    assert f"usage: fastvlm-{command}" in p.stdout and p.stderr == "", p.stderr


def package_imports():
    """module -> the package modules it imports (from .x / from fastvlm_mlx.x), at any depth."""
    graph = {}
    for f in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps.update(a.name for a in node.names)
                elif node.module and node.module.startswith("fastvlm_mlx."):
                    deps.add(node.module.split(".")[1])
        graph[f.stem] = deps - {f.stem}
    return graph


def test_package_imports_have_no_cycle():
    graph = package_imports()
    # __init__ and __main__ sit on top; everything else must form a DAG.
    graph = {m: d - {"__init__"} for m, d in graph.items() if m not in ("__init__", "__main__")}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
