#!/usr/bin/env bash
# The interpreters of the heads table's child-process peers (bench/peers.py), from the package
# index: TextPruner needs transformers 4.x (it removes heads with prune_heads, gone in 5.x) and
# is installed without its dependencies (its metadata asks for numpy<1.22); INC's pruning API
# exists only up to neural-compressor 2.6, which declares numpy<2 (and imports pkg_resources
# and six). Then: the command this prints.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-textpruner .venv-inc
python3 -m venv .venv-textpruner
.venv-textpruner/bin/pip install -q torch==2.13.0 transformers==4.57.6 -e .
.venv-textpruner/bin/pip install -q --no-deps textpruner==1.1.post2
python3 -m venv .venv-inc
.venv-inc/bin/pip install -q torch==2.13.0 transformers==4.57.6 "numpy<2" neural-compressor==2.6 -e .
.venv-inc/bin/pip install -q "setuptools<70" six  # pkg_resources (torch asks for a newer
# setuptools, which has none; pip says so, and nothing of torch's that the bench runs needs it)
echo "BENCH_TEXTPRUNER_PYTHON=.venv-textpruner/bin/python BENCH_INC_PYTHON=.venv-inc/bin/python python -m bench --only heads"
