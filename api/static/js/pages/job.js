// #/jobs/<id>: one job. Its events stream in over SSE (stages, progress, curve points,
// warnings); the job itself is read again whenever its status changes, for its metrics,
// artifacts and engine builds.

import { getJson, postJson, saveDownload } from "../api.js";
import { LiveChart } from "../charts.js";
import { badge, errorBox, errorText, facts, fill, h, noticeLine, poll, table } from "../dom.js";
import * as format from "../format.js";
import { followJobEvents } from "../sse.js";

const STAGES = ["validating", "calibrating", "training", "evaluating", "exporting"];
const TICK_MS = 1000; // the running stage's clock
const ENGINE_REFRESH_MS = 5000; // engine builds that run after the job succeeded
const FINAL_ENGINE = new Set(["succeeded", "failed"]);
const RUNTIMES = { openvino: "OpenVINO", onnxruntime: "ONNX Runtime" };

export async function render(view, { signal, params: [jobId] }) {
  const path = `v1/jobs/${encodeURIComponent(jobId)}`;
  let job = await getJson(path, { signal });
  // What the events tell between two reads of the job.
  const live = {
    stageSeconds: { ...job.stage_seconds },
    stage: job.stage,
    stageSince: null,
    progress: job.progress,
    notes: [],
  };
  const shownParts = new Map(); // section -> what it shows, so unchanged sections keep their state

  const notice = noticeLine();
  const section = (id, ...children) => h("section", { id, class: "card" }, ...children);
  const parts = {
    head: h("div", { class: "page-head" }),
    summary: h("ul", { class: "summary" }),
    failure: h("div"),
    progress: h("div", { class: "progress-line" }),
    timeline: section("timeline"),
    notes: h("div"),
    metrics: h("div", { id: "metrics", class: "metric-grid" }),
    latency: h("div"),
    artifacts: h("div"),
    engines: h("div"),
  };
  const lossBox = h("div", { class: "chart", id: "loss-chart" });
  const agreementBox = h("div", { class: "chart", id: "agreement-chart" });
  const streamState = h("span", { class: "muted small", id: "stream-state" });
  view.append(
    parts.head,
    parts.summary,
    notice,
    parts.failure,
    parts.progress,
    parts.timeline,
    h(
      "div",
      { class: "charts" },
      section("loss", h("h2", {}, "Distillation loss ", streamState), lossBox),
      section(
        "agreement",
        h(
          "h2",
          {},
          "Agreement with the teacher ",
          h("span", { class: "muted small" }, "on the probe images"),
        ),
        agreementBox,
      ),
    ),
    parts.notes,
    parts.metrics,
    parts.latency,
    parts.artifacts,
    parts.engines,
  );
  const loss = new LiveChart(lossBox, { label: "loss", color: "#1d4ed8", format: format.compact });
  const agreement = new LiveChart(agreementBox, {
    label: "agreement",
    color: "#047857",
    format: (value) => format.percent(value, 1),
    range: (min) => [Math.max(0, Math.min(min, 0.95) - 0.05), 1],
    markers: true,
  });
  const ticker = setInterval(() => job.status === "running" && showLive(), TICK_MS);
  signal.addEventListener("abort", () => {
    clearInterval(ticker);
    loss.destroy();
    agreement.destroy();
  });

  /** Replace a section's content when what it shows changed (downloads keep their notes). */
  function update(name, key, build) {
    const shownKey = JSON.stringify(key);
    if (shownParts.get(name) === shownKey) return;
    shownParts.set(name, shownKey);
    fill(parts[name], build());
  }

  function showLive() {
    update("head", [job.status, live.stage, job.cancel_requested], () =>
      head(job, live.stage, cancel),
    );
    fill(parts.timeline, timeline(job, live));
    showProgress();
  }

  function showProgress() {
    const running = job.status === "running" && live.progress;
    fill(parts.progress, running ? progressLine(live.progress) : null);
  }

  function showJob(updated) {
    job = updated;
    live.stageSeconds = { ...live.stageSeconds, ...job.stage_seconds };
    if (format.FINAL.has(job.status)) live.stage = null;
    showLive();
    fill(parts.summary, summary(job));
    fill(parts.failure, job.error ? errorBox(`The job ${job.status}`, job.error) : null);
    update("metrics", job.metrics, () => (job.metrics ? metricTables(job.metrics) : null));
    update("latency", job.metrics?.inference, () => latencyTable(job.metrics?.inference));
    update("artifacts", job.artifacts, () => artifactTable(path, job.artifacts));
    update("engines", job.engines, () => engineTable(job.engines));
    showNotes();
  }

  function showNotes() {
    // The same warning comes as an event and again in the metrics: show it once; the error
    // that ended the job has its own box.
    const byText = new Map();
    for (const note of [...(job.metrics?.warnings ?? []), ...live.notes]) {
      byText.set(`${note.code}\n${note.message}`, note);
    }
    if (job.error) byText.delete(`${job.error.code}\n${job.error.message}`);
    const unique = [...byText.values()];
    fill(
      parts.notes,
      unique.length
        ? section(
            "warnings",
            h("h2", {}, "Warnings"),
            h(
              "ul",
              { class: "notes" },
              unique.map((n) => h("li", {}, h("code", {}, n.code), " ", n.message)),
            ),
          )
        : null,
    );
  }

  async function cancel(button) {
    button.disabled = true;
    try {
      showJob(await postJson(`${path}/cancel`, undefined, { signal }));
    } catch (error) {
      notice.show(error);
      button.disabled = false;
    }
  }

  // Reads of the job, one at a time; a change announced meanwhile reads it once more after.
  let reading = false;
  let readAgain = false;
  async function refresh() {
    if (reading) {
      readAgain = true;
      return;
    }
    reading = true;
    try {
      do {
        readAgain = false;
        showJob(await getJson(path, { signal }));
        notice.clear();
      } while (readAgain && !signal.aborted);
    } catch (error) {
      if (!signal.aborted && error?.status !== 401) notice.show(error);
    } finally {
      reading = false;
    }
  }

  function onEvent(event) {
    const data = event.data;
    const news = Date.parse(event.created_at) > Date.parse(job.updated_at); // not in `job` yet
    if (event.type === "metrics") {
      loss.add(data.step, data.loss);
      if (typeof data.probe?.agreement === "number") agreement.add(data.step, data.probe.agreement);
      // Progress events come every few seconds; curve points tell the step in between.
      if (live.progress) {
        live.progress = { ...live.progress, step: data.step, epoch: data.epoch, loss: data.loss };
        showProgress();
      }
    } else if (event.type === "progress") {
      live.progress = data;
      showProgress();
    } else if (event.type === "stage") {
      if (data.previous)
        live.stageSeconds[data.previous] = Math.max(
          live.stageSeconds[data.previous] ?? 0,
          data.previous_seconds ?? 0,
        );
      live.stage = data.stage;
      live.stageSince = event.created_at;
      showLive();
    } else if (event.type === "status") {
      if (data.stage_seconds) live.stageSeconds = { ...data.stage_seconds };
      if (news) refresh();
    } else if (event.type === "warning" || event.type === "error") {
      live.notes.push({ code: data.code, message: data.message });
      showNotes();
    } else if (event.type === "engine" && news) {
      refresh();
    }
  }

  showJob(job);
  try {
    await followJobEvents(jobId, {
      signal,
      onEvent,
      onState: (state) => {
        streamState.textContent = state === "live" ? "" : "(connection lost; reconnecting\u2026)";
      },
    });
  } catch (error) {
    if (!signal.aborted && error?.status !== 401) notice.show(error);
    return;
  }
  if (signal.aborted) return;
  streamState.textContent = "";
  loss.finish("No training curve: the job stopped before it trained.");
  agreement.finish("No probe scores: the job stopped before its first probe.");
  await refresh();
  // Engine builds start after the job succeeded and outlive its event stream.
  await poll(signal, ENGINE_REFRESH_MS, async () => {
    if (job.engines.every((build) => FINAL_ENGINE.has(build.status))) return false;
    await refresh();
    return true;
  });
}

function head(job, stage, cancel) {
  const where = job.status === "running" && stage ? h("span", { class: "muted" }, stage) : null;
  const canCancel = !format.FINAL.has(job.status) && !job.cancel_requested;
  return [
    h("h1", {}, "Job ", h("span", { class: "mono", title: job.id }, format.shortId(job.id))),
    badge(job.status),
    where,
    job.cancel_requested && !format.FINAL.has(job.status)
      ? h("span", { class: "muted" }, "cancel requested")
      : null,
    h("span", { class: "spacer" }),
    canCancel
      ? h(
          "button",
          {
            type: "button",
            class: "danger",
            id: "cancel-job",
            onclick: (e) => cancel(e.currentTarget),
          },
          "Cancel job",
        )
      : null,
  ];
}

function summary(job) {
  const config = job.config ?? {};
  const item = (label, ...value) =>
    h("li", {}, h("span", { class: "label" }, label), " ", ...value);
  const length = config.steps
    ? `${format.integer(config.steps)} steps`
    : `${config.epochs ?? 1} epoch${(config.epochs ?? 1) === 1 ? "" : "s"}`;
  const size = config.preprocessing?.input_size;
  return [
    item("config", h("span", { class: "mono" }, format.bits(config)), ` ${config.method ?? ""}`),
    item("length", length, config.batch_size ? `, batch ${config.batch_size}` : null),
    size ? item("input", `${size[0]}\u00d7${size[1]} px`) : null,
    item("model", format.bytes(job.inputs?.model?.size)),
    item("data", format.bytes(job.inputs?.data?.size)),
    job.inputs?.eval_data ? item("eval data", format.bytes(job.inputs.eval_data.size)) : null,
    item(
      "created",
      h("span", { title: format.timestamp(job.created_at) }, format.age(job.created_at)),
    ),
    job.started_at ? item("ran", format.jobDuration(job)) : null,
    job.attempts > 1 ? item("attempts", String(job.attempts)) : null,
    job.sweep_id
      ? item(
          "sweep",
          h(
            "a",
            { href: `#/sweeps/${encodeURIComponent(job.sweep_id)}`, class: "mono" },
            format.shortId(job.sweep_id),
          ),
        )
      : null,
    Object.entries(job.metadata ?? {}).map(([key, value]) => item(key, value)),
    item("id", h("code", {}, job.id)),
  ];
}

function progressLine(progress) {
  const parts = [`step ${format.integer(progress.step)} / ${format.integer(progress.total_steps)}`];
  if (progress.epochs) parts.push(`epoch ${progress.epoch} / ${progress.epochs}`);
  if (typeof progress.loss === "number") parts.push(`loss ${format.compact(progress.loss)}`);
  if (typeof progress.eta_seconds === "number")
    parts.push(`ETA ${format.duration(progress.eta_seconds)}`);
  if (progress.images_per_second)
    parts.push(`${format.integer(progress.images_per_second)} images/s`);
  return [
    h("progress", { max: progress.total_steps || 1, value: progress.step ?? 0 }),
    h("span", {}, parts.join(" \u00b7 ")),
  ];
}

/** The stages in order with their seconds: finished ones from stage_seconds, the running one
 * by the clock since its stage event; a bar shows where the time went. */
function timeline(job, live) {
  const seconds = { ...live.stageSeconds };
  if (live.stage && live.stageSince && job.status === "running") {
    seconds[live.stage] = format.secondsBetween(live.stageSince);
  }
  const lastWithTime = STAGES.filter((stage) => seconds[stage] !== undefined).pop();
  const stateOf = (stage) => {
    if (job.status === "running" && stage === live.stage) return "current";
    if ((job.status === "failed" || job.status === "canceled") && stage === lastWithTime)
      return job.status;
    return seconds[stage] !== undefined ? "done" : "pending";
  };
  const total = STAGES.reduce((sum, stage) => sum + (seconds[stage] ?? 0), 0);
  return [
    h(
      "h2",
      {},
      "Stages ",
      h("span", { class: "muted small" }, total ? `${format.duration(total)} in all` : ""),
    ),
    h(
      "ol",
      { class: "stages" },
      STAGES.map((stage) =>
        h(
          "li",
          { class: `stage ${stateOf(stage)}`, dataset: { stage } },
          h("span", { class: "stage-name" }, stage),
          h(
            "span",
            { class: "stage-time" },
            seconds[stage] === undefined ? format.NONE : format.duration(seconds[stage]),
          ),
        ),
      ),
    ),
    h(
      "div",
      { class: "stage-bar", "aria-hidden": "true" },
      STAGES.filter((stage) => seconds[stage]).map((stage) => {
        const segment = h("span", {
          class: `segment ${stage}`,
          title: `${stage}: ${format.duration(seconds[stage])}`,
        });
        segment.style.flexGrow = String(seconds[stage]); // CSSOM: allowed by the page's CSP
        return segment;
      }),
    ),
  ];
}

function metricTables(metrics) {
  const calibrated = metrics.calibrated ?? {};
  const comparison = table([[""], ["Calibrated", "num"], ["Trained", "num"]], {
    id: "accuracy-table",
  });
  const compareRow = (label, key, show) =>
    h(
      "tr",
      {},
      h("th", { scope: "row" }, label),
      h("td", { class: "num" }, show(calibrated[key])),
      h("td", { class: "num" }, show(metrics[key])),
    );
  fill(
    comparison.body,
    compareRow("Agreement with the teacher", "agreement", format.percent),
    compareRow("KL(teacher \u2016 student)", "kl", format.compact),
    compareRow("Student top-1", "student_top1", format.percent),
    compareRow("Teacher top-1", "teacher_top1", format.percent),
  );
  const images = format.integer(metrics.eval_images);
  const evalImages =
    metrics.eval_source === "eval_data"
      ? `on ${images} images of the eval data`
      : `on ${images} held-out training images`;
  const train = metrics.train ?? {};
  const parity = metrics.onnx_parity;
  const rules = metrics.tensorrt_rules;
  const ratio =
    metrics.fp32_bytes && metrics.packed_bytes
      ? `${(metrics.fp32_bytes / metrics.packed_bytes).toFixed(1)}\u00d7 smaller`
      : null;
  return [
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Accuracy ", h("span", { class: "muted small" }, evalImages)),
      comparison.element,
    ),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Size"),
      facts([
        ["fp32 weights", format.bytes(metrics.fp32_bytes)],
        [
          "Packed weights",
          [
            format.bytes(metrics.packed_bytes),
            ratio ? h("span", { class: "muted" }, ` (${ratio})`) : null,
          ],
        ],
        ["model_int.safetensors", format.bytes(metrics.int_checkpoint_bytes)],
      ]),
    ),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Export checks"),
      facts([
        parity && [
          "ONNX parity (argmax agreement)",
          [
            format.percent(parity.top1_agreement, 2),
            h("span", { class: "muted" }, ` of ${format.integer(parity.images)}`),
          ],
        ],
        parity && ["ONNX parity (max |logit diff|)", format.compact(parity.max_abs_diff)],
        rules && [
          "TensorRT rules",
          rules.follows_rules
            ? h("span", { class: "ok" }, "followed")
            : h("span", { class: "bad" }, `${rules.violation_count} violations`),
        ],
        !parity && !rules ? ["ONNX export", "not asked for"] : null,
      ]),
      rules?.violations?.length
        ? h(
            "ul",
            { class: "notes" },
            rules.violations.map((v) =>
              h("li", {}, h("code", {}, v.rule), " ", v.node, ": ", v.message),
            ),
          )
        : null,
    ),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Training"),
      facts([
        ["Steps", format.integer(train.steps)],
        ["Time", format.duration(train.seconds)],
        ["Speed", `${format.integer(train.images_per_second)} images/s`],
        ["Final loss", format.compact(train.final_loss)],
        ["Peak memory", format.bytes(train.peak_memory_bytes)],
        ["Training images", format.integer(metrics.train_images)],
        train.resumed_from_step
          ? ["Resumed from step", format.integer(train.resumed_from_step)]
          : null,
      ]),
    ),
  ];
}

/** CPU latency per runtime and batch (metrics.inference, with export.speed). */
function latencyTable(inference) {
  if (!inference) return null;
  const latency = table(
    [
      ["Runtime"],
      ["Batch", "num"],
      ["Float model", "num"],
      ["model_qdq.onnx", "num"],
      ["model_qdq_cpu.onnx", "num"],
      ["Speed-up", "num"],
    ],
    { id: "latency-table" },
  );
  const rows = [];
  for (const [runtime, name] of Object.entries(RUNTIMES)) {
    const times = inference[runtime];
    if (!times) continue;
    for (const batch of inference.batches ?? []) {
      const speedup = times.qdq_cpu_speedup?.[batch];
      rows.push(
        h(
          "tr",
          {},
          h("td", {}, name),
          h("td", { class: "num" }, String(batch)),
          h("td", { class: "num" }, format.milliseconds(times.float_ms?.[batch])),
          h("td", { class: "num" }, format.milliseconds(times.qdq_ms?.[batch])),
          h("td", { class: "num" }, format.milliseconds(times.qdq_cpu_ms?.[batch])),
          h(
            "td",
            { class: "num" },
            typeof speedup === "number" ? `${speedup.toFixed(2)}\u00d7` : format.NONE,
          ),
        ),
      );
    }
  }
  fill(latency.body, rows);
  return h(
    "section",
    { class: "card" },
    h(
      "h2",
      {},
      "CPU latency ",
      h(
        "span",
        { class: "muted small" },
        `per batch, ${inference.threads} threads on the worker's CPU; ` +
          "speed-up of model_qdq_cpu.onnx over the float model",
      ),
    ),
    latency.element,
  );
}

function artifactTable(path, artifacts) {
  if (!artifacts.length) return null;
  const files = table([["File"], ["Size", "num"], ["SHA-256"], [""]], { id: "artifacts-table" });
  fill(
    files.body,
    artifacts.map((artifact) => {
      const result = h("span", { class: "muted small download-note" });
      const button = h(
        "button",
        { type: "button", class: "small", dataset: { artifact: artifact.name } },
        "Download",
      );
      button.addEventListener("click", async () => {
        button.disabled = true;
        result.textContent = "downloading\u2026";
        result.classList.remove("bad");
        try {
          const check = await saveDownload(
            `${path}/artifacts/${encodeURIComponent(artifact.name)}`,
            artifact.name,
            artifact.sha256,
          );
          result.textContent = check === "checked" ? "saved; SHA-256 checked" : "saved";
        } catch (error) {
          result.textContent = errorText(error);
          result.classList.add("bad");
        } finally {
          button.disabled = false;
        }
      });
      return h(
        "tr",
        {},
        h("td", { class: "mono" }, artifact.name),
        h("td", { class: "num" }, format.bytes(artifact.size)),
        h(
          "td",
          {},
          h(
            "code",
            { class: "hash", title: artifact.sha256 },
            `${artifact.sha256.slice(0, 16)}\u2026`,
          ),
        ),
        h("td", { class: "actions" }, button, " ", result),
      );
    }),
  );
  return h("section", { class: "card", id: "artifacts" }, h("h2", {}, "Artifacts"), files.element);
}

/** A report value in words: nested objects as "key: value" pairs. */
function describe(value) {
  if (value === null || value === undefined) return format.NONE;
  if (Array.isArray(value)) return value.map(describe).join(", ");
  if (typeof value === "object")
    return Object.entries(value)
      .map(([k, v]) => `${k}: ${describe(v)}`)
      .join(", ");
  return String(value);
}

function engineTable(engines) {
  if (!engines.length) return null;
  const builds = table(
    [["Target"], ["Status"], ["Builder"], ["Build time", "num"], ["Provenance"]],
    { id: "engines-table" },
  );
  fill(
    builds.body,
    engines.map((build) =>
      h(
        "tr",
        {},
        h(
          "td",
          { class: "mono" },
          build.target,
          h("div", { class: "muted small" }, `queue ${build.queue}`),
        ),
        h(
          "td",
          {},
          badge(build.status),
          build.error
            ? h("div", { class: "bad small" }, `${build.error.message} (${build.error.code})`)
            : null,
        ),
        h("td", {}, build.builder ?? format.NONE),
        h(
          "td",
          { class: "num" },
          build.started_at
            ? format.duration(format.secondsBetween(build.started_at, build.finished_at))
            : format.NONE,
        ),
        h(
          "td",
          {},
          build.report
            ? h(
                "dl",
                { class: "provenance" },
                Object.entries(build.report).map(([key, value]) => [
                  h("dt", {}, key),
                  h("dd", {}, describe(value)),
                ]),
              )
            : format.NONE,
        ),
      ),
    ),
  );
  return h(
    "section",
    { class: "card", id: "engines" },
    h(
      "h2",
      {},
      "TensorRT engines ",
      h(
        "span",
        { class: "muted small" },
        "each built on its target; its files are the job's engine-<target>.* artifacts",
      ),
    ),
    builds.element,
  );
}
