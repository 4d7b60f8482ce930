"""Every ```python block of the README and the docs runs as a user would run
it: a fresh interpreter, the block as a script (blocks that need several
devices set XLA_FLAGS themselves, as they show)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/api.md", "docs/chip-targets.md", "docs/examples.md")


def _blocks():
    for doc in DOCS:
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = f.read()
        for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)):
            yield pytest.param(block, id=f"{doc}#{i}")


SNIPPETS = list(_blocks())


def test_the_docs_have_python_blocks():
    assert len(SNIPPETS) >= 8


# Lines `print(...)  # <text>` whose comment is exactly what the print writes:
# tuples of integers, integers, dtype names and booleans only, e.g.
# `# (2, 16, 256) bfloat16` (a comment in words describes, and is not read).
_TOKEN = r"(?:\([\d, ]*\)|\d+|True|False|u?int\d+|b?float\d+\w*)"
PRINTED = re.compile(rf"^print\(.*\)\s+# ({_TOKEN}(?: {_TOKEN})*)$")


@pytest.mark.slow
@pytest.mark.parametrize("block", SNIPPETS)
def test_doc_snippet_runs(block):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", block],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    for line in block.splitlines():
        match = PRINTED.match(line.strip())
        if match:
            assert match.group(1) in out.stdout, (line, out.stdout)
