"""The code examples of README.md's "## Client side" section run, as written, against a real server.

The server serves the demo catalog (the README's ids come from it); CE_URL and CE_TOKEN (the demo org,
``images:write``) are set in the environment, as the section says. ``python`` blocks run as scripts, or,
when they define ``test_`` functions, as a test file in a pytest process with the plugin; ``sh`` blocks run
in bash with ``set -euo pipefail``, with the installed ``cluster-engine`` on PATH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_engine.cli.main import DEMO_ORG
from cluster_engine.testing import LiveServer

README = Path(__file__).parent.parent / "README.md"
SECTION = "## Client side"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def client_side_blocks() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    return [(match.group(1), match.group(2)) for match in FENCE.finditer(section)]


BLOCKS = client_side_blocks()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with LiveServer.start(tmp_path_factory.mktemp("readme"), args=["--demo"]) as server:
        yield {
            **server.env,
            "CE_URL": server.url,
            "CE_TOKEN": server.token(DEMO_ORG, scopes=["images:write"]),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }


def test_the_section_has_examples_of_each_kind() -> None:
    kinds = [kind for kind, _ in BLOCKS]
    assert kinds.count("python") >= 3 and "sh" in kinds
    assert any("def test_" in code for kind, code in BLOCKS if kind == "python")


@pytest.mark.parametrize(("kind", "code"), BLOCKS, ids=[f"{i}-{kind}" for i, (kind, _) in enumerate(BLOCKS)])
def test_example_runs(kind: str, code: str, env: dict[str, str], tmp_path: Path) -> None:
    if kind == "python" and "def test_" in code:
        (tmp_path / "test_readme_example.py").write_text(code, encoding="utf-8")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "cluster_engine", "-p", "no:cacheprovider"]
        run_env = {**env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    elif kind == "python":
        command, run_env = [sys.executable, "-c", code], env
    elif kind == "sh":
        command, run_env = ["bash", "-euo", "pipefail", "-c", code], env
    else:
        pytest.fail(f"no way to run a {kind!r} example")
    result = subprocess.run(command, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    if kind != "python" or "def test_" in code:
        return
    assert result.stdout, "the example prints what it shows"
