"""The repository's kernels/ folder is imported as ``entrgi_kernels``; a Python started in
the repository root (``python -m pytest``, a REPL) must still import Hugging Face's
``kernels``, which transformers >= 5.25 depends on and imports with its models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_repository_root_does_not_shadow_the_kernels_package():
    script = "import transformers.modeling_utils, entrgi_kernels.row_stats"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
