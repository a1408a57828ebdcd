"""--dry-run: the plan a run would make, printed; nothing pruned, nothing written."""
from __future__ import annotations

from ..config import BUDGETS, OBJECTIVE_FLAGS, RunConfig
from .choices import Choices, data_free
from .loading import Loaded


def print_dry_run(cfg: RunConfig, loaded: Loaded, ch: Choices, target: float, probes: dict) -> None:
    """Show the plan of each depth unit as the pipeline makes it without calibration data, and
    what it predicts (a scratch copy pruned by that same pipeline: parameters and FLOPs
    counted); the model is untouched."""
    from ..anatomy import resolve
    from ..measure import count_flops
    model, shape = loaded.model, loaded.shape
    flops = count_flops(model)
    searched, data = _searched(cfg, loaded), _has_data(cfg, loaded)
    if searched:
        print("dry run: the plan without calibration data (weight-proxy depth units, 2SSP alpha "
              "split); the run searches the split on calibration data and may choose another "
              "depth count and other units")
    elif data:
        print("dry run: the plan without calibration data (weight-proxy depth units); the run "
              "chooses the units on calibration data, so they may differ")
    print(f"model {loaded.model_id}: {shape.num_blocks} blocks, hidden {shape.hidden_size}, MLP "
          f"{max(shape.widths)}, {shape.total_params:,} parameters, {flops / 1e9:.4f} GFLOPs per "
          f"{'sentence of 128 tokens' if resolve(model).is_text else 'image'}")
    print(f"target {target}: min_remaining {ch.min_remaining} ({ch.min_remaining_source}); "
          f"MLP widths aligned to multiples of {ch.align} ({ch.align_source}); width policy "
          f"{ch.width_policy}; split "
          + ("searched on calibration data when pruning (shown: 2SSP alpha formula)" if searched
             else cfg.pruning.split))
    for unit, plan in probes.items():
        pred_params, pred_flops = _predicted(cfg, loaded, ch, target, unit)
        _print_unit(cfg, ch, shape, unit, plan, data and cfg.pruning.stage == "both")
        if ch.objective != "params":
            what = "FLOPs" if ch.objective == "flops" else "latency"
            print(f"[{unit}] {OBJECTIVE_FLAGS[ch.objective]} {1 - target:g}: predicted {what} "
                  f"ratio {1 - plan.predicted_sparsity:.4f}; parameters {pred_params:,} "
                  f"({pred_params / shape.total_params:.3f}x), FLOPs {pred_flops / 1e9:.4f} G "
                  f"({pred_flops / flops:.3f}x); smallest reachable {what} ratio "
                  f"{1 - plan.max_feasible_target:.4f}")
            if ch.latency_model is not None:
                _print_latency_model(unit, ch.latency_model)
            continue
        print(f"[{unit}] predicted parameters {plan.params_after:,} (sparsity "
              f"{plan.predicted_sparsity:.5f}, error {plan.target_error:.2e} = "
              f"{100 * plan.target_error:.3f} pp; align {plan.align}), FLOPs "
              f"{pred_flops / 1e9:.4f} G ({pred_flops / flops:.3f}x); max feasible target "
              f"{plan.max_feasible_target:.4f}")
        for note in plan.notes:
            print(f"[{unit}] note: {note}")


def _has_data(cfg: RunConfig, loaded: Loaded) -> bool:
    """Whether the run would have calibration data (images or sentences)."""
    return bool(loaded.text or cfg.data.dataset or cfg.data.load_cifar or cfg.model == "embedded")


def _searched(cfg: RunConfig, loaded: Loaded) -> bool:
    """Whether the run would search the split on calibration data (so may differ from the
    data-free plan shown)."""
    return _has_data(cfg, loaded) and cfg.pruning.split == "auto" and cfg.pruning.stage == "both"


def _predicted(cfg: RunConfig, loaded: Loaded, ch: Choices, target: float, unit: str
               ) -> tuple[int, int]:
    """(parameters, FLOPs) of a scratch copy pruned by the pipeline without data, as previewed."""
    import copy

    from ..measure import count_flops, count_total_params
    from ..pipeline import Pruner
    scratch, _ = Pruner(loaded.model, None, data_free(cfg, ch, unit)).prune(
        target, copy.deepcopy(loaded.model))
    return count_total_params(scratch), count_flops(scratch)


def _print_unit(cfg: RunConfig, ch: Choices, shape, unit: str, plan, data: bool) -> None:
    """The depth units, heads and MLP widths of one unit's plan (`data`: the run calibrates
    both stages, so --heads auto will try heads)."""
    mixed = (f" and the attention sublayers of {len(plan.attention_indices)} kept blocks "
             f"(the target lies between two counts of whole blocks; --no-mixed-depth: blocks "
             f"only)" if plan.attention_indices else "")
    print(f"[{unit}] remove {plan.blocks_to_prune} {unit} unit(s){mixed}: "
          f"{list(plan.depth_indices)}" + (f" + attention {list(plan.attention_indices)}"
                                           if plan.attention_indices else "")
          + " (by the weight proxy here; chosen from calibration data when pruning)")
    gone = set(plan.depth_indices) if unit == "block" else set()
    widths = ["removed" if i in gone else str(w - n)
              for i, (w, n) in enumerate(zip(shape.widths, plan.neurons_to_prune))]
    auto_heads = (cfg.pruning.heads == "auto" and data and shape.head_params is not None
                  and ch.objective == "params")  # the run may add heads to this plan
    if plan.removes_heads:  # a block or attention sublayer removed takes its heads along
        no_attention = set(plan.depth_indices) | set(plan.attention_indices)
        kept = ["removed" if i in no_attention else str(n - r) for i, (n, r) in
                enumerate(zip(shape.heads, plan.heads_to_prune))]
        print(f"[{unit}] attention heads after stage 1: {', '.join(kept)} (--heads "
              f"{cfg.pruning.heads}; chosen by weight magnitude here, on calibration data when pruning)")
    elif auto_heads:
        print(f"[{unit}] attention heads: all kept here; with --heads auto the run also tries "
              f"removing the cheapest heads on calibration data")
    why = ("attention sublayers are removed" if unit == "attention" or plan.attention_indices else
           "attention heads are removed" if plan.removes_heads else
           "it has an adapter head" if cfg.head.use_adapter or cfg.head.load_adapter else None)
    print(f"[{unit}] MLP widths after stage 1: {', '.join(widths)}"
          + ("" if plan.uniform_width is None else
             f" (one width, {plan.uniform_width}: plain transformers model"
             + (", unless the run removes heads)" if auto_heads else ")") if why is None else
             f" (one width, {plan.uniform_width}; saved with its modeling file, as {why})"))


def _print_latency_model(unit: str, lm) -> None:
    print(f"[{unit}] latency model ({lm.device}, {lm.dtype}, batch {lm.batch_size}): "
          f"{1e3 * lm.total_s:.3f} ms per forward, {1e3 * lm.fixed_s:.3f} ms outside "
          f"the blocks, a block {1e3 * lm.blocks[0].at(lm.widths[0]):.3f} ms "
          f"(attention {1e3 * lm.blocks[0].attention_s:.3f} ms, "
          f"{1e6 * lm.blocks[0].slope_s:.3f} us per MLP neuron)")


def print_budget_dry_run(cfg: RunConfig, loaded: Loaded, ch: Choices) -> None:
    """A budget run's dry run: the range its search prunes over."""
    from ..pipeline import Pruner
    from ..sweep import grid_start
    flag, value, step = BUDGETS[cfg.budget[0]], cfg.budget[1], cfg.targets.target_resolution
    pruner = Pruner(loaded.model, None, data_free(cfg, ch))
    top = pruner.max_target()
    first = grid_start(pruner.min_target(), step)
    print(f"budget {flag} {value:g}: the run searches targets {first:g} to "
          f"{top:.4f} in steps of {step:g} by bisection (pruning each tried "
          f"target, measuring it on the evaluation inputs), then goes on with the largest that "
          f"keeps the budget")
