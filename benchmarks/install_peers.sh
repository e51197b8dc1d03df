#!/usr/bin/env bash
# Install the peer libraries that benchmarks/side_by_side.py compares pymaml with:
#   higher 0.2.1, TorchOpt 0.7.3 (wheels from PyPI) and learn2learn 0.2.0 (built from its sdist).
#
# Usage: bash benchmarks/install_peers.sh [--download-only DIR | --from DIR]
#   (no argument)          download from the package index and install into the current python
#   --download-only DIR    only fetch everything into DIR (for an offline machine, e.g. the GPU box)
#   --from DIR             install from DIR with no network (pip --no-index --find-links DIR)
#
# Every pip call uses --no-deps so that pip can never replace the installed torch; the few import
# dependencies the peers need are listed here by hand:
#   TorchOpt 0.7.3: optree, graphviz (python package; imported at import time), typing-extensions.
#                   Its compiled _C was built for an older torch and fails to load; TorchOpt then
#                   uses its pure-python ops (the default, use_accelerated_op=False, anyway).
#   higher 0.2.1:   nothing beyond torch.
#   learn2learn 0.2.0: ships only an sdist whose pre-generated Cython .c files do not compile on
#                   Python >= 3.11. We regenerate them with a current Cython (cython -3) and build
#                   with --no-build-isolation (which needs packaging for wheel's bdist_wheel).
#                   `import learn2learn` then imports gym (gym, gym_notices, cloudpickle),
#                   torchvision (the build matching torch), PIL, numpy, scipy, requests (with its own
#                   imports urllib3, idna, charset-normalizer, certifi) and tqdm.
# A peer that fails to install is reported by side_by_side.py as "not installed: <reason>".
set -euo pipefail

PY=${PYTHON:-python3}
MODE=install
DIR=""
case "${1:-}" in
  --download-only) MODE=download; DIR=${2:?"--download-only needs a folder"} ;;
  --from) MODE=offline; DIR=${2:?"--from needs a folder"} ;;
  "") ;;
  *) echo "usage: $0 [--download-only DIR | --from DIR]" >&2; exit 2 ;;
esac

TORCH_VERSION=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
# torchvision minor = torch minor + 15 for torch 2.x (2.14 -> 0.29)
TV_MINOR=$($PY -c "import torch; v=torch.__version__.split('+')[0].split('.'); print(int(v[1]) + 15)")
TORCHVISION_SPEC="torchvision==0.${TV_MINOR}.*"

PEERS=("higher==0.2.1" "torchopt==0.7.3")
IMPORT_DEPS=("optree>=0.4.1" "graphviz" "typing-extensions>=4.0.0" "gym==0.26.2" "gym_notices" "cloudpickle"
             "pillow" "numpy" "scipy" "requests" "urllib3" "idna" "charset-normalizer" "certifi" "tqdm")
BUILD_DEPS=("cython>=3" "setuptools" "wheel" "packaging")

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

pip_fetch() {  # pip download into $1 the remaining arguments, without dependencies
  local dest=$1; shift
  $PY -m pip download --no-deps -d "$dest" "$@"
}

if [[ $MODE == download ]]; then
  mkdir -p "$DIR"
  pip_fetch "$DIR" "${PEERS[@]}" "${IMPORT_DEPS[@]}" "${BUILD_DEPS[@]}" "$TORCHVISION_SPEC"
  pip_fetch "$DIR" --no-binary :all: "learn2learn==0.2.0"
  echo "peers downloaded to $DIR (torch $TORCH_VERSION); install with: $0 --from $DIR"
  exit 0
fi

PIPI=($PY -m pip install --no-deps)
SRC_ARGS=()
if [[ $MODE == offline ]]; then
  PIPI+=(--no-index --find-links "$DIR")
  SRC_ARGS=(--no-index --find-links "$DIR")
fi

status=0
"${PIPI[@]}" "${BUILD_DEPS[@]}" || { echo "install_peers: build deps failed" >&2; status=1; }
"${PIPI[@]}" "${IMPORT_DEPS[@]}" || { echo "install_peers: import deps failed" >&2; status=1; }
"${PIPI[@]}" "${PEERS[@]}" || { echo "install_peers: higher/torchopt failed" >&2; status=1; }
"${PIPI[@]}" "$TORCHVISION_SPEC" || { echo "install_peers: torchvision failed (learn2learn needs it)" >&2; status=1; }

# learn2learn 0.2.0 from its sdist, Cython sources regenerated.
if [[ $MODE == offline ]]; then
  cp "$DIR"/learn2learn-0.2.0.tar.gz "$WORK"/
else
  $PY -m pip download --no-deps --no-binary :all: -d "$WORK" "learn2learn==0.2.0"
fi
(
  cd "$WORK"
  tar xzf learn2learn-0.2.0.tar.gz
  cd learn2learn-0.2.0
  rm -rf .eggs   # a bundled Cython 0.29 egg for py3.7; unused, but keep setuptools away from it
  for m in meta_dataset task_dataset transforms; do
    $PY -m cython -3 "learn2learn/data/$m.pyx" -o "learn2learn/data/$m.c"
  done
  $PY -m pip install --no-deps --no-build-isolation "${SRC_ARGS[@]}" .
) || { echo "install_peers: learn2learn build failed" >&2; status=1; }

# Check: each peer imports and torch is unchanged.
$PY - <<EOF
import importlib, torch
assert torch.__version__.split('+')[0] == "$TORCH_VERSION", f"torch changed: {torch.__version__}"
for name in ("higher", "torchopt", "learn2learn"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: ok", getattr(m, "__version__", ""))
    except Exception as e:  # report and go on: side_by_side.py reports it too
        print(f"{name}: NOT importable: {type(e).__name__}: {e}")
EOF
exit $status
