"""The linter's configuration (pyproject.toml: lines within 100 characters, pyflakes, pycodestyle)
holds for every Python file of the repository."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruff():
    beside_python = os.path.join(os.path.dirname(sys.executable), "ruff")
    return beside_python if os.path.exists(beside_python) else shutil.which("ruff")


@pytest.mark.skipif(ruff() is None,
                    reason="ruff is not installed (pip install -r requirements-dev.txt)")
def test_the_code_passes_the_linter():
    done = subprocess.run([ruff(), "check", "--output-format", "concise", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
