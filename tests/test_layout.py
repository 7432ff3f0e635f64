"""The sender's shape, as issue #19 set it: small modules, small classes, one-way imports."""

from __future__ import annotations

import ast
import pathlib

import pytest

import produl_server

PACKAGE = pathlib.Path(produl_server.__file__).resolve().parent

#: The modules that take an event from ``put`` to its end.
SENDER = [
    "_worker",
    "_inbox",
    "_sender",
    "_inline",
    "_lanes",
    "_mailbox",
    "_accounts",
    "_reports",
    "_schedule",
    "_quota",
    "_outbox",
    "_wiring",
]


def tree(name: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{name}.py").read_text())


def own_attributes(cls: ast.ClassDef) -> set[str]:
    """The ``self.x`` a class assigns anywhere in its body."""
    found = set()
    for node in ast.walk(cls):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            for part in ast.walk(target):
                if (
                    isinstance(part, ast.Attribute)
                    and isinstance(part.value, ast.Name)
                    and part.value.id == "self"
                ):
                    found.add(part.attr)
    return found


@pytest.mark.parametrize("name", SENDER)
def test_no_sender_module_passes_350_lines(name):
    lines = (PACKAGE / f"{name}.py").read_text().count("\n")
    assert lines <= 350, f"{name}.py has {lines} lines"


@pytest.mark.parametrize("name", SENDER)
def test_no_sender_class_holds_more_than_12_attributes(name):
    for node in tree(name).body:
        if isinstance(node, ast.ClassDef):
            attributes = own_attributes(node)
            assert len(attributes) <= 12, (name, node.name, sorted(attributes))


def imported(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_collector_does_not_import_the_sdks_redis_link():
    for path in (PACKAGE / "collector").glob("*.py"):
        assert "produl_server._redis" not in imported(path), path.name


def test_the_demo_starts_the_collector_without_the_test_helpers():
    names = imported(PACKAGE / "_demo.py")
    assert "produl_server.testing" not in names
    assert "produl_server.collector" in names


def test_the_worker_does_not_reach_into_the_queue_or_build_its_wiring():
    source = (PACKAGE / "_worker.py").read_text()
    assert ".queue.queue" not in source
    assert "isinstance(" not in source
    assert "open_fleet" not in source
    assert "make_quota" not in source
