// Live line charts over training steps (uPlot, vendored; loaded as the global "uPlot").
// Points arrive one event at a time; drawing is batched to one redraw per animation frame.

import { h } from "./dom.js";

const HEIGHT = 200;

export class LiveChart {
  /**
   * A chart in ``container``: ``label`` of the series, ``format`` of its values (axis, readout),
   * ``range(min, max)`` the y-axis range, ``markers`` to draw each point (few points).
   * ``container.dataset.points`` always says how many points are drawn.
   */
  constructor(container, { label, color, format, range, markers = false }) {
    this.container = container;
    this.steps = [];
    this.values = [];
    this.drawPending = false;
    this.empty = h("p", { class: "chart-empty muted" }, "Points appear here while the job trains.");
    this.readout = h("span", { class: "readout muted small" }); // the point under the cursor
    container.dataset.points = "0";
    container.append(this.empty, this.readout);
    this.plot = new globalThis.uPlot(
      {
        width: this.width(),
        height: HEIGHT,
        scales: {
          x: { time: false },
          y: range ? { range: (_u, min, max) => range(min, max) } : {},
        },
        series: [
          { label: "step" },
          {
            label,
            stroke: color,
            width: 2,
            value: (_u, value) => (value === null || value === undefined ? "" : format(value)),
            points: { show: markers, size: 5, fill: color },
          },
        ],
        axes: [
          { label: "training step", labelSize: 20 },
          { values: (_u, ticks) => ticks.map(format), size: 64 },
        ],
        legend: { show: false },
        hooks: {
          setCursor: [
            (u) => {
              const i = u.cursor.idx;
              this.readout.textContent =
                i === null || i === undefined
                  ? ""
                  : `step ${u.data[0][i]}: ${label} ${format(u.data[1][i])}`;
            },
          ],
        },
      },
      [[], []],
      container,
    );
    this.resizer = new ResizeObserver(() =>
      this.plot.setSize({ width: this.width(), height: HEIGHT }),
    );
    this.resizer.observe(container);
  }

  width() {
    return Math.max(240, this.container.clientWidth);
  }

  /** Add a point. A step at or before the last one (a job resumed from a checkpoint after its
   * worker was lost trains those steps again) replaces the points from there on. */
  add(step, value) {
    while (this.steps.length && this.steps[this.steps.length - 1] >= step) {
      this.steps.pop();
      this.values.pop();
    }
    this.steps.push(step);
    this.values.push(value);
    if (this.drawPending) return;
    this.drawPending = true;
    requestAnimationFrame(() => {
      this.drawPending = false;
      this.plot.setData([this.steps, this.values]);
      this.empty.hidden = this.steps.length > 0;
      this.container.dataset.points = String(this.steps.length);
    });
  }

  /** The stream ended: an empty chart says why instead of promising points. */
  finish(emptyMessage) {
    if (!this.steps.length) this.empty.textContent = emptyMessage;
  }

  destroy() {
    this.resizer.disconnect();
    this.plot.destroy();
  }
}
