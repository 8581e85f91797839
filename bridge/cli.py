"""`kakeya_mac`: run presets on the self-hosted Mac over the git bus, and read back the evidence.

  kakeya_mac run PRESET [--param k=v]... [--wait]    push a request (prints its id)
  kakeya_mac status [ID] | fetch ID | cancel ID      follow it
  kakeya_mac presets | validate FILE | doctor        inspect
  kakeya_mac serve --remote URL [--once]             be a runner (any git remote)
  kakeya_mac local PRESET [--param k=v]...           run a preset here, no bus
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bridge import client, executor, report, run
from bridge.gitbus import REQUEST_PREFIXES
from bridge.presets import default_presets_dir, load_presets
from bridge.runner import serve
from mlx_engine.errors import cli_entry

_VALUE_FLAGS = ("--branch-prefix", "--branch-suffix")


def _join_flag_values(argv: list[str]) -> list[str]:
    """`--branch-suffix -b876` -> `--branch-suffix=-b876`: argparse would read `-b876` as an
    option and fail; these flags always take a value, so join it."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        out.append(f"{arg}={next(it, '')}" if arg in _VALUE_FLAGS else arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kakeya_mac", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    presets = argparse.ArgumentParser(add_help=False)
    presets.add_argument("--presets-dir", type=Path, default=default_presets_dir())
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--remote", default="origin", help="git remote name or URL")
    policy = argparse.ArgumentParser(add_help=False)
    env = os.environ
    policy.add_argument("--branch-prefix",
                        default=env.get("KAKEYA_BRIDGE_BRANCH_PREFIX", REQUEST_PREFIXES[0]),
                        help=f"one of {', '.join(REQUEST_PREFIXES)} (what the runner watches)")
    policy.add_argument("--branch-suffix", default=env.get("KAKEYA_BRIDGE_BRANCH_SUFFIX", ""),
                        help="appended to the branch name, e.g. --branch-suffix=-b876")

    run = sub.add_parser("run", parents=[presets, remote, policy], help="push a request")
    run.add_argument("preset")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--wait", action="store_true", help="wait for the result and print it")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits")
    run.add_argument("--poll", type=float, default=10.0, help="seconds between --wait polls")

    status = sub.add_parser("status", parents=[remote], help="list requests, or show one")
    status.add_argument("request_id", nargs="?")
    fetch = sub.add_parser("fetch", parents=[remote], help="unpack a result directory")
    fetch.add_argument("request_id")
    fetch.add_argument("--out", type=Path, help="default runs/bridge/<id>")
    cancel = sub.add_parser("cancel", parents=[remote], help="cancel a request not yet claimed")
    cancel.add_argument("request_id")

    sub.add_parser("presets", parents=[presets], help="list presets and their params")
    validate = sub.add_parser("validate", parents=[presets], help="check a manifest, run nothing")
    validate.add_argument("file", type=Path)
    sub.add_parser("doctor", parents=[presets, remote, policy], help="check this setup")

    serve_p = sub.add_parser("serve", help="run requests from a git remote (no GitHub needed)")
    executor.add_runner_options(serve_p)
    serve_p.add_argument("--once", action="store_true", help="one pass over pending requests")
    serve_p.add_argument("--poll", type=float, default=30.0, help="seconds between passes")

    local = sub.add_parser("local", parents=[presets], help="run a preset on this working tree")
    local.add_argument("preset")
    local.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    local.add_argument("--out", type=Path, help="run directory (default runs/bridge/<id>)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_join_flag_values(sys.argv[1:] if argv is None else argv))
    if args.command == "serve":
        executor.harden()
        return serve(executor.config_from(args), args.once, args.poll)
    if args.command == "presets":
        print(client.describe_presets(load_presets(args.presets_dir)))
        return 0
    if args.command == "validate":
        request = client.validate_file(args.file, load_presets(args.presets_dir))
        print(f"valid: {request.request_id} (preset {request.preset.name})")
        return 0
    if args.command == "local":
        preset = client.preset_named(load_presets(args.presets_dir), args.preset)
        params = preset.resolve_params(client.parse_params(preset, args.param))
        summary = run.run_local(client.repo_root(), preset, params, args.out)
        print(report.text(summary))
        return client.STATUS_EXIT[summary["status"]]
    if args.command == "doctor":
        return client.doctor(client.find_repo(), args.remote, args.presets_dir, args.branch_prefix,
                             args.branch_suffix)
    repo = client.repo_root()
    if args.command == "run":
        request_id, branch, sha = client.submit(repo, load_presets(args.presets_dir),
                                                args.preset, args.param, args.remote,
                                                args.branch_prefix, args.branch_suffix)
        print(request_id)
        print(f"pushed {branch} to {args.remote}", file=sys.stderr)
        if not args.wait:
            return 0
        summary = client.wait(repo, args.remote, request_id, args.timeout, args.poll, sha)
        return client.finished(summary, request_id, args.timeout)
    if args.command == "status":
        return client.status(repo, args.remote, args.request_id)
    if args.command == "fetch":
        print(client.fetch(repo, args.remote, args.request_id, args.out))
        return 0
    return client.cancel(repo, args.remote, args.request_id)


if __name__ == "__main__":
    sys.exit(main())
