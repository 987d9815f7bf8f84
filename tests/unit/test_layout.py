"""The package's shape: no import cycles, stages import nothing from driver/ops/table, every
third-party import declared, and every knob offered once with help (CLI) and documented
(README)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

from embedjob import cli
from embedjob.config import EmbedConfig

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "embedjob"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = REPO / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the embedjob modules it imports (module level and inside functions; imports
    under ``if TYPE_CHECKING`` are not run and not counted)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        edges: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("embedjob")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("embedjob"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if _is_module(sub) else node.module)
        graph[name] = {e for e in edges if e != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "embedjob.driver.pipeline" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_stages_import_nothing_from_driver_ops_or_table() -> None:
    forbidden = ("embedjob.driver", "embedjob.ops", "embedjob.table", "embedjob.cli",
                 "embedjob.bench")
    bad = {name: sorted(e for e in edges if e.startswith(forbidden))
           for name, edges in import_graph().items() if name.startswith("embedjob.stages")}
    assert {k: v for k, v in bad.items() if v} == {}


def _third_party_imports() -> set[str]:
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    import sys

    return {m for m in found if m not in sys.stdlib_module_names and m != "embedjob"}


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for extra in project["optional-dependencies"].values()
                                       for d in extra]
    return {re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


# imported only inside try/except ImportError, for an optional speed-up or a better message
OPTIONAL_IMPORTS = {"flash_attn", "httpx"}


def test_every_third_party_import_is_declared_in_pyproject() -> None:
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for module in _third_party_imports() - OPTIONAL_IMPORTS:
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(names)
    assert missing == {}


def test_every_embed_option_has_a_flag_with_help_and_a_readme_row() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = cli.commands()
    for name, command in table.items():
        for cls in command.options:
            for f in cli.options_of(cls, name):
                assert f.metadata.get("help"), f"{name}: field {f.name} has no help"
    for f in dataclasses.fields(EmbedConfig):
        flag = cli.flag_of(f)
        assert f.metadata["commands"], f.name
        assert re.search(rf"^\| `{re.escape(flag)}`", readme, re.M), \
            f"README has no Options row for {flag}"


def test_each_subcommand_offers_only_the_options_it_uses() -> None:
    def flags(command: str) -> set[str]:
        sub = cli.parser()._subparsers._group_actions[0].choices[command]  # noqa: SLF001
        return {s for a in sub._actions for s in a.option_strings}  # noqa: SLF001

    assert "--output" not in flags("plan") and "--mode" not in flags("refresh")
    assert "--keep-deleted" in flags("refresh") and "--keep-deleted" not in flags("embed")
    assert "--sample-rows" in flags("plan") and "--sample-rows" not in flags("embed")
    assert {"--dims", "--input", "--storage-option"} <= flags("plan")


def test_abbreviated_flags_are_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["embed", "--dim", "64", "--input", "a.parquet", "--output", "o.lance"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --dim" in capsys.readouterr().err
