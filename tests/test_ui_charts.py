"""The charts panel: buffers, smoothing, live points, store loading, x-axes, exports, pixels."""

import csv
import math

import numpy as np
import pytest

from studio.core import store
from studio.ui.charting import EmaCache, GrowingArray, RunData, ema, peak_decimate, run_colour

pytest.importorskip("pytestqt")

from PySide6.QtGui import QColor, QImage  # noqa: E402

from studio.ui.panels.charts import EMPTY_TEXT, ChartsPanel  # noqa: E402

T0 = 1_700_000_000.0


def dpo_records(n, start=1):
    return [{"step": s, "time": T0 + 2.0 * (s - 1), "loss": 0.7 - 0.01 * s, "rewards/chosen": 0.02 * s,
             "rewards/rejected": -0.01 * s, "rewards/margins": 0.03 * s, "rewards/accuracies": 0.5,
             "logps/chosen": -40.0, "logps/rejected": -45.0, "tokens_per_second": 900.0 + s,
             "samples_seen": 8 * s, "step_seconds": 0.5}
            for s in range(start, start + n)]


def ppo_records(n):
    return [{"step": s, "time": T0 + 100 + 3.0 * (s - 1), "objective/kl": 0.05 * s,
             "objective/rlhf_reward": 0.1 * s, "objective/entropy": 2.0, "loss/policy_avg": -0.01,
             "tokens_per_second": 500.0}
            for s in range(1, n + 1)]


@pytest.fixture
def chart_project(tmp_path):
    project = store.Project.create(tmp_path / "charts", base_model={"kind": "demo"})
    yield project
    project.close()


@pytest.fixture
def panel(qtbot):
    panel = ChartsPanel()
    qtbot.addWidget(panel)
    panel.resize(1000, 800)
    yield panel
    panel.set_project(None)


def write_run(project, method, config, records, name=None):
    run_id = store.create_run(project.db, method, config, name=name)
    store.write_metrics(project.db, run_id, records)
    return run_id


def xy(panel, metric, run_id):
    curve = panel.chart(metric).curves[run_id]
    return curve.x, curve.raw


# --- pure helpers ---

def test_growing_array_doubles_and_keeps_values():
    array = GrowingArray(capacity=4)
    for value in range(10):
        array.append(value)
    array.extend([10.0, 11.0])
    assert len(array) == 12 and array.capacity >= 12
    assert array.data.tolist() == [float(v) for v in range(12)]
    array.truncate(3)
    assert array.data.tolist() == [0.0, 1.0, 2.0]


def test_ema_matches_a_hand_computation_and_is_incremental():
    # weight 0.5: last = 0.5, 1.25, 2.125; debiased by 1 - 0.5**t = 0.5, 0.75, 0.875
    smoothed, _, _ = ema(np.array([1.0, 2.0, 3.0]), 0.5)
    assert np.allclose(smoothed, [1.0, 1.25 / 0.75, 2.125 / 0.875])
    values = np.random.default_rng(0).normal(size=1000)
    whole, _, _ = ema(values, 0.9)
    head, last, count = ema(values[:333], 0.9)
    tail, _, _ = ema(values[333:], 0.9, last, count)
    assert np.allclose(np.concatenate([head, tail]), whole)
    cache = EmaCache()  # NaN (a step that did not log the metric) is skipped, not propagated
    out = cache.smooth(np.array([1.0, math.nan, 2.0, 3.0]), 0.5, revision=0)
    assert np.isnan(out[1]) and np.allclose(out[[0, 2, 3]], smoothed)


def test_peak_decimation_keeps_the_extremes_of_the_visible_points():
    x = np.arange(100_000.0)
    y = np.sin(x / 500.0)
    y[12_345] = 5.0  # a spike must survive
    dx, (dy,) = peak_decimate(x, [y], 10_000.0, 60_000.0, buckets=400)
    assert len(dx) <= 2 * 400 + 2 * 125 and dx[0] <= 10_000 and dx[-1] >= 60_000
    assert dy.max() == 5.0 and dy.min() == pytest.approx(y[10_000:60_001].min())
    small_x, (small_y,) = peak_decimate(x[:50], [y[:50]], 0.0, 49.0, buckets=400)
    assert small_x.tolist() == x[:50].tolist()  # few points: drawn as they are


def test_a_resumed_run_replaces_the_recomputed_steps():
    data = RunData(1)
    for record in dpo_records(5):
        data.append(record)
    data.append({**dpo_records(1, start=4)[0], "loss": 9.0})  # resumed from the step-3 checkpoint
    assert data.steps.data.tolist() == [1, 2, 3, 4]
    assert data.values("loss")[-1] == 9.0 and data.revision == 1


# --- the panel ---

def test_empty_state_until_a_run_is_shown(panel):
    panel.show()
    assert panel.empty_state.isVisible() and panel.empty_state.title.text() == EMPTY_TEXT


def test_live_records_appear_after_the_throttled_redraw(panel, chart_project, qtbot):
    run_id = write_run(chart_project, "dpo", {"beta": 0.1}, [])
    panel.set_project(chart_project.path)
    panel.show_runs([run_id])
    for record in dpo_records(5):
        panel.append_metrics(run_id, record)
    assert panel.chart("loss") is None  # nothing drawn until the timer fires
    qtbot.waitUntil(lambda: panel.chart("loss") is not None and len(xy(panel, "loss", run_id)[0]) == 5)
    for record in dpo_records(3, start=6):
        panel.append_metrics(run_id, record)
    qtbot.waitUntil(lambda: len(xy(panel, "loss", run_id)[0]) == 8)
    assert xy(panel, "loss", run_id)[1][-1] == pytest.approx(0.7 - 0.08)
    qtbot.waitUntil(lambda: len(panel.visible_metrics()) == 10)  # one new chart per tick, then all


def test_show_runs_overlays_a_dpo_and_a_ppo_run_from_the_store(panel, chart_project):
    dpo = write_run(chart_project, "dpo", {"beta": 0.1}, dpo_records(20))
    ppo = write_run(chart_project, "ppo", {}, ppo_records(10))
    panel.set_project(chart_project.path)
    panel.show_runs([dpo, ppo])
    assert set(panel.chart("tokens_per_second").curves) == {dpo, ppo}  # overlaid
    assert set(panel.chart("loss").curves) == {dpo}
    assert set(panel.chart("objective/kl").curves) == {ppo}
    x, y = xy(panel, "objective/rlhf_reward", ppo)
    assert x.tolist() == list(range(1, 11)) and y[-1] == pytest.approx(1.0)
    assert "DPO #1" in panel.legend.text() and "PPO #2" in panel.legend.text()
    assert "clipfrac" not in " ".join(panel.visible_metrics())  # no run logs it: no chart
    panel.show_runs([ppo])  # deselecting drops the DPO curves
    assert panel.chart("loss").curves == {} and set(panel.chart("tokens_per_second").curves) == {ppo}


def test_x_axis_wall_time_samples_and_kl(panel, chart_project):
    dpo = write_run(chart_project, "dpo", {"beta": 0.1}, dpo_records(5))
    ppo = write_run(chart_project, "ppo", {}, ppo_records(4))
    panel.set_project(chart_project.path)
    panel.show_runs([dpo, ppo])
    panel.set_x_axis("wall")
    panel.redraw_now()
    assert xy(panel, "loss", dpo)[0].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]  # seconds since first record
    assert xy(panel, "objective/kl", ppo)[0].tolist() == [0.0, 3.0, 6.0, 9.0]
    panel.set_x_axis("samples")
    panel.redraw_now()
    assert xy(panel, "loss", dpo)[0].tolist() == [8.0, 16.0, 24.0, 32.0, 40.0]
    assert ppo not in panel.chart("tokens_per_second").curves  # the PPO run logs no samples_seen
    assert panel.note.isVisibleTo(panel) and "PPO #2" in panel.note.text()
    panel.set_x_axis("kl")
    panel.redraw_now()
    chosen, rejected = 0.02 * np.arange(1, 6), -0.01 * np.arange(1, 6)
    assert np.allclose(xy(panel, "loss", dpo)[0], (chosen + rejected) / (2 * 0.1))
    assert np.allclose(xy(panel, "objective/entropy", ppo)[0], 0.05 * np.arange(1, 5))
    assert not panel.note.isVisibleTo(panel)


def test_show_runs_adds_live_rows_the_store_has_not_written_yet(panel, chart_project):
    run_id = write_run(chart_project, "dpo", {"beta": 0.1}, dpo_records(10))
    panel.set_project(chart_project.path)
    for record in dpo_records(12):  # live records arrived before the run was selected
        panel.append_metrics(run_id, record)
    panel.show_runs([run_id])
    assert xy(panel, "loss", run_id)[0].tolist() == list(range(1, 13))


def test_smoothed_curve_in_front_of_the_raw_one(panel, chart_project):
    run_id = write_run(chart_project, "dpo", {"beta": 0.1}, dpo_records(4))
    panel.set_project(chart_project.path)
    panel.set_smoothing(0.5)
    panel.show_runs([run_id])
    curve = panel.chart("loss").curves[run_id]
    assert np.allclose(curve.smoothed, ema(curve.raw, 0.5)[0])
    panel.set_smoothing(0.0)
    panel.redraw_now()
    assert panel.chart("loss").curves[run_id].smoothed is None


def test_csv_export_holds_every_shown_run(panel, chart_project, tmp_path):
    a = write_run(chart_project, "dpo", {"beta": 0.1}, dpo_records(3), name="first")
    b = write_run(chart_project, "dpo", {"beta": 0.1}, dpo_records(2), name="second")
    panel.set_project(chart_project.path)
    panel.show_runs([a, b])
    panel.set_x_axis("samples")
    panel.redraw_now()
    assert panel.export_csv("loss", tmp_path / "loss.csv") == 5
    with open(tmp_path / "loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["run", "step", "x", "value"]
    assert rows[1] == ["first", "1", "8.0", repr(0.7 - 0.01)]
    assert [row[0] for row in rows[1:]] == ["first"] * 3 + ["second"] * 2


def test_png_export_writes_an_image(panel, chart_project, tmp_path):
    run_id = write_run(chart_project, "dpo", {"beta": 0.1}, dpo_records(30))
    panel.set_project(chart_project.path)
    panel.show_runs([run_id])
    panel.export_png("loss", tmp_path / "loss.png")
    image = QImage(str(tmp_path / "loss.png"))
    chart = panel.chart("loss").plotItem.sceneBoundingRect()
    assert not image.isNull() and image.width() == int(2 * chart.width()) and image.height() > 100


def test_hover_readout_names_each_run_and_its_value(panel, chart_project):
    run_id = write_run(chart_project, "dpo", {"beta": 0.1}, dpo_records(10))
    panel.set_project(chart_project.path)
    panel.set_smoothing(0.0)
    panel.show_runs([run_id])
    assert "DPO #1: <b>0.65</b> (step 5)" in panel.chart("loss").readout_html(5.2)


def test_only_measured_metrics_are_smoothed_and_the_readout_gives_the_raw_value(panel, chart_project):
    records = dpo_records(10)
    for record in records:
        record["loss"] += 0.05 * (-1) ** record["step"]  # noise, for the smoothing to average
    run_id = write_run(chart_project, "dpo", {"beta": 0.1}, records)
    panel.set_project(chart_project.path)
    panel.set_smoothing(0.5)
    panel.show_runs([run_id])
    assert panel.chart("loss").curves[run_id].smoothed is not None
    assert panel.chart("samples_seen").curves[run_id].smoothed is None  # a counter: shown as logged
    readout = panel.chart("loss").readout_html(5.0)
    smoothed = panel.chart("loss").curves[run_id].smoothed[4]
    assert f"<b>{0.65 - 0.05:.4g}</b> (step 5, smoothed {smoothed:.4g})" in readout


def test_a_single_point_is_drawn_as_a_marker_on_a_readable_x_range(panel, chart_project):
    run_id = write_run(chart_project, "dpo", {"beta": 0.1}, dpo_records(1))
    panel.set_project(chart_project.path)
    panel.show_runs([run_id])
    panel.redraw_now()
    chart = panel.chart("loss")
    assert chart._items[run_id][1].opts["symbol"] == "o"
    (left, right), _ = chart.plotItem.getViewBox().viewRange()
    assert left < 1 < right and right - left > 0.1  # not the 1e-9 wide range whose ticks overlapped

def test_the_plot_area_is_drawn(panel, chart_project, qtbot):
    run_id = write_run(chart_project, "dpo", {"beta": 0.1}, dpo_records(50))
    panel.set_project(chart_project.path)
    panel.show()
    qtbot.waitExposed(panel)
    panel.show_runs([run_id])
    chart = panel.chart("loss")
    image = chart.grab().toImage().convertToFormat(QImage.Format.Format_RGB32)
    pixels = np.frombuffer(image.constBits(), np.uint8).reshape(image.height(), image.bytesPerLine() // 4, 4)
    blue = QColor(run_colour(run_id))
    close = ((abs(pixels[..., 2].astype(int) - blue.red()) < 40) & (abs(pixels[..., 1].astype(int) - blue.green()) < 40)
             & (abs(pixels[..., 0].astype(int) - blue.blue()) < 40))
    assert close.sum() > 100  # the run's colour is on the plot, not just a white frame
