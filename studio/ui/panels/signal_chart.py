"""A stage advisor card's small chart: the signal's value per checkpoint (or one bar for a base
signal), its firing zone shaded.

Its own module so that pyqtgraph (half a second to import) loads when the first card is drawn,
after the window's first paint, not when the advisor panel's module is imported.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QSizePolicy, QWidget

from studio.core import advisor

from . import MUTED
from .advisor import CHART_HEIGHT, FIRING

QUIET = "#64748b"  # a signal that does not fire: neutral slate, not a verdict colour
ZONE = QColor(198, 40, 40, 38)  # the firing zone of a chart, faint red
PLAIN_KEYS = ("repetition", "refusals", "reward_spread", "kl_per_token", "kl_acceleration", "oscillation")  # else percent


class SignalChart(pg.PlotWidget):
    """A signal's value per checkpoint (or one bar for a base signal), its firing zone shaded."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent=parent, background="w")
        self.setFixedHeight(CHART_HEIGHT)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        plot = self.plotItem
        plot.hideButtons()
        plot.setMenuEnabled(False)
        plot.getViewBox().setMouseEnabled(x=False, y=False)
        plot.showGrid(x=False, y=True, alpha=0.12)
        for name in ("left", "bottom"):
            axis = plot.getAxis(name)
            axis.setPen(pg.mkPen("#9ca3af"))
            axis.setTextPen(pg.mkPen(MUTED))
            axis.setStyle(tickFont=self.font(), hideOverlappingLabels=False)  # marks are spaced below
        plot.getAxis("left").setWidth(40)
        self.drawn: advisor.Signal | None = None

    def show_signal(self, signal: advisor.Signal) -> None:
        """Draw in the card's unit (percent for most signals), so the axis reads like the number."""
        self.drawn = signal
        self.plotItem.clear()
        scale = 1 if signal.key in PLAIN_KEYS else 100
        signal = replace(signal, value=None if signal.value is None else signal.value * scale,
                         threshold=signal.threshold * scale if math.isfinite(signal.threshold) else None,
                         history=[(step, None if v is None else v * scale) for step, v in signal.history])
        if signal.history:
            self._show_history(signal)
        else:
            self._show_gauge(signal)

    def _show_history(self, signal: advisor.Signal) -> None:
        steps = [step for step, _ in signal.history]
        values = [math.nan if value is None else value for _, value in signal.history]
        low, high = value_range([v for v in values if not math.isnan(v)], signal)
        self._shade(signal, low, high, horizontal=True)
        colour = FIRING if signal.fires else QUIET
        self.plotItem.plot(steps, values, pen=pg.mkPen(colour, width=2), symbol="o", symbolSize=6,
                           symbolBrush=colour, symbolPen=None, connect="finite")
        self.plotItem.setXRange(min(steps), max(steps), padding=0.08)
        self.plotItem.setYRange(low, high, padding=0)
        self._label_values("left", signal, [v for v in values if not math.isnan(v)], low, high)
        self.plotItem.getAxis("left").show()

    def _show_gauge(self, signal: advisor.Signal) -> None:
        """A base signal has one value: a horizontal bar against its threshold."""
        values = [] if signal.value is None else [signal.value]
        low, high = value_range(values, signal, floor=0.0)
        self._shade(signal, low, high, horizontal=False)
        if signal.value is not None:
            colour = FIRING if signal.fires else QUIET
            self.plotItem.addItem(pg.BarGraphItem(x0=[0], y=[0], height=[0.5], width=[signal.value],
                                                  brush=colour, pen=None))
        self.plotItem.setXRange(low, high, padding=0)
        self.plotItem.setYRange(-0.6, 0.6, padding=0)
        self._label_values("bottom", signal, values + [0.0], low, high)
        self.plotItem.getAxis("left").hide()

    def _label_values(self, axis: str, signal: advisor.Signal, values: list[float], low: float,
                      high: float) -> None:
        """Tick the threshold(s) and the extreme values only: a small chart cannot hold more labels."""
        thresholds = threshold_lines(signal)
        marks = [t for t in thresholds if low <= t <= high]
        for value in (min(values, default=None), max(values, default=None)):
            if value is not None and all(abs(value - m) > 0.3 * (high - low) for m in marks):
                marks.append(value)
        self.plotItem.getAxis(axis).setTicks([[(m, f"{m:.3g}") for m in sorted(marks)], []])

    def _shade(self, signal: advisor.Signal, low: float, high: float, horizontal: bool) -> None:
        """Shade where the signal fires, and draw its threshold line(s)."""
        t = signal.threshold
        if t is None:  # never fires at this tolerance
            return
        zones = {"above": [(t, high)], "below": [(low, t)], "outside": [(t, high), (low, -t)]}[signal.direction]
        orientation = "horizontal" if horizontal else "vertical"
        for start, end in zones:
            if end > start:
                self.plotItem.addItem(pg.LinearRegionItem((start, end), orientation=orientation,
                                                          movable=False, brush=ZONE, pen=pg.mkPen(None)))
        lines = [t, -t] if signal.direction == "outside" else [t]
        for value in lines:
            self.plotItem.addItem(pg.InfiniteLine(value, angle=0 if horizontal else 90, movable=False,
                                                  pen=pg.mkPen(FIRING, width=1, style=Qt.PenStyle.DashLine)))


def value_range(values: list[float], signal: advisor.Signal, floor: float | None = None) -> tuple[float, float]:
    """A y (or x) range that shows the values and the threshold with some room."""
    points = values + threshold_lines(signal)
    low, high = min(points, default=0.0), max(points, default=1.0)
    if floor is not None:
        low = min(low, floor)
    span = (high - low) or 1.0
    return low - 0.15 * span, high + 0.25 * span


def threshold_lines(signal: advisor.Signal) -> list[float]:
    t = signal.threshold
    if t is None:
        return []
    return [t, -t] if signal.direction == "outside" else [t]
