"""Named points where the fault catalogue's tests stop a run the hard way (tests/test_faults.py).

A run started with ABU_KILL_AT=<point>[:<n>] sends itself SIGKILL the n-th time (default the first) it passes
<point>: "loss-batch" (a batch of loss tracking done), "unlearning-step" (an unlearning step done) or
"wrote:<file name>" (an output file renamed into place). Without the variable a checkpoint is a dictionary
lookup; nothing else in the pipeline knows it exists. It lets the tests show that a kill -9 at any of these
points, then a rerun, leaves exactly the files of an uninterrupted run.
"""
import os
import signal
from collections import Counter

ENV = "ABU_KILL_AT"
_passed = Counter()


def checkpoint(point: str) -> None:
    target = os.environ.get(ENV)
    if not target:
        return
    name, _, nth = target.rpartition(":")
    if not nth.isdigit():  # no count given: the first time
        name, nth = target, "1"
    if name != point:
        return
    _passed[point] += 1
    if _passed[point] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
