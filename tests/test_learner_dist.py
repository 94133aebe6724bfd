"""The learner's process group on the CPU: DeepSpeed's JIT shared-memory all-reduce kernel is never built (it took
a minute of compiling in every fresh DeepSpeed process, and the patch that skipped it missed: `import
deepspeed.comm.torch as m` binds the torch package)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import torch, learner.dist as d
d.init_distributed(torch.device("cpu"))
import deepspeed.comm.comm as c
print("shm op:", c.cdb.shm_comm_op)
"""


def test_cpu_process_group_skips_deepspeeds_shm_kernel():
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "shm op: None" in p.stdout and "built successfully" not in p.stdout + p.stderr
