"""One live chart: a metric, every shown run as a curve (a faint raw curve behind a smoothed one).

Its own module so that pyqtgraph (half a second to import) loads when the first chart is built,
after the window's first paint, not when the charts panel's module is imported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyqtgraph as pg
from pyqtgraph.exporters import ImageExporter
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QFileDialog, QGraphicsItem, QSizePolicy, QWidget

from studio.ui.charting import (CHART_HEIGHT, CHART_MIN_WIDTH, METRIC_UNITS, X_AXES, Curve, nearest_index,
                                peak_decimate, run_colour, write_csv)

LEFT_AXIS_WIDTH = 58  # equal widths keep linked plots aligned (setXLink lines views up by pixels)
Y_PADDING = 0.08  # of the y span, above and below: room for new points before a re-range
TEXT_COLOUR = "#333333"


class MetricChart(pg.PlotWidget):
    """One metric, every shown run as a curve (a faint raw curve behind a smoothed one)."""

    hovered = Signal(object)  # x under the mouse, or None when it leaves

    def __init__(self, metric: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent=parent, background="w")
        self.metric_name = ""  # not `metric`: it would shadow QPaintDevice.metric(), and painting crashes
        self.monotonic_x = True
        self.log_y = False
        self._items: dict[int, tuple[pg.PlotDataItem, pg.PlotDataItem]] = {}
        self.curves: dict[int, Curve] = {}  # what the runs logged (hover and CSV read these)
        self._drawn: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}  # what the items were given
        self.setMinimumSize(CHART_MIN_WIDTH - 40, CHART_HEIGHT)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self._style_plot()
        self._cursor = pg.InfiniteLine(angle=90, movable=False,
                                       pen=pg.mkPen("#999999", style=Qt.PenStyle.DashLine))
        self._readout = pg.TextItem(color=TEXT_COLOUR, fill=pg.mkBrush(255, 255, 255, 225),
                                    border=pg.mkPen("#cccccc"))
        for item in (self._cursor, self._readout):
            item.hide()
            self.plotItem.addItem(item, ignoreBounds=True)
        self.scene().sigMouseMoved.connect(self._mouse_moved)
        self._add_export_actions()
        self.set_metric(metric)

    def set_metric(self, metric: str) -> None:
        """Title and y label (a chart is built ahead, before it knows its metric)."""
        self.metric_name = metric
        self.plotItem.setTitle(metric, color=TEXT_COLOUR, size="10pt")
        text, units = METRIC_UNITS.get(metric, ("", None))
        self.plotItem.setLabel("left", text, units=units)

    def _style_plot(self) -> None:
        plot = self.plotItem
        plot.showGrid(x=False, y=True, alpha=0.15)  # horizontal lines only, as W&B draws them
        plot.hideButtons()  # its auto-range button would re-enable x auto-range and fight the link
        for name in ("left", "bottom"):
            axis = plot.getAxis(name)
            axis.setPen(pg.mkPen("#888888"))
            axis.setTextPen(pg.mkPen(TEXT_COLOUR))
            # The grid makes the axis as large as the plot, so every curve update repainted it
            # (labels, grid: ~2 ms a chart). Cached, it is blitted until its ticks change.
            axis.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
        plot.getAxis("left").setWidth(LEFT_AXIS_WIDTH)
        view = plot.getViewBox()
        view.setMouseEnabled(x=True, y=False)  # zoom and pan in x; y follows the visible data
        # No auto-range: the panel sets x for every chart at once, and fit_y keeps the y range while
        # new points fit it (pyqtgraph re-ranges at each new extreme, redrawing the axis each time).
        view.disableAutoRange()
        view.sigXRangeChanged.connect(self._redraw_curves)
        view.sigResized.connect(self._redraw_curves)

    def _add_export_actions(self) -> None:
        menu = self.plotItem.getViewBox().menu
        menu.addSeparator()
        menu.addAction("Export chart as PNG…", self._ask_png)
        menu.addAction("Export chart data as CSV…", self._ask_csv)

    # --- curves ---

    def show_curve(self, curve: Curve, monotonic_x: bool) -> None:
        if curve.run_id not in self._items:
            self._add_items(curve.run_id)
        self.curves[curve.run_id] = curve
        self.monotonic_x = monotonic_x
        self._draw(curve)

    def _draw(self, curve: Curve) -> None:
        """Hand pyqtgraph only what the view shows, peak-decimated to about one point per pixel.

        pyqtgraph's own clipToView and peak downsampling do the same, but scan every point several
        times per setData (finite checks, bounds): ~1.2 ms per 200k-point curve against ~0.4 ms.
        KL, which goes back and forth, is drawn whole.
        """
        raw_item, main_item = self._items[curve.run_id]
        ys = [curve.raw] if curve.smoothed is None else [curve.raw, curve.smoothed]
        x = curve.x
        if self.monotonic_x:
            view = self.plotItem.getViewBox()
            (left, right), _ = view.viewRange()
            x, ys = peak_decimate(curve.x, ys, left, right, buckets=max(int(view.width()), 100))
        self._drawn[curve.run_id] = (x, ys)
        raw_item.setVisible(curve.smoothed is not None)
        if curve.smoothed is not None:
            raw_item.setData(x, ys[0])
        main_item.setData(x, ys[-1])
        main_item.setSymbol("o" if len(x) == 1 else None)  # a lone point has no line to show it
        main_item.setSymbolSize(6)
        main_item.setSymbolBrush(main_item.opts["pen"].color())

    def _redraw_curves(self) -> None:
        """The x range or the size changed: decimate again for it, then fit y to what shows."""
        for curve in self.curves.values():
            self._draw(curve)
        self.fit_y()

    def _add_items(self, run_id: int) -> None:
        colour = QColor(run_colour(run_id))
        faint = QColor(colour)
        faint.setAlpha(60)
        # Width 1 on purpose: Qt strokes wider antialiased pens ~15x slower (80 ms vs 5 ms per paint
        # of 8 curves at 200k points); the faint raw curve sets the smoothed one apart instead.
        raw_item = pg.PlotDataItem(pen=pg.mkPen(faint, width=1), antialias=True)
        main_item = pg.PlotDataItem(pen=pg.mkPen(colour, width=1), antialias=True)
        for item in (raw_item, main_item):
            self.plotItem.addItem(item)
        self._items[run_id] = (raw_item, main_item)

    def set_log_y(self, on: bool) -> None:
        self.log_y = on
        self.plotItem.setLogMode(y=on)
        self.fit_y(force=True)

    def fit_y(self, force: bool = False) -> None:
        """Show every point within the x range; change the y range only when one falls outside it
        or when it has become much larger than needed."""
        bounds = self._visible_y_bounds()
        if bounds is None:
            return
        low, high = bounds
        span = high - low if high > low else max(abs(high), 1.0) * 0.1
        view = self.plotItem.getViewBox()
        _, (bottom, top) = view.viewRange()
        fits = bottom <= low and high <= top
        snug = top - bottom <= (1 + 4 * Y_PADDING) * span
        if force or not (fits and snug):
            view.setYRange(low - Y_PADDING * span, high + Y_PADDING * span, padding=0)

    def _visible_y_bounds(self) -> tuple[float, float] | None:
        (left, right), _ = self.plotItem.getViewBox().viewRange()
        lows, highs = [], []
        for x, ys in self._drawn.values():
            # Decimated curves hold the visible points (with their extremes) and one more each side.
            inside = slice(None) if self.monotonic_x else (x >= left) & (x <= right)
            for y in ys:
                values = y[inside]
                if self.log_y:  # the view holds log10 values; pyqtgraph drops the others
                    values = np.log10(values[values > 0])
                if len(values):
                    lows.append(values.min())
                    highs.append(values.max())
        return (float(min(lows)), float(max(highs))) if lows else None

    def remove_run(self, run_id: int) -> None:
        for item in self._items.pop(run_id, ()):
            self.plotItem.removeItem(item)
        self.curves.pop(run_id, None)
        self._drawn.pop(run_id, None)

    def set_x_label(self, axis: str) -> None:
        text, units = X_AXES[axis]
        self.plotItem.setLabel("bottom", text, units=units)

    # --- hover read-out ---

    def _mouse_moved(self, pos) -> None:
        view = self.plotItem.getViewBox()
        if view.sceneBoundingRect().contains(pos):
            self.hovered.emit(view.mapSceneToView(pos).x())
        else:
            self.hovered.emit(None)

    def leaveEvent(self, event) -> None:
        self.hovered.emit(None)
        super().leaveEvent(event)

    def show_cursor(self, x: float | None, with_readout: bool) -> None:
        """A vertical line at x; with_readout adds each curve's value at x (the hovered chart)."""
        if x is None or not self.curves:
            self._cursor.hide()
            self._readout.hide()
            return
        self._cursor.setPos(x)
        self._cursor.show()
        if not with_readout:
            self._readout.hide()
            return
        self._readout.setHtml(self.readout_html(x))
        (left, right), (_, top) = self.plotItem.getViewBox().viewRange()
        # In the top corner away from the cursor: the whole width is there for the text.
        cursor_on_left = x < (left + right) / 2
        self._readout.setAnchor((1, 0) if cursor_on_left else (0, 0))
        self._readout.setPos(right if cursor_on_left else left, top)
        self._readout.show()

    def readout_html(self, x: float) -> str:
        lines = []
        for curve in self.curves.values():
            i = nearest_index(curve.x, x, self.monotonic_x)
            smoothed = "" if curve.smoothed is None else f", smoothed {curve.smoothed[i]:.4g}"
            lines.append(f'<span style="color:{run_colour(curve.run_id)}">■</span> '
                         f"{curve.run_name}: <b>{curve.raw[i]:.4g}</b> (step {int(curve.steps[i])}{smoothed})")
        return "<br>".join(lines)

    # --- export ---

    def export_png(self, path: Path | str, scale: float = 2.0) -> None:
        """The chart as on screen, `scale` times larger (fonts and lines too, as on a high-DPI screen)."""
        self.show_cursor(None, False)
        axes = [self.plotItem.getAxis(name) for name in ("left", "bottom")]
        for axis in axes:  # a cached axis would be scaled up from its on-screen pixmap, blurred
            axis.setCacheMode(QGraphicsItem.CacheMode.NoCache)
        exporter = ImageExporter(self.plotItem)
        exporter.parameters()["width"] = int(self.plotItem.sceneBoundingRect().width() * scale)
        exporter.export(str(path))
        for axis in axes:
            axis.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)

    def export_csv(self, path: Path | str) -> int:
        return write_csv(path, list(self.curves.values()))

    def _ask_png(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export chart as PNG",
                                              _file_stem(self.metric_name) + ".png", "PNG images (*.png)")
        if path:
            self.export_png(path)

    def _ask_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export chart data as CSV",
                                              _file_stem(self.metric_name) + ".csv", "CSV files (*.csv)")
        if path:
            self.export_csv(path)


def _file_stem(metric: str) -> str:
    return metric.replace("/", "_")
