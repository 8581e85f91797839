"""Leave descendants behind the way real code can: a plain child, one in a new session
(setsid), one in a new process group (setpgid), and a daemon that forked twice (its parents are
gone, so it is nobody's descendant). Each pid goes to `pids_file` once it runs."""

import os
import subprocess
import sys
import time

DAEMON = """
import os, sys, time
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(600)
"""


def leave_descendants(pids_file: str) -> None:
    kids = [subprocess.Popen(["sleep", "600"]),
            subprocess.Popen(["sleep", "600"], start_new_session=True),
            subprocess.Popen(["sleep", "600"], preexec_fn=os.setpgrp)]
    with open(pids_file, "a") as f:
        f.write("".join(f"{k.pid}\n" for k in kids))
    before = _count(pids_file)
    subprocess.run([sys.executable, "-c", DAEMON, pids_file], check=True)
    while _count(pids_file) == before:  # the daemon writes its own pid
        time.sleep(0.01)


def _count(path: str) -> int:
    with open(path) as f:
        return len(f.read().split())
