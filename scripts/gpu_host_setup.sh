#!/usr/bin/env bash
# Prepare the lent GPU host (no network) for `make bench-gpu`: the Triton server tree and
# tritonclient from the carried bundle, python-rapidjson, and numpy 1.26 for the python stubs
# (Triton 2.51's stub corrupts BYTES inputs under numpy 2; see README "numpy 2").
# Carry: .carry (triton.tar.xz = pytriton's tritonserver tree + nvidia_pytriton.libs + tritonclient,
# whl/ = python_rapidjson and numpy 1.26.4 cp312 wheels). Then: export PYTHONPATH=/tmp/site
set -euo pipefail
mkdir -p /tmp/site /tmp/np1
tar xJf .carry/triton.tar.xz -C /tmp/site
python3 -m pip install -q --no-deps --no-index --target /tmp/site .carry/whl/python_rapidjson-*.whl
python3 -m pip install -q --no-deps --no-index --target /tmp/np1 .carry/whl/numpy-1.26.4-*.whl
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import os, sys; '/tmp/np1' in os.environ.get('PYTHONPATH', '') and sys.path.insert(0, '/tmp/np1')" > "$site/zz_stub_numpy.pth"
echo "GPU host ready: PYTHONPATH=/tmp/site; bench with --server-pythonpath /tmp/np1"
