"""The package's shape, as docs/design.md states it: short modules, no import circles, Airflow only in
operators/ and hooks/, no torch or transformers at module top, and every job parameter reaching both
interfaces from airflow_hfllm/config.py."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from airflow_hfllm.cli import build_parser
from airflow_hfllm.config import CONFIGS
from airflow_hfllm.options import KINDS, options

PACKAGE = Path(__file__).resolve().parents[2] / "airflow_hfllm"
MODULES = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in PACKAGE.rglob("*.py")}


def top_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (module level, outside ``if TYPE_CHECKING``)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_module_is_long():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 420}
    assert not long


def test_no_import_circles():
    graph = {name: {m for m in top_imports(p) if m in MODULES and m != name} for name, p in MODULES.items()}

    def visit(name, stack):
        assert name not in stack, f"import circle: {' -> '.join([*stack, name])}"
        for dep in graph[name]:
            visit(dep, [*stack, name])

    for name in graph:
        visit(name, [])


def test_airflow_only_in_operators_and_hooks_and_no_torch_at_module_top():
    for name, path in MODULES.items():
        imported = {m.split(".")[0] for m in top_imports(path)}
        assert not imported & {"torch", "transformers"}, name
        if not name.startswith(("airflow_hfllm.operators", "airflow_hfllm.hooks")):
            assert "airflow" not in imported, name


@pytest.mark.parametrize("kind", KINDS)
def test_every_job_parameter_reaches_the_operator_and_the_cli(kind):
    """A new field in config.py is a new operator argument and CLI option, with nothing else written."""
    from airflow_hfllm.operators.text import HFTextGenerateOperator
    from airflow_hfllm.operators.vision import HFVisionGenerateOperator

    operator = {"text": HFTextGenerateOperator, "vision": HFVisionGenerateOperator}[kind]
    signature = inspect.signature(operator.__init__).parameters
    command = build_parser()._subparsers._group_actions[0].choices[kind]
    flags = {flag for action in command._actions for flag in action.option_strings}
    for cls in CONFIGS:
        for opt in options(cls, kind):
            if opt.operator:
                assert opt.operator in signature and opt.operator in operator.__doc__, opt.name
                default = signature[opt.operator].default
                assert default is inspect.Parameter.empty or default == opt.default_for(kind), opt.name
            if opt.cli:
                assert opt.cli in flags, opt.name
                if opt.default is not dataclasses.MISSING:
                    assert command.get_default(opt.name) in (opt.default_for(kind), []), opt.name


def test_a_subclass_of_an_operator_keeps_its_own_template_fields():
    from airflow_hfllm.operators.text import HFTextGenerateOperator

    class Tagged(HFTextGenerateOperator):
        """Adds a tag."""

        template_fields = (*HFTextGenerateOperator.template_fields, "tag")

        def __init__(self, *, tag: str = "", **kwargs):
            super().__init__(**kwargs)
            self.tag = tag

    assert Tagged.template_fields[-1] == "tag" and "temperature" in Tagged.template_fields
    assert Tagged.__doc__ == "Adds a tag."
    task = Tagged(task_id="t", input_path="in", output_path="out", base_model="m", tag="x", temperature="0.3")
    assert (task.tag, task.temperature, task.chunk_rows) == ("x", "0.3", 1000)
