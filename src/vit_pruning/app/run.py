"""A run of the command line, step by step: claim the outputs, load, choose, prepare the data,
then one target, several targets, a budget search or a latency target; report."""
from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import LATENCY_MISSED, UsageError
from .checks import check_latency_batch
from .choices import choose, objective_step, plan_probes
from .dryrun import print_budget_dry_run, print_dry_run
from .evaluate import Evaluator
from .inputs import check_budget, check_image_processor, data_step, run_dataset
from .loading import load_step
from .reporting import build_report, print_summary, write_error, write_outputs
from .steps import latency_step, prune_step, save_step

log = logging.getLogger("vit_pruning")


def run(cfg: RunConfig, argv: list[str]) -> int:
    """A command-line run, in order: the checks that need no model, then a dry run, or the
    outputs claimed and the run made (:func:`run_claimed`). Process-wide set-up (logging,
    verbosity, signals) is the caller's (:mod:`vit_pruning.cli`); the seed is set here."""
    from ..accel import is_main, launched
    torch.manual_seed(cfg.seed)
    run_id = cfg.output.run_id or auto_run_id()
    if launched() and (cfg.output.dry_run or len(cfg.targets.targets) > 1 or cfg.budget):
        raise UsageError("several processes distill one model: give one --target and "
                         "--distill-steps (a dry run, sweep or budget search runs in one process)")
    if launched() and cfg.targets.objective == "latency":
        raise UsageError("--target-latency plans on timings that every process would measure "
                         "differently: plan it in one process (or use --target-flops here)")
    if not is_main():  # under a launcher only the main process logs, measures and writes
        logging.getLogger().setLevel(logging.WARNING)
        return helper_run(cfg.quieter(), run_id)
    if cfg.output.dry_run:  # writes nothing: no output place to check
        check_checkpoint(cfg, run_id)
        return dry_run(cfg, run_id)
    from ..outputs import OutputError
    run_id, outputs, saved = claim_outputs(cfg, run_id)
    try:
        return run_claimed(cfg, argv, run_id, outputs, saved)
    except OutputError as exc:
        raise UsageError(str(exc)) from exc
    finally:
        outputs.__exit__(None, None, None)  # what is staged and not committed goes; names freed


def auto_run_id() -> str:
    """The --run-id of a run that gives none: the time, UTC, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


AUTO_ID_TRIES = 100  # suffixes -2, -3, ... an automatic --run-id tries when its name is taken


def claim_outputs(cfg: RunConfig, run_id: str):
    """(run id, its outputs checked and claimed, its checkpoint) before the model loads (a bad
    path costs nothing). A --run-id the user gave is theirs: taken, the run stops. An automatic
    one (the time, to the second) that another run has, finished or running (runs started in
    one second by a script), moves on to run_id-2, -3, ... instead."""
    from ..checkpoint import Checkpoint
    from ..outputs import Output, OutputError, TakenError, check_outputs
    auto = not cfg.output.run_id
    ids = [run_id] + ([f"{run_id}-{k}" for k in range(2, AUTO_ID_TRIES + 1)] if auto else [])
    for rid in ids:
        last = rid == ids[-1]
        if not last and Checkpoint.of(cfg.output.artifacts_dir, rid).folder.exists():
            continue  # (only automatic ids have a next one)
        saved = check_checkpoint(cfg, rid)
        outputs = run_outputs(cfg, rid)
        try:
            check_outputs(outputs.outputs)
            if cfg.recovery.checkpoint_every:  # written during the run, not staged: checked too
                check_outputs([Output("checkpoint", saved.folder / "latest.json.probe",
                                      "--artifacts-dir")])
            outputs.__enter__()  # claims the names: a second run with this id stops here
            return rid, outputs, saved
        except TakenError as exc:
            if last:
                raise UsageError(str(exc)) from exc
        except OutputError as exc:
            raise UsageError(str(exc)) from exc


def check_checkpoint(cfg: RunConfig, run_id: str):
    """The run's checkpoint folder: with --resume, one made for this job (checked before any
    work); without, none may be there. One UsageError naming the flag or file otherwise."""
    from ..checkpoint import Checkpoint
    saved = Checkpoint.of(cfg.output.artifacts_dir, run_id)
    try:
        latest = saved.latest
        if cfg.recovery.resume and latest is not None:
            saved.check(cfg.job())
    except ValueError as exc:
        raise UsageError(f"--resume: {exc}" if cfg.recovery.resume else
                         f"--run-id {run_id}: {exc}") from exc
    if cfg.recovery.resume and latest is None:
        raise UsageError(f"--resume: no checkpoint of --run-id {run_id} in {saved.folder}")
    if not cfg.recovery.resume and latest is not None:
        raise UsageError(f"--run-id {run_id} has a checkpoint in {saved.folder}: add --resume to go "
                         f"on from it, or choose another --run-id")
    return saved


def dry_run(cfg: RunConfig, run_id: str) -> int:
    """--dry-run: the plan of every target (or the budget search's range), printed."""
    loaded = load_step(cfg)
    ch = choose(cfg, loaded, run_id)
    if loaded.text:  # the sentences the run would split, refused here as there (read, not tokenized)
        from .inputs import all_sentences, load_text
        load_text(cfg, ch.calib_size, all_sentences(cfg)[0])
    loaded.model.to(ch.device)
    if not loaded.text and run_dataset(cfg, loaded):  # its processor, as the run checks it
        check_image_processor(loaded)  # (the images themselves are not read)
    probes = objective_step(cfg, loaded, ch, None)  # FLOP and latency targets: checked there
    if probes is None:
        probes = plan_probes(cfg, loaded, ch)
    if not cfg.targets.targets:
        print_budget_dry_run(cfg, loaded, ch)
    for t, p in probes.items():
        print_dry_run(cfg, loaded, ch, t, p)
    return 0


def run_claimed(cfg: RunConfig, argv: list[str], run_id: str, outputs, saved) -> int:
    """The run once its outputs are claimed: load, choose, data, then several targets (the
    trade-off report) or one model (a target, a budget's choice or a latency target's) through
    pruning, recovery, timing, saving and its report."""
    loaded = load_step(cfg)
    ch = choose(cfg, loaded, run_id)
    if cfg.targets.objective == "params":  # FLOP and latency targets are checked once their
        plan_probes(cfg, loaded, ch)  # cost model is known (objective_step)
    loaded.model.to(ch.device)
    data = data_step(cfg, loaded, ch)
    check_latency_batch(loaded.model, cfg.timing.latency_batch_size, ch.latency_dtype,
                        data.seq_len or 128)  # a timing batch too large: named before pruning
    objective_step(cfg, loaded, ch, data.seq_len)
    check_budget(cfg, loaded, data)
    evaluator = Evaluator(cfg, loaded, data, ch)
    if len(cfg.targets.targets) > 1:
        from .tradeoff import sweep_run
        return sweep_run(cfg, argv, loaded, data, ch, evaluator, outputs)
    search = None
    if cfg.budget:  # chosen on one half of the evaluation inputs, reported on the other
        from .tradeoff import budget_search, evaluation_count, split_evaluation
        halves = split_evaluation(data)
        chosen_on = halves[0] if halves else data
        search = budget_search(cfg, argv, loaded, chosen_on, ch,
                               Evaluator(cfg, loaded, chosen_on, ch) if halves else evaluator,
                               outputs)
        if halves:
            data, evaluator = halves[1], Evaluator(cfg, loaded, halves[1], ch)
            search.report_inputs = evaluation_count(data)
        cfg = cfg.with_target(search.search.target)
    elif ch.objective == "latency" and not cfg.recovery.resume:
        from .tradeoff import latency_run  # planned, timed, corrected once if it misses
        search = latency_run(cfg, loaded, data, ch, evaluator)
    stages, snapshots, result, distilled = prune_step(cfg, loaded, data, ch, evaluator, search)
    latency = latency_step(cfg, loaded, data, ch, stages, snapshots)
    del snapshots
    try:  # every output is written beside its place, then all renamed into place
        artifacts = save_step(cfg, loaded, data, ch, outputs)
        rep = build_report(cfg, argv, loaded, data, ch, stages, result, latency, artifacts,
                           distilled)
        if search is not None:
            add_search(cfg, rep, search, outputs, stages[0].top1)
    except OSError as exc:
        raise write_error(exc) from exc
    write_outputs(cfg, rep, outputs)
    if cfg.recovery.checkpoint_every or cfg.recovery.resume:  # the run is whole: its
        saved.remove()  # checkpoint is spent
    print_summary(cfg, rep, stages, result, outputs.by_role("json").path,
                  outputs.by_role("md").path)
    return LATENCY_MISSED if rep["objective"].get("missed") and not cfg.timing.accept_latency_miss else 0


def add_search(cfg: RunConfig, rep: dict, search, outputs, base_top1) -> None:
    """A latency target's attempts, or a budget search's section and trade-off plot, in `rep`."""
    if not cfg.budget:  # a --target-latency run
        rep["objective"]["attempts"] = [t.measures for t in search.search.trials]
        return
    from ..report import tradeoff_plot
    from .tradeoff import search_section
    rep["budget_search"] = section = search_section(cfg, search)
    b = {"flag": section["budget"], "value": section["value"], "measure": section["measure"]}
    tradeoff_plot(section["points"], outputs.stage("tradeoff"), b, section["chosen"], base_top1,
                  f"{rep['run_id']}: budget {b['flag']} {b['value']:g}")
    rep["artifacts"]["tradeoff_plot"] = str(outputs.by_role("tradeoff").path)


def helper_run(cfg: RunConfig, run_id: str) -> int:
    """A process other than the main one under a launcher: the same loading, data and pruning
    (so the plan is the same everywhere, which distillation checks), its share of the
    distillation, and nothing written."""
    loaded = load_step(cfg)
    ch = choose(cfg, loaded, run_id)
    loaded.model.to(ch.device)
    data = data_step(cfg, loaded, ch)
    objective_step(cfg, loaded, ch, data.seq_len)
    prune_step(cfg, loaded, data, ch, Evaluator(cfg, loaded, data, ch))
    return 0


def run_outputs(cfg: RunConfig, run_id: str):
    """Every file and folder this run will write, with the flag that places it (the JSON
    report last: its presence means the rest is there)."""
    from ..outputs import Output, RunOutputs
    outs = []
    if cfg.output.save_pruned_model or cfg.output.export_onnx:
        outs.append(Output("model", Path(cfg.output.pruned_output_dir) / run_id,
                           "--pruned-output-dir", True))
    if cfg.head.save_adapter:
        outs.append(Output("adapter", Path(cfg.output.artifacts_dir) / run_id / "adapter.pt",
                           "--artifacts-dir"))
    if cfg.budget:  # the search's trade-off plot beside the stages' plot
        outs.append(Output("tradeoff", Path(cfg.output.reports_dir) / f"report-{run_id}.tradeoff.png",
                           "--reports-dir"))
    outs += [Output(kind, Path(cfg.output.reports_dir) / f"report-{run_id}.{kind}", "--reports-dir")
             for kind in ("png", "md", "json")]
    return RunOutputs(run_id, outs)
