"""vit_pruning: Two-Stage Structured Pruning (2SSP) of Hugging Face Vision Transformers.

Stage 1 removes MLP hidden neurons in every block, stage 2 removes whole blocks or attention
sublayers; a planner splits one global parameter-sparsity target between them exactly.
"""
from .anatomy import Anatomy, BlockParts, _get_encoder, resolve
from .depth import prune_vit_attention_blocks, select_depth
from .measure import (collect_outputs, compute_actual_sparsity, count_block_params, count_flops,
                      count_total_params, evaluate_top1, interleaved_latency, kl_divergence,
                      measure_latency)
from .distillation import DistillConfig, DistillResult, DistillState, distill, pruned_layers
from .export import export_onnx
from .heads import load_adapter, save_cifar_adapter
from .persistence import SavedModel, check_saved_folder, load_pruned_model, save_pruned_model
from .pipeline import PruneConfig, PruneResult, Pruner, model_shape, plan_2ssp_allocation, prune_2ssp
from .objective import LatencyModel, measure_latency_model
from .planner import ModelShape, PruningPlan
from .report import save_report
from .sweep import SearchResult, search_target, sweep
from .width import prune_vit_mlp_width

from ._version import __version__  # noqa: E402

__all__ = [
    "Anatomy", "BlockParts", "ModelShape", "PruneConfig", "PruneResult", "PruningPlan",
    "_get_encoder", "collect_outputs", "compute_actual_sparsity", "count_block_params",
    "count_flops", "count_total_params", "evaluate_top1", "kl_divergence", "load_pruned_model",
    "measure_latency", "save_pruned_model", "SavedModel", "check_saved_folder", "export_onnx",
    "load_adapter", "save_cifar_adapter", "save_report", "interleaved_latency", "distill",
    "DistillResult", "DistillConfig", "DistillState", "LatencyModel", "measure_latency_model",
    "pruned_layers", "Pruner", "sweep", "search_target", "SearchResult",
    "model_shape", "plan_2ssp_allocation", "prune_2ssp", "prune_vit_attention_blocks",
    "prune_vit_mlp_width", "resolve", "select_depth",
]
