"""A command-line run's process-wide settings, made for the run and undone after it.

The run logs to stderr at INFO (WARNING with --quiet), silences transformers' and datasets'
own logging and progress bars, quiets the ONNX exporter's notes, and seeds torch's generators
(:func:`vit_pruning.app.run.run`). A caller of :func:`vit_pruning.cli.main` in its own process
(a notebook, a test) gets every one of those back as it was.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

QUIET_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")  # the ONNX exporter
# logs its notes at INFO
FORMAT = "%(asctime)s %(levelname)s %(message)s"


@contextlib.contextmanager
def _logging(quiet: bool) -> Iterator[None]:
    """A stderr handler on the root logger at INFO (WARNING if quiet), unless the caller has
    configured logging already (as logging.basicConfig would leave it); levels restored."""
    root = logging.getLogger()
    handler = None
    old_root = root.level
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING if quiet else logging.INFO)
    quieted = {name: logging.getLogger(name).level for name in QUIET_LOGGERS} if quiet else {}
    for name in quieted:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(old_root)


@contextlib.contextmanager
def _libraries(quiet: bool) -> Iterator[None]:
    """transformers' and datasets' verbosity and progress bars, restored after."""
    import datasets
    import transformers
    tf, ds = transformers.utils.logging, datasets.utils.logging
    old = (tf.get_verbosity(), tf.is_progress_bar_enabled(), ds.get_verbosity(),
           ds.is_progress_bar_enabled())
    tf.set_verbosity_error()
    tf.disable_progress_bar()
    ds.set_verbosity_error()
    if quiet:  # their bars on stderr
        ds.disable_progress_bar()
    try:
        yield
    finally:
        tf.set_verbosity(old[0])
        (tf.enable_progress_bar if old[1] else tf.disable_progress_bar)()
        ds.set_verbosity(old[2])
        (ds.enable_progress_bar if old[3] else ds.disable_progress_bar)()


@contextlib.contextmanager
def _random_state() -> Iterator[None]:
    """torch's CPU (and CUDA, where initialised) generator states, restored after."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def run_scope(quiet: bool) -> Iterator[None]:
    """Logging, the libraries' verbosity and the random state, set for one run and restored."""
    with _logging(quiet), _libraries(quiet), _random_state():
        yield
