"""Run many conversion commands in ONE process (Megatron-Core is imported once, not per command).

Usage: ``python conversion_driver.py JOBS.json RESULTS.json``. Each job is either
``{"cli": "hf_to_megatron" | "megatron_to_hf", "args": [...]}``, run through the command's own
``main(argv)`` (argument parsing, one-line errors, exit status), or
``{"truncate_shard": [SRC, DST]}``, which copies the checkpoint SRC to DST and cuts its first
``.distcp`` file in half. RESULTS.json receives, per job, ``{"rc": int, "stderr": str}``.
"""

import contextlib
import importlib
import io
import json
import shutil
import sys
from pathlib import Path


def run_job(job: dict) -> dict:
    if "truncate_shard" in job:
        src, dst = map(Path, job["truncate_shard"])
        shutil.copytree(src, dst)
        shard = sorted((dst / "model").glob("*.distcp"))[0]
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
        return {"rc": 0, "stderr": ""}
    module = importlib.import_module(f"checkpoints_conversion.{job['cli']}")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            rc = module.main(job["args"])
        except SystemExit as e:  # argparse
            rc = e.code
    return {"rc": rc, "stderr": stderr.getvalue()}


if __name__ == "__main__":  # dist_checkpointing's writer re-imports the entry script
    jobs = json.loads(Path(sys.argv[1]).read_text())
    results = [run_job(job) for job in jobs]
    Path(sys.argv[2]).write_text(json.dumps(results))
