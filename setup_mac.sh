#!/usr/bin/env bash
# setup_mac.sh: make this Mac a kakeya-mlx bridge runner. Idempotent: run it again at any time.
#
#   ./setup_mac.sh [--dry-run] [--venv DIR] [--verifier PATH] [--drafter PATH]
#                  [--repo-url URL] [--runner-dir DIR] [--runner-name NAME] [--token-stdin]
#                  [--sandbox-user NAME | --no-sandbox] [--scratch DIR]
#
# Steps: check macOS arm64 + Python >= 3.10; create a venv and install this package; link models
# into ~/kakeya-models (verifier, drafter); install git-lfs filters; create the bridge key
# (~/.config/kakeya-mac/bridge.key, mode 0600); create the hidden, login-less sandbox user that
# preset commands run as (default kakeya-sandbox; needs admin rights via sudo), a sudoers rule that
# lets this user run commands as it (and as nobody else), and the scratch directory it works in;
# when a registration token is given (KAKEYA_RUNNER_TOKEN or --token-stdin; never a flag, never
# written to the repo), install, register and start the GitHub Actions runner with the label
# kakeya-mac-m4; then run `kakeya_mac doctor` and the bridge-selftest preset locally. --dry-run
# prints every action instead of doing it (and works on Linux, where the tests run it).
set -euo pipefail

LABEL="kakeya-mac-m4"
RUNNER_VERSION="${RUNNER_VERSION:-2.321.0}"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$REPO_DIR/.venv"
MODELS="${KAKEYA_MODELS:-$HOME/kakeya-models}"
RUNNER_DIR="$HOME/actions-runner"
RUNNER_NAME="$(hostname -s 2>/dev/null || hostname)-kakeya"
REPO_URL=""
VERIFIER=""
DRAFTER=""
TOKEN="${KAKEYA_RUNNER_TOKEN:-}"
SANDBOX_USER="kakeya-sandbox"
SCRATCH="/Users/Shared/kakeya-mac"
KEY_FILE="$HOME/.config/kakeya-mac/bridge.key"
ME="$(id -un)"
DRY_RUN=0
FAILED=0

say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# run CMD...: do it, or under --dry-run print it.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ %s\n' "$*"
  else
    "$@"
  fi
}

# run_in DIR CMD...: like run, inside DIR.
run_in() {
  local dir="$1"
  shift
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ (cd %s && %s)\n' "$dir" "$*"
  else
    (cd "$dir" && "$@")
  fi
}

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --venv) VENV="$2"; shift ;;
    --verifier) VERIFIER="$2"; shift ;;
    --drafter) DRAFTER="$2"; shift ;;
    --repo-url) REPO_URL="$2"; shift ;;
    --runner-dir) RUNNER_DIR="$2"; shift ;;
    --runner-name) RUNNER_NAME="$2"; shift ;;
    --token-stdin) IFS= read -r TOKEN ;;
    --sandbox-user) SANDBOX_USER="$2"; shift ;;
    --no-sandbox) SANDBOX_USER="" ;;
    --scratch) SCRATCH="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done

check_host() {
  local os arch
  os="$(uname -s)"
  arch="$(uname -m)"
  if [ "$os" = Darwin ] && [ "$arch" = arm64 ]; then
    say "host: macOS $(sw_vers -productVersion 2>/dev/null || echo '?') on $arch"
  elif [ "$DRY_RUN" = 1 ]; then
    warn "host is $os $arch, not macOS arm64: a real run stops here (continuing: --dry-run)"
  else
    die "this runner needs macOS on Apple silicon (arm64); this is $os $arch"
  fi
}

check_python() {
  PYTHON="${PYTHON:-python3}"
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python >= 3.10"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$PYTHON is older than 3.10"
  say "python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0])') ($PYTHON)"
}

install_package() {
  if [ -x "$VENV/bin/python" ]; then
    say "venv exists: $VENV"
  else
    run "$PYTHON" -m venv "$VENV"
  fi
  run "$VENV/bin/python" -m pip install --quiet --upgrade pip
  run "$VENV/bin/python" -m pip install --quiet -e "${REPO_DIR}[server]"  # server-throughput preset
}

link_model() {
  local name="$1" src="$2"
  [ -n "$src" ] || return 0
  if [ -e "$src" ]; then
    src="$(cd "$(dirname "$src")" && pwd)/$(basename "$src")"
  elif [ "$DRY_RUN" = 1 ]; then
    warn "$name model not found: $src"
  else
    die "$name model not found: $src"
  fi
  run ln -sfn "$src" "$MODELS/$name"
}

link_models() {
  run mkdir -p "$MODELS"
  link_model verifier "$VERIFIER"
  link_model drafter "$DRAFTER"
  [ -n "$VERIFIER$DRAFTER" ] \
    || say "no --verifier/--drafter: presets use the embedded offline pair (\${ENV:...} -> default)"
}

setup_lfs() {
  if command -v git-lfs >/dev/null; then
    run git lfs install --skip-repo
  elif command -v brew >/dev/null; then
    run brew install git-lfs
    run git lfs install --skip-repo
  elif [ "$DRY_RUN" = 1 ]; then
    warn "git-lfs is missing and Homebrew is not installed"
  else
    die "git-lfs is missing: install it (brew install git-lfs), then re-run"
  fi
}

create_key() {
  if [ -f "$KEY_FILE" ]; then
    say "bridge key exists: $KEY_FILE"
    return
  fi
  run mkdir -p "$(dirname "$KEY_FILE")"
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ write a random bridge key to %s (mode 0600)\n' "$KEY_FILE"
    return
  fi
  (umask 077 && openssl rand -hex 32 >"$KEY_FILE")
  say "bridge key created: $KEY_FILE (clients verify results with it: KAKEYA_BRIDGE_KEY)"
}

# next_uid: the first free uid from 600 up (hidden service accounts live below 1000 on macOS).
next_uid() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "<next free uid>"
    return
  fi
  dscl . -list /Users UniqueID | awk '$2 >= 600 && $2 < 1000 {used[$2] = 1}
    END {for (u = 600; u in used; u++); print u}'
}

# setup_sandbox: the unprivileged account presets run as, the sudo rule to reach it, its scratch.
setup_sandbox() {
  if [ -z "$SANDBOX_USER" ]; then
    warn "--no-sandbox: presets run as $ME and can read what $ME can (see docs/bridge.md)"
    return
  fi
  if id "$SANDBOX_USER" >/dev/null 2>&1; then
    say "sandbox user exists: $SANDBOX_USER"
  else
    local uid home="/Users/$SANDBOX_USER" record="/Users/$SANDBOX_USER"
    uid="$(next_uid)"
    run sudo dscl . -create "/Groups/$SANDBOX_USER" PrimaryGroupID "$uid"
    run sudo dscl . -create "$record" UniqueID "$uid"
    run sudo dscl . -create "$record" PrimaryGroupID "$uid"
    run sudo dscl . -create "$record" UserShell /usr/bin/false
    run sudo dscl . -create "$record" NFSHomeDirectory "$home"
    run sudo dscl . -create "$record" Password '*'
    run sudo dscl . -create "$record" IsHidden 1
    run sudo mkdir -p "$home"
    run sudo chown "$SANDBOX_USER:$SANDBOX_USER" "$home"
  fi
  local rule="/etc/sudoers.d/kakeya-sandbox" draft
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ write "%s ALL=(%s) NOPASSWD: ALL" to %s (checked with visudo -cf)\n' \
      "$ME" "$SANDBOX_USER" "$rule"
  else
    draft="$(mktemp)"
    printf '%s ALL=(%s) NOPASSWD: ALL\n' "$ME" "$SANDBOX_USER" >"$draft"
    visudo -cf "$draft" >/dev/null || die "the sudoers rule does not parse"
    sudo install -m 0440 -o root -g wheel "$draft" "$rule"
    rm -f "$draft"
  fi
  run sudo mkdir -p "$SCRATCH"
  run sudo chown "$ME" "$SCRATCH"
  run chmod 0711 "$SCRATCH"
  # Presets run this venv's python as the sandbox user: it must reach it (and the model links).
  run sudo -n -u "$SANDBOX_USER" "$VENV/bin/python" -c '' || {
    warn "$SANDBOX_USER cannot run $VENV/bin/python: give it search access to the path"
    FAILED=1
  }
}

# set_env_line FILE KEY VALUE: KEY=VALUE in the runner's .env, replacing an older value.
set_env_line() {
  local file="$1" key="$2" value="$3"
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ set %s=%s in %s\n' "$key" "$value" "$file"
    return
  fi
  touch "$file"
  grep -v "^$key=" "$file" >"$file.tmp" || true
  printf '%s=%s\n' "$key" "$value" >>"$file.tmp"
  mv "$file.tmp" "$file"
}

# verify_tarball FILE: check it against RUNNER_SHA256 (from the runner's release page) when given.
verify_tarball() {
  if [ -z "${RUNNER_SHA256:-}" ]; then
    warn "RUNNER_SHA256 not set: the runner tarball is not checksum-verified"
  elif [ "$DRY_RUN" = 1 ]; then
    printf '+ check sha256 of %s is %s\n' "$1" "$RUNNER_SHA256"
  else
    [ "$(shasum -a 256 "$1" | cut -d' ' -f1)" = "$RUNNER_SHA256" ] \
      || die "checksum mismatch for $1"
  fi
}

setup_runner() {
  if [ -z "$TOKEN" ]; then
    say "no registration token: skipping the Actions runner (set KAKEYA_RUNNER_TOKEN or --token-stdin)"
    return
  fi
  [ -n "$REPO_URL" ] || die "--repo-url https://github.com/OWNER/REPO is needed to register the runner"
  local tarball="actions-runner-osx-arm64-$RUNNER_VERSION.tar.gz"
  local url="https://github.com/actions/runner/releases/download/v$RUNNER_VERSION/$tarball"
  run mkdir -p "$RUNNER_DIR"
  if [ -x "$RUNNER_DIR/config.sh" ]; then
    say "runner $RUNNER_VERSION already unpacked in $RUNNER_DIR"
  else
    run curl -fsSL -o "$RUNNER_DIR/$tarball" "$url"
    verify_tarball "$RUNNER_DIR/$tarball"
    run tar -xzf "$RUNNER_DIR/$tarball" -C "$RUNNER_DIR"
  fi
  if [ -f "$RUNNER_DIR/.runner" ]; then
    say "runner already registered ($RUNNER_DIR/.runner)"
  elif [ "$DRY_RUN" = 1 ]; then
    printf '+ (cd %s && ./config.sh --unattended --url %s --token *** --labels %s --name %s --replace)\n' \
      "$RUNNER_DIR" "$REPO_URL" "$LABEL" "$RUNNER_NAME"
  else
    (cd "$RUNNER_DIR" && ./config.sh --unattended --url "$REPO_URL" --token "$TOKEN" \
      --labels "$LABEL" --name "$RUNNER_NAME" --replace)
  fi
  set_env_line "$RUNNER_DIR/.env" KAKEYA_PYTHON "$VENV/bin/python"
  set_env_line "$RUNNER_DIR/.env" KAKEYA_MODELS "$MODELS"
  if [ -n "$SANDBOX_USER" ]; then
    set_env_line "$RUNNER_DIR/.env" KAKEYA_SANDBOX_USER "$SANDBOX_USER"
    set_env_line "$RUNNER_DIR/.env" KAKEYA_SCRATCH "$SCRATCH"
  fi
  if [ -f "$RUNNER_DIR/.service" ]; then
    say "runner service already installed"
  else
    run_in "$RUNNER_DIR" ./svc.sh install
  fi
  run_in "$RUNNER_DIR" ./svc.sh start
}

verify() {
  run_in "$REPO_DIR" "$VENV/bin/kakeya_mac" doctor || FAILED=1
  run_in "$REPO_DIR" "$VENV/bin/kakeya_mac" local bridge-selftest || FAILED=1
}

check_host
check_python
install_package
link_models
setup_lfs
create_key
setup_sandbox
setup_runner
verify
if [ "$FAILED" = 1 ]; then
  die "setup finished, but doctor or the bridge-selftest preset failed (see above)"
fi
if [ "$DRY_RUN" = 1 ]; then
  say "dry run: nothing was changed"
else
  say "done: this Mac runs kakeya-mlx bridge requests${TOKEN:+ as runner $RUNNER_NAME}"
fi
