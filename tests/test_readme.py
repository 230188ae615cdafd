"""The README's promises that code can check: its Python API example runs as printed."""
import re
import subprocess
import sys
from pathlib import Path

from test_cli import REPO, cli_env


def test_python_api_example_runs_as_printed(tmp_path):
    readme = Path(REPO, "README.md").read_text()
    [example] = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    run = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=str(tmp_path),
                         env=cli_env({"XDG_CACHE_HOME": str(tmp_path)}), timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), "the example prints the generated text"
