"""Record that it ran (in $HOME/executions.log) and write evidence."""

import argparse
import json
import os
import pathlib

p = argparse.ArgumentParser()
for flag in ("--out", "--id", "--note", "--lossless", "--count", "--ratio", "--level"):
    p.add_argument(flag)
p.add_argument("--flag", action="store_true")
a = p.parse_args()
with open(os.path.join(os.environ["HOME"], "executions.log"), "a") as f:
    f.write(a.id + "\n")
evidence = {"aggregate": {"lossless_all": a.lossless == "true", "note": a.note,
                          "count": int(a.count)},
            "argv_flag": a.flag, "env": sorted(os.environ), "cwd": os.getcwd()}
pathlib.Path(a.out, "evidence.json").write_text(json.dumps(evidence))
if a.note == "leak":  # try to publish a runner secret through links in the output dir
    secret = os.path.join(os.environ["HOME"], "secret.txt")
    os.symlink(secret, os.path.join(a.out, "soft.txt"))
    os.link(secret, os.path.join(a.out, "hard.txt"))
print("marker ran", a.id)
