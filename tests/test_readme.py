"""The README's quick start must run as written."""

from __future__ import annotations

import re

from conftest import ROOT


def test_readme_quick_start_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python block"
    exec(compile(blocks[0], "README.md:quick-start", "exec"), {})
