// #/sweeps: the newest sweeps, refreshed every few seconds.

import { getJson } from "../api.js";
import { badge, fill, h, noticeLine, poll, table } from "../dom.js";
import * as format from "../format.js";

const LIMIT = 20;
const REFRESH_MS = 5000;
const COLUMNS = [
  ["Sweep"],
  ["Status"],
  ["Jobs", "num"],
  ["Configurations"],
  ["Recommended"],
  ["Age", "num"],
];

function sweepRow(sweep) {
  const total = sweep.rows.length;
  const final = total - (sweep.counts.queued ?? 0) - (sweep.counts.running ?? 0);
  const recommended = sweep.rows.find((row) => row.job_id === sweep.recommended_job_id);
  const labels = sweep.rows.map((row) => row.label).join(", ");
  return h(
    "tr",
    {},
    h(
      "td",
      {},
      h(
        "a",
        { href: `#/sweeps/${encodeURIComponent(sweep.id)}`, title: sweep.id, class: "mono" },
        format.shortId(sweep.id),
      ),
    ),
    h("td", {}, badge(sweep.status)),
    h(
      "td",
      { class: "num", title: `${final} of ${total} final` },
      `${sweep.counts.succeeded ?? 0} / ${total} succeeded`,
    ),
    h("td", { class: "ellipsis", title: labels }, labels),
    h("td", {}, recommended ? recommended.label : format.NONE),
    h(
      "td",
      { class: "num", title: format.timestamp(sweep.created_at) },
      format.age(sweep.created_at),
    ),
  );
}

export async function render(view, { signal }) {
  const notice = noticeLine();
  const sweeps = table(COLUMNS, { id: "sweeps-table" });
  view.append(
    h("div", { class: "page-head" }, h("h1", {}, "Sweeps")),
    h(
      "p",
      { class: "muted" },
      "A sweep trains one job per configuration and compares their size and accuracy. " +
        "Start one with POST /v1/sweeps, the SDK or the CLI.",
    ),
    notice,
    h("div", { class: "card flush" }, sweeps.element),
  );
  await poll(
    signal,
    REFRESH_MS,
    async () => {
      const page = await getJson(`v1/sweeps?limit=${LIMIT}`, { signal });
      const empty = h(
        "tr",
        {},
        h("td", { colspan: COLUMNS.length, class: "muted" }, "No sweeps yet."),
      );
      fill(sweeps.body, page.items.length ? page.items.map(sweepRow) : empty);
    },
    notice,
  );
}
