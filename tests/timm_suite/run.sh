#!/usr/bin/env bash
# Run timm's own tests/test_models.py, from the sdist of the installed timm version, against the
# momentum models: once in standard mode, once with memory_efficient=True.
# Usage: tests/timm_suite/run.sh [extra pytest arguments, e.g. --momentum-models=momentum_resnet18]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python}"
VERSION="$("$PYTHON" -c 'import timm; print(timm.__version__)')"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$WORK" "timm==$VERSION"
tar -xzf "$WORK/timm-$VERSION.tar.gz" -C "$WORK"
SUITE="$WORK/timm-$VERSION/tests/test_models.py"
# Run from the sdist root so its pytest settings (markers) apply; the plugin comes from this folder.
# The sdist's timm/ folder is removed so the installed timm, the one under test, is imported.
rm -rf "$WORK/timm-$VERSION/timm"
cd "$WORK/timm-$VERSION"
status=0
for mode in standard memory_efficient; do
    flag=()
    [ "$mode" = memory_efficient ] && flag=(--momentum-memory-efficient)
    echo "== timm $VERSION tests/test_models.py, momentum models, $mode mode"
    PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest -q -p momentum_plugin -p no:cacheprovider \
        "${flag[@]}" "$@" "$SUITE" || status=1
done
exit $status
