#!/usr/bin/env bash
# Submit `python -m viseg.sweep ARGS` as a Ray job to a running cluster (see launch/README.md).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: launch/submit.sh [--no-wait] [--submission-id ID] [--] SWEEP_ARGS...

Submits `python -m viseg.sweep SWEEP_ARGS...` to the Ray cluster at $RAY_ADDRESS
(default http://127.0.0.1:8265, the dashboard's Jobs API; with a remote cluster keep it behind an
SSH tunnel or `ray dashboard launch/cluster.yaml`). viseg is built into a wheel from this checkout
(uncommitted edits included) and uploaded, installed without its dependencies, as the job's working
directory; the nodes' environment provides torch, Ray and the rest.

Options (before the sweep arguments):
  --no-wait            return once the job is submitted (also: VISEG_SUBMIT_NO_WAIT=1); follow it with
                       `ray job logs --follow ID`, stop it with `ray job stop ID`
  --submission-id ID   name the job (default: Ray's raysubmit_...); must be unique on the cluster
  -h, --help           this text

Paths in SWEEP_ARGS are read on the cluster, in the job's temporary working directory: give absolute paths
on storage every node shares for storage_path=, paths.cache= and dataset.basepath=. storage_path= must be
a mounted path, not a URI (s3://, gs://, ...): trials write their run folders with plain file I/O.

Token authentication: RAY_AUTH_MODE=token is exported when a token is found (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), unless RAY_AUTH_MODE is set already.

Examples:
  launch/submit.sh folds=0-4 lr_scheduler=step_lr,poly storage_path=/shared/sweeps paths.cache=/shared/cache
  launch/submit.sh --no-wait resume=/shared/sweeps/<experiment>
EOF
}

no_wait="${VISEG_SUBMIT_NO_WAIT:-0}"
submission_id=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --no-wait) no_wait=1; shift ;;
        --submission-id) [[ $# -ge 2 ]] || { echo "submit.sh: --submission-id needs a value" >&2; exit 2; }
                         submission_id="$2"; shift 2 ;;
        --submission-id=*) submission_id="${1#*=}"; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
done
if [[ $# -eq 0 ]]; then
    usage >&2
    exit 2
fi

# launch/runtime_env.yaml and the wheel are found relative to the checkout, wherever this is run from.
cd "$(dirname "$0")/.."

# A URI would leave every trial's run folder on its own node's disk: refuse it before anything is uploaded.
for arg in "$@"; do
    if [[ "$arg" =~ ^storage_path=[A-Za-z][A-Za-z0-9+.-]*:// && "$arg" != storage_path=file://* ]]; then
        echo "submit.sh: error: $arg is a URI; storage_path= must be a path every node mounts (NFS, EFS," \
            "Lustre, ...), e.g. storage_path=/mnt/shared/sweeps" >&2
        exit 2
    fi
done

# The job's arguments are read on the head node, in its temporary working directory: a relative results or
# cache folder would end up there (and differ between nodes), so say so before anything is uploaded.
case " $* " in
    *" resume="*|*" summary="*|*" dry_run=true "*) ;;
    *)
        for key in storage_path paths.cache; do
            [[ " $* " == *" $key=/"* || " $* " == *" $key=file:///"* ]] || echo "submit.sh: warning: no absolute" \
                "$key=...: the job would write it inside its temporary working directory on the head node;" \
                "give a path on shared storage" >&2
        done
        ;;
esac

if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] || [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] \
        || [[ -f "$HOME/.ray/auth_token" ]]; }; then
    export RAY_AUTH_MODE=token
fi

ray_bin="$(command -v ray || true)"
if [[ -z "$ray_bin" && -x .venv/bin/ray ]]; then
    ray_bin=.venv/bin/ray
fi
[[ -n "$ray_bin" ]] || { echo "submit.sh: no ray command; activate viseg's environment (source .venv/bin/activate)" >&2; exit 2; }

# The job runs viseg as a wheel installs it: build the wheel from this checkout and unpack it, without its
# dependencies, into a staging folder that Ray uploads as the job's working directory (first on sys.path of the
# driver and every trial). The upload is viseg alone, its configs included as package data; torch, Ray and the
# rest come from the nodes' environment (launch/cluster.yaml, or the image). Your uncommitted edits travel too.
python_bin="$(dirname "$ray_bin")/python"
[[ -x "$python_bin" ]] || python_bin="$(command -v python3)"
stage="$(mktemp -d "${TMPDIR:-/tmp}/viseg-submit.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
# Built from a copy of its inputs (pyproject.toml's packages and readme): setuptools writes build/ and
# *.egg-info beside the sources, which must not race with a second submit or a build in the checkout.
mkdir -p "$stage/src"
cp -R pyproject.toml README.md viseg conf sweeps "$stage/src/"
find "$stage/src" -name __pycache__ -prune -exec rm -rf {} +
"$python_bin" -m pip wheel --no-deps --no-build-isolation -q -w "$stage/dist" "$stage/src" >&2 \
    || { echo "submit.sh: building viseg's wheel failed (pip wheel above); it needs setuptools>=77" >&2; exit 2; }
"$python_bin" -m pip install --no-deps -q --target "$stage/job" "$stage"/dist/viseg-*.whl >&2
rm -rf "$stage/job/bin"  # console scripts whose first line names this machine's Python

options=(--address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir "$stage/job"
         --runtime-env launch/runtime_env.yaml)
[[ "$no_wait" == 1 ]] && options+=(--no-wait)
[[ -n "$submission_id" ]] && options+=(--submission-id "$submission_id")
"$ray_bin" job submit "${options[@]}" -- python -m viseg.sweep "$@"
