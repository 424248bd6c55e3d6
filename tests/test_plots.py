"""What the figures of a --vary grid say (study/plots.py), checked on the figure objects."""

import pytest

from dptrain.study import plots


@pytest.fixture
def figures(monkeypatch):
    """The figures `plots` draws, kept open instead of saved."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, plt, out: drawn.append(fig) or out)
    return drawn


def run(mode, nproc, batch, accuracy, **vary):
    return {"mode": mode, "nproc": nproc, "global_batch": batch, "test_accuracy": accuracy,
            "epochs": 3, "vary": {**vary, "batch_size": batch}}


def test_titles_leave_out_what_the_grid_varies():
    row = {"epochs": 3, "global_batch": 4096}
    assert plots.setting(row) == "3 epochs, global batch 4096"
    assert plots.setting(row, ["lr_scaling", "batch_size"]) == "3 epochs"


def test_each_model_gets_its_own_band_and_no_band_no_zoom(figures, tmp_path):
    (tmp_path / "sweep-config.toml").write_text("[optim]\nref_batch_size = 1024\n")
    rows = [run("seq", 1, 1024, 0.94, hidden=[16]), run("seq", 1, 4096, 0.93, hidden=[16]),
            run("seq", 1, 1024, 0.97, hidden=[64]), run("seq", 1, 4096, 0.96, hidden=[64])]
    plots._accuracy_vs_batch(plots._pyplot(), rows, ["hidden", "batch_size"], tmp_path)
    left, zoom = figures[-1].axes
    # Two models at the reference batch: a band below each, not one below their average.
    assert sorted(p.get_label() for p in left.patches) == [
        "within 1 point of its batch 1024 (0.9400)", "within 1 point of its batch 1024 (0.9700)"]
    assert zoom.get_ylim()[0] == pytest.approx(0.94 - 0.04)
    # Without a seq run at the reference batch there is nothing to zoom in on: one panel.
    plots._accuracy_vs_batch(plots._pyplot(), rows[1::2], ["hidden", "batch_size"], tmp_path)
    assert len(figures[-1].axes) == 1


def test_a_line_equal_to_an_earlier_one_is_dashed_and_says_so(figures, tmp_path):
    rows = [run("seq", 1, b, a, lr_scaling=rule) for rule in ("linear", "seed")
            for b, a in ((4096, 0.94), (42000, 0.10))]
    plots._accuracy_vs_batch(plots._pyplot(), rows, ["lr_scaling", "batch_size"], tmp_path)
    linear, seed = figures[-1].axes[0].get_lines()[:2]
    assert linear.get_linestyle() == "-" and seed.get_linestyle() != "-"
    assert seed.get_label() == "lr_scaling=seed (= a line above)"


def test_the_ideal_speedup_never_sets_the_scale():
    fig, ax = plots._pyplot().subplots()
    plots.ideal_line(ax, 8, [0.19, 1.83, None])
    assert ax.get_ylim() == pytest.approx((0, 1.83 * 1.15))
