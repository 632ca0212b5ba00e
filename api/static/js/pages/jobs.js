// #/jobs: the newest jobs, refreshed every few seconds.

import { getJson } from "../api.js";
import { badge, fill, h, noticeLine, poll, table } from "../dom.js";
import * as format from "../format.js";

const LIMIT = 50;
const REFRESH_MS = 3000;
const COLUMNS = [
  ["Job"],
  ["Status"],
  ["Bits"],
  ["Method"],
  ["Agreement", "num"],
  ["Student top-1", "num"],
  ["Packed size", "num"],
  ["Age", "num"],
  ["Duration", "num"],
];

/** The status cell: the badge, and where a running job is (stage, percent of its steps). */
export function statusCell(job) {
  const where = [];
  if (job.status === "running" && job.stage) where.push(job.stage);
  const progress = job.progress;
  if (job.status === "running" && job.stage === "training" && progress?.total_steps) {
    where.push(format.percent(progress.step / progress.total_steps, 0));
  }
  if (job.cancel_requested && !format.FINAL.has(job.status)) where.push("cancel requested");
  return h(
    "td",
    {},
    badge(job.status),
    where.length ? h("span", { class: "muted" }, ` ${where.join(" \u00b7 ")}`) : null,
  );
}

function jobRow(job) {
  const metrics = job.metrics ?? {};
  // A sweep's jobs carry its id in their metadata too: the sweep link says it.
  const metadata = Object.entries(job.metadata ?? {})
    .filter(([key, value]) => !(key === "sweep_id" && value === job.sweep_id))
    .map(([key, value]) => `${key}=${value}`);
  return h(
    "tr",
    {},
    h(
      "td",
      {},
      h(
        "a",
        { href: `#/jobs/${encodeURIComponent(job.id)}`, title: job.id, class: "mono" },
        format.shortId(job.id),
      ),
      job.sweep_id
        ? h("a", { class: "tag", href: `#/sweeps/${encodeURIComponent(job.sweep_id)}` }, "sweep")
        : null,
      metadata.length
        ? h(
            "div",
            { class: "muted small ellipsis", title: metadata.join(", ") },
            metadata.join(", "),
          )
        : null,
    ),
    statusCell(job),
    h("td", { class: "mono" }, format.bits(job.config)),
    h("td", {}, job.config?.method ?? format.NONE),
    h("td", { class: "num" }, format.percent(metrics.agreement)),
    h("td", { class: "num" }, format.percent(metrics.student_top1)),
    h("td", { class: "num" }, format.bytes(metrics.packed_bytes)),
    h("td", { class: "num", title: format.timestamp(job.created_at) }, format.age(job.created_at)),
    h("td", { class: "num" }, format.jobDuration(job)),
  );
}

export async function render(view, { signal }) {
  const notice = noticeLine();
  const jobs = table(COLUMNS, { id: "jobs-table" });
  const footnote = h("p", { class: "muted small" });
  view.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Jobs"),
      h("a", { class: "button", href: "#/new" }, "New job"),
    ),
    notice,
    h("div", { class: "card flush" }, jobs.element),
    footnote,
  );
  await poll(
    signal,
    REFRESH_MS,
    async () => {
      const page = await getJson(`v1/jobs?limit=${LIMIT}`, { signal });
      const empty = h(
        "tr",
        {},
        h(
          "td",
          { colspan: COLUMNS.length, class: "muted" },
          "No jobs yet: start one with New job.",
        ),
      );
      fill(jobs.body, page.items.length ? page.items.map(jobRow) : empty);
      footnote.textContent = page.next_cursor
        ? `The ${LIMIT} newest jobs; refreshed every few seconds.`
        : "Refreshed every few seconds.";
    },
    notice,
  );
}
