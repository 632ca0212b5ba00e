// #/sweeps/<id>: the Pareto plot (the sweep's pareto.svg, once every job is final) and the
// table of its jobs, refreshed until the plot is there.

import { apiFetch, getJson, saveDownload } from "../api.js";
import { badge, errorText, fill, h, noticeLine, poll, table } from "../dom.js";
import * as format from "../format.js";

const REFRESH_MS = 3000;
const PLOT = "pareto.svg";
const REPORT = "report.html";
const ACCURACY = { student_top1: "Student top-1", agreement: "Agreement" };

export async function render(view, { signal, params: [sweepId] }) {
  const path = `v1/sweeps/${encodeURIComponent(sweepId)}`;
  const notice = noticeLine();
  const head = h("div", { class: "page-head" });
  const counts = h("p", { class: "muted" });
  const plot = h("figure", { id: "pareto", class: "card plot" });
  const rows = h("section", { class: "card", id: "sweep-rows" });
  view.append(head, counts, notice, h("div", { class: "sweep-layout" }, plot, rows));
  let plotUrl = null; // the object URL of the shown pareto.svg, revoked when the page goes
  signal.addEventListener("abort", () => plotUrl && URL.revokeObjectURL(plotUrl));

  async function showPlot(sweep) {
    if (plotUrl) return;
    const artifact = sweep.artifacts.find((a) => a.name === PLOT);
    if (!artifact) {
      const final = sweep.rows.filter((row) => format.FINAL.has(row.status)).length;
      fill(
        plot,
        h(
          "p",
          { class: "plot-waiting muted", id: "plot-waiting" },
          "The Pareto plot comes when every job is final " +
            `(${final} of ${sweep.rows.length} so far).`,
        ),
      );
      return;
    }
    // The key goes in a header, so the image is fetched and shown from a blob: an <img>
    // never runs an SVG's scripts, and no markup of the server's enters the page.
    const blob = await (await apiFetch(`${path}/artifacts/${PLOT}`, { signal })).blob();
    plotUrl = URL.createObjectURL(blob);
    const image = h("img", {
      src: plotUrl,
      alt: "Packed size against accuracy, one point per configuration; the Pareto front drawn",
    });
    const reportNote = h("span", { class: "muted small" });
    const report = sweep.artifacts.find((a) => a.name === REPORT);
    const reportButton = report
      ? h(
          "button",
          { type: "button", class: "small", onclick: () => saveReport(report, reportNote) },
          "Download report.html",
        )
      : null;
    fill(plot, image, h("figcaption", {}, reportButton, " ", reportNote));
  }

  async function saveReport(report, note) {
    try {
      note.textContent =
        (await saveDownload(`${path}/artifacts/${REPORT}`, REPORT, report.sha256)) === "checked"
          ? "saved; SHA-256 checked"
          : "saved";
    } catch (error) {
      note.textContent = errorText(error);
    }
  }

  await poll(
    signal,
    REFRESH_MS,
    async () => {
      const sweep = await getJson(path, { signal });
      fill(
        head,
        h(
          "h1",
          {},
          "Sweep ",
          h("span", { class: "mono", title: sweep.id }, format.shortId(sweep.id)),
        ),
        badge(sweep.status),
      );
      const c = sweep.counts;
      counts.textContent =
        `${sweep.rows.length} configurations: ${c.succeeded ?? 0} succeeded, ` +
        `${c.failed ?? 0} failed, ${c.canceled ?? 0} canceled, ${c.running ?? 0} running, ` +
        `${c.queued ?? 0} queued \u00b7 created ${format.age(sweep.created_at)}`;
      fill(rows, sweepTable(sweep));
      await showPlot(sweep);
      return !plotUrl || sweep.status === "running"; // stop once final with its plot
    },
    notice,
  );
}

function sweepTable(sweep) {
  const rows = table(
    [
      ["Configuration"],
      ["Status"],
      [ACCURACY[sweep.pareto_metric] ?? "Accuracy", "num"],
      ["Packed size", "num"],
      ["int8 latency", "num"],
      ["Pareto"],
    ],
    { id: "sweep-table" },
  );
  fill(
    rows.body,
    sweep.rows.map((row) =>
      h(
        "tr",
        { class: row.job_id === sweep.recommended_job_id ? "recommended" : null },
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(row.job_id)}` }, row.label)),
        h(
          "td",
          {},
          badge(row.status),
          row.error
            ? h("div", { class: "bad small" }, `${row.error.message} (${row.error.code})`)
            : null,
        ),
        h("td", { class: "num" }, format.percent(row[sweep.pareto_metric])),
        h("td", { class: "num" }, format.bytes(row.packed_bytes)),
        h(
          "td",
          {
            class: "num",
            title: "model_qdq_cpu.onnx under OpenVINO, batch 1, on the worker's CPU",
          },
          format.milliseconds(row.int8_latency_ms),
        ),
        h("td", {}, paretoMark(row, sweep)),
      ),
    ),
  );
  return [
    h(
      "h2",
      {},
      "Jobs ",
      h(
        "span",
        { class: "muted small" },
        `accuracy: ${ACCURACY[sweep.pareto_metric] ?? sweep.pareto_metric}`,
      ),
    ),
    h("div", { class: "scroll" }, rows.element),
    h(
      "p",
      { class: "muted small" },
      "\u25cf front: no other job is both smaller and more accurate. " +
        "\u2605 recommended: the smallest front job within 1 point of the best accuracy.",
    ),
  ];
}

/** The row's place on the front: recommended (always a front row), on the front, or neither. */
function paretoMark(row, sweep) {
  if (row.job_id === sweep.recommended_job_id)
    return h("span", { class: "ok" }, "\u2605 recommended");
  return row.pareto
    ? h("span", { class: "front", title: "on the Pareto front" }, "\u25cf front")
    : "";
}
