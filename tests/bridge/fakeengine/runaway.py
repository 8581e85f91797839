"""Spawn descendants that ignore SIGTERM or left the session, record their pids, never finish."""

import signal
import subprocess
import sys
import time

from fakeengine.spawn import leave_descendants

signal.signal(signal.SIGTERM, signal.SIG_IGN)
pids = sys.argv[sys.argv.index("--pids") + 1]
if "--kid" in sys.argv:
    grandkid = subprocess.Popen(["sleep", "600"])
    with open(pids, "a") as f:
        f.write(f"{grandkid.pid}\n")
else:
    leave_descendants(pids)
    for _ in range(2):
        kid = subprocess.Popen([sys.executable, "-m", "fakeengine.runaway", "--kid",
                                "--pids", pids])
        with open(pids, "a") as f:
            f.write(f"{kid.pid}\n")
time.sleep(600)
