#!/usr/bin/env bash
# Regenerate the values table in helm/tokenwire/README.md from the `# --` comments in values.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
"${VENV:-.venv}/bin/python" helm/values_doc.py --write
