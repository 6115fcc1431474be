"""A small QPainter line plot for the training loss and validation Dice.

Painting with QPainter keeps napari-muvit free of a plotting dependency (matplotlib would add
tens of MB and its Qt backend fights napari's).  Adding a point only stores it; repaints are
coalesced to at most one per ``REPAINT_MS`` (in a napari window every widget repaint makes Qt
re-compose the OpenGL canvas, which is not free with software OpenGL), and the path is
decimated to at most one point per horizontal pixel when drawn.
"""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, QSize, Qt, QTimer
from qtpy.QtGui import QColor, QFont, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

LOSS_COLOR = QColor(90, 170, 255)
SMOOTH_COLOR = QColor(255, 200, 60)
DICE_COLOR = QColor(120, 220, 120)
AXIS_COLOR = QColor(150, 150, 150)
REPAINT_MS = 200


class LossPlot(QWidget):
    """Loss (left axis, linear, auto-ranged) and validation Dice (right axis, 0..1) per step."""

    def __init__(self, parent: QWidget | None = None, smoothing: float = 0.9) -> None:
        super().__init__(parent)
        self.losses: list[tuple[int, float]] = []
        self.dice: list[tuple[int, float]] = []
        self.total_steps: int | None = None
        self._smoothing = smoothing
        self._smoothed: list[tuple[int, float]] = []
        self._repaint = QTimer(self)
        self._repaint.setSingleShot(True)
        self._repaint.setInterval(REPAINT_MS)
        self._repaint.timeout.connect(self.update)
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.setToolTip("Training loss (blue, smoothed in yellow) and validation Dice (green)")

    def sizeHint(self) -> QSize:
        return QSize(300, 160)

    def clear(self, total_steps: int | None = None) -> None:
        """Forget all points (a new training run)."""
        self.losses.clear()
        self.dice.clear()
        self._smoothed.clear()
        self.total_steps = total_steps
        self.update()

    def add_loss(self, step: int, loss: float) -> None:
        """Append a training-loss point; non-finite losses are kept out of the plot's range."""
        if not math.isfinite(loss):
            return
        self.losses.append((int(step), float(loss)))
        prev = self._smoothed[-1][1] if self._smoothed else loss
        # Exponential moving average: the raw loss of small batches is noisy.
        self._smoothed.append((int(step), self._smoothing * prev + (1 - self._smoothing) * loss))
        self._schedule()

    def add_dice(self, step: int, dice: float) -> None:
        """Append a validation-Dice point (0..1)."""
        if math.isfinite(dice):
            self.dice.append((int(step), float(dice)))
            self._schedule()

    def _schedule(self) -> None:
        if not self._repaint.isActive():
            self._repaint.start()

    # -- drawing -------------------------------------------------------------------------------

    def _plot_rect(self) -> QRectF:
        return QRectF(38.0, 8.0, max(10.0, self.width() - 76.0), max(10.0, self.height() - 30.0))

    def paintEvent(self, event: object) -> None:
        painter = QPainter(self)
        try:
            painter.setRenderHint(QPainter.Antialiasing, True)
            font = QFont(painter.font())
            font.setPointSizeF(max(6.0, font.pointSizeF() * 0.85))
            painter.setFont(font)
            rect = self._plot_rect()
            painter.setPen(QPen(AXIS_COLOR, 1))
            painter.drawRect(rect)
            if not self.losses and not self.dice:
                painter.drawText(rect, Qt.AlignCenter, "no training steps yet")
                return
            last_step = max(
                [s for s, _ in self.losses] + [s for s, _ in self.dice] + [self.total_steps or 1]
            )
            x_max = max(1, last_step)
            values = [v for _, v in self.losses]
            lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
            pad = 0.05 * (hi - lo)
            lo, hi = max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad

            def to_point(step: float, value: float, vlo: float, vhi: float) -> QPointF:
                x = rect.left() + rect.width() * step / x_max
                y = rect.bottom() - rect.height() * (value - vlo) / (vhi - vlo)
                return QPointF(x, y)

            self._draw_series(painter, self.losses, LOSS_COLOR, 1.0, lo, hi, rect, to_point)
            self._draw_series(painter, self._smoothed, SMOOTH_COLOR, 1.6, lo, hi, rect, to_point)
            self._draw_series(painter, self.dice, DICE_COLOR, 1.8, 0.0, 1.0, rect, to_point)
            for step, value in self.dice:
                painter.setBrush(DICE_COLOR)
                painter.drawEllipse(to_point(step, value, 0.0, 1.0), 2.5, 2.5)

            painter.setPen(QPen(AXIS_COLOR, 1))
            metrics = painter.fontMetrics()
            painter.drawText(QPointF(2, rect.top() + metrics.ascent()), f"{hi:.3g}")
            painter.drawText(QPointF(2, rect.bottom()), f"{lo:.3g}")
            painter.drawText(
                QPointF(rect.left(), rect.bottom() + metrics.height()), "0"
            )
            label = f"step {last_step}"
            painter.drawText(
                QPointF(rect.right() - metrics.horizontalAdvance(label),
                        rect.bottom() + metrics.height()),
                label,
            )
            if self.dice:
                painter.setPen(QPen(DICE_COLOR, 1))
                painter.drawText(QPointF(rect.right() + 4, rect.top() + metrics.ascent()), "1")
                painter.drawText(QPointF(rect.right() + 4, rect.bottom()), "0")
                text = f"Dice {self.dice[-1][1]:.3f}"
                painter.drawText(QPointF(rect.right() + 4, rect.center().y()), text)
            if self.losses:
                painter.setPen(QPen(LOSS_COLOR, 1))
                text = f"loss {self.losses[-1][1]:.4g}"
                painter.drawText(QPointF(rect.left() + 4, rect.top() + metrics.ascent()), text)
        finally:
            painter.end()

    @staticmethod
    def _draw_series(painter, series, color, width, lo, hi, rect, to_point) -> None:  # type: ignore[no-untyped-def]
        if len(series) < 1:
            return
        # Decimate to one point per pixel column: drawing 10k segments per repaint is wasteful.
        stride = max(1, len(series) // max(1, int(rect.width())))
        points = series[::stride]
        if points[-1] is not series[-1]:
            points = [*points, series[-1]]
        path = QPainterPath(to_point(points[0][0], points[0][1], lo, hi))
        for step, value in points[1:]:
            path.lineTo(to_point(step, value, lo, hi))
        painter.setPen(QPen(color, width))
        painter.setBrush(Qt.NoBrush)
        painter.drawPath(path)
