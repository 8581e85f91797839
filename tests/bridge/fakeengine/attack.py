"""A request's own code turned against the runner (it runs by design): each attack leaves what it
got in {out}/loot.json, so a test can check that nothing of the runner's came out."""

import argparse
import json
import os
import pathlib
import signal
import subprocess
import time

from fakeengine.spawn import leave_descendants


def ancestors() -> list[int]:
    pids, pid = [], os.getppid()
    while pid > 1:
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    return pids


def read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16).decode("utf-8", "replace")
    except OSError as exc:
        return f"denied: {exc.strerror}"


def environ(a, out):
    """The runner's credentials, through /proc of every ancestor."""
    return {pid: read(f"/proc/{pid}/environ") for pid in ancestors()}


def reach(a, out):
    """Find the bus and the runner's mirror, then write to them."""
    loot = {f".git/{n}": read(f".git/{n}") for n in ("config", "FETCH_HEAD")}
    argvs = [read(f"/proc/{pid}/cmdline").split("\0") for pid in ancestors()]
    remotes = {v[v.index("--remote") + 1] for v in argvs if "--remote" in v}
    works = {v[v.index("--work") + 1] for v in argvs if "--work" in v}
    for remote in sorted(remotes):
        forged = subprocess.run(["git", "-c", "user.name=x", "-c", "user.email=x@x", "commit-tree",
                                 "-m", "forged", "HEAD^{tree}"],
                                capture_output=True, text=True).stdout.strip()
        for spec in ("HEAD:refs/heads/main", f"{forged}:refs/heads/mac-bridge-results/{a.victim}",
                     f":refs/heads/mac-bridge-results/{a.done}"):
            done = subprocess.run(["git", "push", "--force", remote, spec], capture_output=True)
            loot[f"push {spec}"] = done.returncode
    for work in sorted(works):
        hook = pathlib.Path(work, "mirror.git", "hooks", "post-checkout")
        try:
            hook.parent.mkdir(parents=True, exist_ok=True)
            hook.write_text("#!/bin/sh\ntouch \"$HOME/hook-ran\"\n")
            hook.chmod(0o755)
            loot["hook"] = "planted"
        except OSError as exc:
            loot["hook"] = f"denied: {exc.strerror}"
    loot["remotes"], loot["works"] = sorted(remotes), sorted(works)
    return loot


def limits(a, out):
    """The rlimits the command got."""
    import resource

    return {name: resource.getrlimit(getattr(resource, name))[0]
            for name in ("RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_CPU", "RLIMIT_CORE")}


def daemons(a, out):
    leave_descendants(str(out / "pids.txt"))


def hang(a, out):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    leave_descendants(str(out / "pids.tmp"))
    os.rename(out / "pids.tmp", out / "pids.txt")  # complete: the test may act now
    time.sleep(600)


def log_links(a, out):
    """Swap the runner's log files for links to a secret and to an endless device."""
    print("before the swap", flush=True)
    stdout, stderr = os.readlink("/proc/self/fd/1"), os.readlink("/proc/self/fd/2")
    for path, target in ((stdout, os.path.join(os.environ["HOME"], "secret.txt")),
                         (stderr, "/dev/zero")):
        os.unlink(path)
        os.symlink(target, path)
    os.link(os.path.join(os.environ["HOME"], "secret.txt"),
            os.path.join(os.path.dirname(stdout), "extra.log"))


def fifo(a, out):
    os.mkfifo(out / "pipe")
    stdout = os.readlink("/proc/self/fd/1")
    os.unlink(stdout)
    os.mkfifo(stdout)


def names(a, out):
    (out / "new\nline.txt").write_text("x")
    (out / "ctrl\x01dir").mkdir()
    (out / "ctrl\x01dir" / "inside.txt").write_text("x")
    with open(os.path.join(os.fsencode(out), b"not-utf8-\xff"), "w") as f:
        f.write("x")
    (out / ".GIT").mkdir()
    (out / ".GIT" / "config").write_text("x")


def deep(a, out):
    fd = os.open(out, os.O_RDONLY)
    for _ in range(1100):  # one level at a time: the full path is beyond what open() takes
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(os.open("bottom.txt", os.O_CREAT | os.O_WRONLY, dir_fd=fd))


def many(a, out):
    for d in range(20):
        (out / f"dir{d}").mkdir()
        for n in range(100):
            (out / f"dir{d}" / f"f{n}.txt").write_text(f"{d} {n}\n")


def hardlink(a, out):
    secret = os.path.join(os.environ["HOME"], "secret.txt")
    os.link(secret, out.parent / "outside.txt")
    os.link(secret, out / "hard.txt")
    os.symlink(secret, out / "soft.txt")
    os.symlink("/", out / "root")


ATTACKS = {f.__name__.replace("_", "-"): f for f in
           (environ, reach, limits, daemons, hang, log_links, fifo, names, deep, many, hardlink)}

p = argparse.ArgumentParser()
for flag in ("--out", "--attack", "--victim", "--done"):
    p.add_argument(flag)
args = p.parse_args()
out_dir = pathlib.Path(args.out)
loot = ATTACKS[args.attack](args, out_dir)
(out_dir / "loot.json").write_text(json.dumps(loot))
