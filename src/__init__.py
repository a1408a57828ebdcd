"""Lets the seed's notebook import work from the repository root: ``from src.vit_pruning import ...``.

``src.vit_pruning`` is made the *same* module object as ``vit_pruning`` (installed with
``pip install -e .``, or found here when not installed), so there is one set of classes.
"""
import os
import sys

try:
    import vit_pruning as _vit_pruning
except ImportError:  # not installed: use the copy beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import vit_pruning as _vit_pruning

sys.modules[__name__ + ".vit_pruning"] = _vit_pruning
vit_pruning = _vit_pruning
