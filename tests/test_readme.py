"""The README's examples work as written, against a real local collector."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

README = pathlib.Path(__file__).resolve().parent.parent / "README.rst"


def python_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", text)
    return [textwrap.dedent(block) for block in blocks]


def test_readme_has_the_quickstart_and_serverless_examples():
    blocks = python_blocks()
    assert len(blocks) == 2
    assert "handle_invoice_paid" in blocks[0]
    assert "produl.flush(timeout=2.0)" in blocks[1]


def test_readme_examples_deliver_to_the_local_collector(produl_collector):
    quickstart, serverless = python_blocks()
    stripe_event = {
        "data": {
            "object": {
                "customer": "cus_abc123",
                "amount_paid": 4900,
                "currency": "usd",
                "lines": {"data": [{"plan": {"nickname": "pro"}}]},
            }
        }
    }
    script = "\n".join(
        [
            quickstart,
            f"handle_invoice_paid({stripe_event!r})",
            serverless,
            "print(handler({'plan': 'team', 'user_id': 'u_1'}, None))",
        ]
    )
    env = dict(
        os.environ,
        PRODUL_API_URL=produl_collector.url,
        PRODUL_SERVER_KEY=produl_collector.server_key,
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "{'ok': True}" in result.stdout
    events = produl_collector.wait_for(3, timeout=10)
    # The quickstart tracks its pageview when run, then the webhook fires.
    assert events[0]["t"] == "pv"
    assert events[0]["p"] == "/pricing"
    assert events[1] == {
        "t": "ev",
        "n": "invoice_paid",
        "vi": "cus_abc123",
        "pr": {"amount_cents": 4900, "currency": "usd", "plan": "pro"},
    }
    assert events[2]["n"] == "signup"
    assert events[2]["pr"] == {"plan": "team"}


def test_install_commands_work_from_a_clone():
    # Issue 23: "pip install produl-server" finds nothing until a release is
    # published; every install command in the README and the docs must work
    # from a clone.
    root = README.parent
    pages = [README, *sorted((root / "docs").rglob("*.rst"))]
    unpublished = re.compile(r"pip install\s+['\"]?produl-server")
    wrong = [
        f"{page.relative_to(root)}: {line.strip()}"
        for page in pages
        if page.name != "changelog.rst"
        for line in page.read_text(encoding="utf-8").splitlines()
        if unpublished.search(line)
    ]
    assert wrong == []
    assert "$ python -m pip install .\n" in README.read_text(encoding="utf-8")
