"""Test-only (tests/test_killed_jobs.py): hold one workflow job at a chosen point, so that the test can
SIGKILL it exactly there whatever the machine's load.

Active when this folder is first on PYTHONPATH (Python imports ``sitecustomize`` at start-up) and
``AAS_KILL_RULE`` names a rule, and only in that rule's Snakemake script job (the process running
``.snakemake/scripts/tmp<random>.<rule>.py``); every other process is left alone. Hold points:

- generate: right after the first image's maps are appended to the attention store: mid-shard, the
  store exists only under its temporary name and holds part of the shard, and no table is written;
- phrases, segment: while writing the output table: the whole file is written under its temporary name,
  then cut to half its size: a half-written file.

Holding = write ``"<pid> <temporary path>"`` to the file ``AAS_KILL_READY``, then sleep until killed.
"""

import os
import sys
import time


def _hold(temporary) -> None:
    ready = os.environ["AAS_KILL_READY"]
    with open(ready + ".part", "w") as stream:
        stream.write(f"{os.getpid()} {temporary}\n")
    os.replace(ready + ".part", ready)
    while True:
        time.sleep(60)


def _install(rule: str) -> None:
    if rule == "generate":
        from stages.io.attention import AttentionWriter

        append = AttentionWriter.append

        def append_then_hold(self, rows):
            offset = append(self, rows)
            _hold(self._tmp)
            return offset

        AttentionWriter.append = append_then_hold
    else:
        import pyarrow.parquet as pq

        write_table = pq.write_table

        def write_half_then_hold(table, where, *args, **kwargs):
            write_table(table, where, *args, **kwargs)
            os.truncate(where, os.path.getsize(where) // 2)
            _hold(where)

        pq.write_table = write_half_then_hold


_rule = os.environ.get("AAS_KILL_RULE")
_script = sys.argv[0] if sys.argv else ""
if _rule and os.path.basename(os.path.dirname(os.path.dirname(_script))) == ".snakemake" \
        and os.path.basename(_script).endswith(f".{_rule}.py"):
    _install(_rule)
