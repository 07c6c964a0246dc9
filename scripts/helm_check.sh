#!/usr/bin/env bash
# Everything CI checks about deployment, offline: the Helm chart and the container image.
#   1. helm (scripts/install_helm.sh: .tools/bin, built with `go install` once);
#   2. `helm lint --strict` with every values file under helm/tokenwire/ci/;
#   3. tests/test_helm.py: `helm template` per values file and Kubernetes version, kubernetes-validate --strict,
#      the assertions on the rendered YAML, the bad values files, the values table, the Dockerfile's rules;
#   4. docker/check.sh: hadolint, and the Dockerfile's install script in a clean virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
./scripts/install_helm.sh
export PATH="$PWD/.tools/bin:$PATH"

for values in helm/tokenwire/ci/*.yaml; do
  echo "==> helm lint --strict -f $values"
  helm lint --strict --quiet helm/tokenwire -f "$values"
done

echo "==> pytest tests/test_helm.py"
"$VENV/bin/pytest" -q tests/test_helm.py

docker/check.sh
