"""The application layer: the steps of a command-line run, each taking the run config
(:class:`vit_pruning.config.RunConfig`). :mod:`vit_pruning.cli` parses, converts, calls
:func:`vit_pruning.app.run.run` and prints errors; nothing here reads the command line."""
