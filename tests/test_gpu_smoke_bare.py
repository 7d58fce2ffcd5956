"""The GPU smoke test's bare path imports nothing of the cluster stack: it runs where Ray, vLLM and DeepSpeed are
not installed (scripts/gpu_smoke_bare.py; the whole path is run by `scripts/gpu_smoke.sh --bare --cpu`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bare_path_imports_without_ray_vllm_deepspeed():
    code = (
        "import sys\n"
        "for name in ('ray', 'vllm', 'deepspeed'):\n"
        "    sys.modules[name] = None  # an import of any of them raises ImportError, as where they are absent\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'scripts')!r}]\n"
        "import gpu_smoke, gpu_smoke_bare\n"
        "import actors.engines.transformers_engine, actors.sft.batches, actors.sft.worker\n"
        "import imm_ray.analysis, imm_ray.merge.engine, imm_ray.merge.plan, imm_ray.merge.tensors\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
