"""What a plot can be checked for without a person: every point inside its axis limits, no
fraction axis reading past 1, every text inside the figure, the asked latency drawn. (Each plot
is also looked at before a change to it is committed.)"""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from vit_pruning.report import stage_figure, tradeoff_figure  # noqa: E402

STAGES = [
    {"name": "baseline", "params": 678634, "top1": 0.9861, "cosine": None, "latency_ratio": 1.0,
     "latency_ratio_iqr": [1.0, 1.0]},
    {"name": "stage1", "params": 474826, "top1": 0.9833, "cosine": None, "latency_ratio": 0.78,
     "latency_ratio_iqr": [0.55, 1.66], "latency_noisy": True},
    {"name": "stage2", "params": 339054, "top1": 0.9861, "cosine": None, "latency_ratio": 0.61,
     "latency_ratio_iqr": [0.58, 0.64]},
    {"name": "distilled", "params": 339054, "top1": 0.9889, "cosine": None, "latency_ratio": 0.62,
     "latency_ratio_iqr": [0.59, 0.65]}]
POINTS = [{"target": t, "params_ratio": 1 - t, "latency_ratio": r, "latency_ratio_iqr": [r - 0.1, r + 2.5],
           "latency_noisy": r > 1, "top1": a, "kl": k}
          for t, r, a, k in ((0.1, 1.678, 0.9861, 7e-6), (0.2, 0.82, 0.9861, 2e-5),
                             (0.3, 0.71, 0.9833, 7e-5), (0.4, 0.90, 0.9833, 3e-4))]


def check(fig) -> None:
    fig.canvas.draw()
    box = fig.bbox
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        for line in ax.get_lines():
            if line.get_transform() is not ax.transData:  # drawn across (axvline, axhline)
                continue
            ys = [y for y in line.get_ydata() if y is not None]
            if ax.get_yscale() == "linear" and "top-1" in (ax.get_ylabel() + ax.get_title()):
                assert hi <= 1.0 + 0.03 * (hi - lo), "a fraction axis reads past 1"
            assert all(lo <= y <= hi for y in ys), (ax.get_title(), ys, (lo, hi))
        for text in [*ax.texts, ax.title]:
            if text.get_text():
                ext = text.get_window_extent(renderer)
                assert box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1, text.get_text()
                assert box.y0 - 1 <= ext.y0 and ext.y1 <= box.y1 + 1, text.get_text()
    for text in fig.texts:
        ext = text.get_window_extent(renderer)
        assert box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1, text.get_text()


@pytest.mark.parametrize("losses", [None, [1.0 / (i + 1) for i in range(30)]])
def test_the_stage_plot_keeps_its_data_and_labels_inside(losses):
    fig = stage_figure(STAGES, losses, kept_step=30 if losses else None, asked_latency=0.7)
    check(fig)
    latency = fig.axes[1]
    assert any(abs(line.get_ydata()[0] - 0.7) < 1e-9 for line in latency.get_lines()
               if len(line.get_ydata()) == 2)  # the asked ratio drawn across
    assert any(t.get_text().endswith("?") for t in latency.texts)  # the noisy ratio marked
    if losses:
        assert fig.axes[-1].get_ylabel() and fig.axes[-1].get_legend() is not None


@pytest.mark.parametrize("budget", [None, {"flag": "--max-kl", "value": 1e-4, "measure": "kl"}])
def test_the_tradeoff_plot_keeps_its_data_and_labels_inside(budget):
    fig, bottom = tradeoff_figure(POINTS, budget, chosen=0.3 if budget else None)
    check(fig)
    first = fig.axes[0]
    xs = list(first.get_lines()[0].get_xdata())
    assert xs == sorted(xs)  # joined along the axis, not in target order
    assert fig.legends or budget is None  # the legend sits below the panels, over no point


def test_a_noisy_ratio_is_marked_in_the_same_line_and_cell():
    from vit_pruning.report import _ratio_text, point_line
    stage = {**STAGES[1]}
    assert _ratio_text(stage).startswith("0.780 (noisy) [")
    assert "(noisy)" not in _ratio_text(STAGES[2])
    point = {**POINTS[0], "params": 600000, "flops_ratio": 0.9, "achieved_sparsity": 0.1,
             "top1_drop_pp": 0.0, "cosine": None}
    assert "latency ratio 1.678 (noisy) [" in point_line(point)


@pytest.mark.parametrize("losses", [None, [1.0 / (i + 1) for i in range(30)]])
def test_the_stage_plot_shows_what_each_block_keeps(losses):
    plan = {"kept_widths": [232, 232, 0, 0, 236, 236], "neurons_removed_per_block": [152, 152, 0, 0, 148, 148],
            "kept_heads": [4, 4, 0, 0, 2, 3], "heads_to_prune": [0, 0, 0, 0, 2, 1]}
    fig = stage_figure(STAGES, losses, kept_step=30 if losses else None, plan=plan)
    check(fig)
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("kept per block"))
    bars = [round(p.get_height(), 4) for p in panel.patches]
    assert bars == [0.6042, 0.6042, 0.0, 0.0, 0.6146, 0.6146, 1.0, 1.0, 0.0, 0.0, 0.5, 0.75]
    assert panel.get_ylim()[1] < 1.2
    if losses:
        assert fig.axes[-1].get_ylabel() == "loss (log scale)"
