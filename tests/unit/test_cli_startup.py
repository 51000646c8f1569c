"""The command line starts without torch: `tunelab --help`, a usage error or a bad recipe answer at once."""

import subprocess
import sys


def test_the_cli_imports_no_torch_until_a_command_needs_it():
    code = "import sys, tunelab.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
