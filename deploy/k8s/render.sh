#!/bin/sh
# Regenerate deploy/k8s/airoboros.yaml (what `kubectl apply -f deploy/k8s` applies) from the
# kustomization (what `kubectl apply -k deploy/k8s` applies). Run after changing anything
# under deploy/k8s; tests/unit/test_k8s_manifests.py checks that the two agree.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/airoboros.yaml"
tmp="$out.tmp"
{
    echo "# GENERATED FILE, do not edit: deploy/k8s/render.sh wrote it with"
    echo "#   kubectl kustomize deploy/k8s"
    echo "# Edit deploy/k8s/base and deploy/k8s/overlays/dev instead, then rerun render.sh."
    kubectl kustomize "$here"
} >"$tmp"
mv "$tmp" "$out"
