// #/new: upload a model and images (with progress), then start a job on them as JSON:
// POST /v1/models, POST /v1/datasets, POST /v1/jobs {model_id, data_id, eval_data_id, config}.

import { postJson, uploadFile } from "../api.js";
import { errorBox, fill, h } from "../dom.js";
import * as format from "../format.js";

const METHODS = {
  lsq: "LSQ: learnable step",
  ewgs: "EWGS: learnable interval",
  pact: "PACT: learnable activation clip",
  dorefa: "DoReFa",
  ste: "STE: plain uniform (baseline)",
};
const BITS = [8, 7, 6, 5, 4, 3, 2, 1];
const ARCHIVES = ".zip,.tar,.tgz,.gz,.bz2,.xz,.tbz2,.txz";

/** A form field: its label above the control, an optional hint below. */
function field(label, control, hint) {
  return h(
    "div",
    { class: "field" },
    h("label", { for: control.id }, label),
    control,
    hint ? h("small", { class: "muted" }, hint) : null,
  );
}

function select(id, options, chosen) {
  return h(
    "select",
    { id, name: id },
    options.map(([value, text]) => h("option", { value, selected: value === chosen }, text)),
  );
}

function input(id, attributes = {}) {
  return h("input", { id, name: id, ...attributes });
}

/** A file field with its upload progress, remembering what each chosen file was stored as. */
function fileField(id, label, { accept, required, kind, describe }) {
  const control = input(id, { type: "file", accept, required });
  const bar = h("progress", { max: 1, value: 0, hidden: true });
  const note = h("span", { class: "muted small upload-note", id: `${id}-note` });
  const stored = new Map(); // File -> the stored resource: a retry does not upload it again
  control.addEventListener("change", () => {
    bar.hidden = true;
    note.textContent = "";
  });
  return {
    element: h(
      "div",
      { class: "field" },
      h("label", { for: id }, label),
      control,
      h("div", { class: "upload" }, bar, note),
    ),
    file: () => control.files[0] ?? null,
    async upload() {
      const file = control.files[0];
      if (stored.has(file)) return stored.get(file);
      bar.hidden = false;
      bar.value = 0;
      const resource = await uploadFile(`v1/${kind}`, file, (sent, total) => {
        bar.value = total ? sent / total : 0;
        note.textContent = `${format.bytes(sent)} of ${format.bytes(total)}`;
      });
      bar.value = 1;
      note.textContent = `stored: ${describe(resource.info)}`;
      stored.set(file, resource);
      return resource;
    },
  };
}

function describeModel(info) {
  const shape = (info.input_shape ?? [])
    .map((side, i) => side ?? (i === 0 ? "N" : "?"))
    .join("\u00d7");
  return `${format.integer(info.parameters)} parameters, input ${shape}`;
}

function describeDataset(info) {
  const classes = info.class_names
    ? `, ${info.class_names.length} class folders`
    : ", no class folders";
  return `${format.integer(info.image_count)} images${classes}`;
}

/** A number field's value; undefined when empty. */
function numberOf(form, id, label) {
  const raw = form.elements[id].value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new Error(`${label}: "${raw}" is not a number`);
  return value;
}

/** "0.485, 0.456, 0.406" -> three numbers; undefined when empty. */
function rgbOf(form, id, label) {
  const raw = form.elements[id].value.trim();
  if (raw === "") return undefined;
  const values = raw.split(/[\s,]+/).map(Number);
  if (values.length !== 3 || !values.every(Number.isFinite)) {
    throw new Error(`${label}: three numbers, for R, G and B (like 0.5, 0.5, 0.5)`);
  }
  return values;
}

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

/** ``extra`` deep-merged over ``base``: nested objects merge, anything else replaces. */
function deepMerge(base, extra) {
  const merged = { ...base };
  for (const [key, value] of Object.entries(extra)) {
    merged[key] = isObject(value) && isObject(base[key]) ? deepMerge(base[key], value) : value;
  }
  return merged;
}

/** The job config the form describes; the raw JSON last, over everything else. */
function configOf(form) {
  const config = {
    weight_bits: Number(form.elements["weight-bits"].value),
    activation_bits: Number(form.elements["activation-bits"].value),
    method: form.elements.method.value,
  };
  const optional = {
    epochs: numberOf(form, "epochs", "Epochs"),
    steps: numberOf(form, "steps", "Steps"),
    batch_size: numberOf(form, "batch-size", "Batch size"),
  };
  for (const [key, value] of Object.entries(optional)) if (value !== undefined) config[key] = value;
  const height = numberOf(form, "input-height", "Input height");
  const width = numberOf(form, "input-width", "Input width");
  if ((height === undefined) !== (width === undefined))
    throw new Error("Input size: give both height and width, or neither");
  const preprocessing = {
    input_size: height === undefined ? undefined : [height, width],
    mean: rgbOf(form, "mean", "Mean"),
    std: rgbOf(form, "std", "Std"),
  };
  for (const [key, value] of Object.entries(preprocessing)) {
    if (value !== undefined) config.preprocessing = { ...config.preprocessing, [key]: value };
  }
  if (!form.elements["export-speed"].checked) config.export = { speed: false };
  const raw = form.elements["raw-config"].value.trim();
  if (raw) {
    let extra;
    try {
      extra = JSON.parse(raw);
    } catch (error) {
      throw new Error(`Raw JSON config: ${error.message}`);
    }
    if (!isObject(extra))
      throw new Error('Raw JSON config: a JSON object, like {"temperature": 2}');
    return deepMerge(config, extra);
  }
  return config;
}

export function render(view) {
  const model = fileField("model-file", "Model (.onnx)", {
    accept: ".onnx",
    required: true,
    kind: "models",
    describe: describeModel,
  });
  const data = fileField("data-file", "Training images (zip or tar)", {
    accept: ARCHIVES,
    required: true,
    kind: "datasets",
    describe: describeDataset,
  });
  const evalData = fileField("eval-file", "Labelled eval images (optional)", {
    accept: ARCHIVES,
    required: false,
    kind: "datasets",
    describe: describeDataset,
  });
  const problems = h("div", { id: "form-errors" });
  const submit = h("button", { type: "submit", id: "submit-job" }, "Upload and start");
  const bitOptions = BITS.map((b) => [String(b), `${b} bit${b === 1 ? "" : "s"}`]);
  const form = h(
    "form",
    { id: "new-job", class: "card job-form" },
    h("div", { class: "form-row" }, model.element, data.element),
    h(
      "div",
      { class: "form-row" },
      field("Weight bits", select("weight-bits", bitOptions, "4")),
      field("Activation bits", select("activation-bits", bitOptions, "4")),
      field("Method", select("method", Object.entries(METHODS), "lsq")),
      field(
        "Epochs",
        input("epochs", {
          type: "number",
          min: 1,
          step: 1,
          placeholder: "1",
          inputmode: "numeric",
        }),
      ),
    ),
    h(
      "details",
      { id: "advanced" },
      h("summary", {}, "Advanced"),
      h("div", { class: "form-row" }, evalData.element),
      h(
        "div",
        { class: "form-row" },
        field(
          "Steps",
          input("steps", { type: "number", min: 1, step: 1, inputmode: "numeric" }),
          "instead of epochs",
        ),
        field(
          "Batch size",
          input("batch-size", {
            type: "number",
            min: 1,
            step: 1,
            placeholder: "64",
            inputmode: "numeric",
          }),
        ),
        field(
          "Input height",
          input("input-height", {
            type: "number",
            min: 1,
            step: 1,
            placeholder: "the model's",
            inputmode: "numeric",
          }),
          "pixels",
        ),
        field(
          "Input width",
          input("input-width", {
            type: "number",
            min: 1,
            step: 1,
            placeholder: "the model's",
            inputmode: "numeric",
          }),
          "pixels",
        ),
      ),
      h(
        "div",
        { class: "form-row" },
        field(
          "Mean",
          input("mean", { type: "text", placeholder: "0.485, 0.456, 0.406" }),
          "R, G, B of pixels in [0, 1]",
        ),
        field("Std", input("std", { type: "text", placeholder: "0.229, 0.224, 0.225" }), "R, G, B"),
        h(
          "div",
          { class: "field checkbox" },
          h(
            "label",
            {},
            input("export-speed", { type: "checkbox", checked: true }),
            " Time the model on the CPU (export.speed)",
          ),
          h("small", { class: "muted" }, "a few seconds after training"),
        ),
      ),
      field(
        "Raw JSON config",
        h("textarea", {
          id: "raw-config",
          name: "raw-config",
          rows: 3,
          spellcheck: "false",
          placeholder: '{"temperature": 2, "export": {"tensorrt_targets": ["jetson-orin-nano"]}}',
        }),
        "merged last, over the fields above (README: Job config)",
      ),
    ),
    problems,
    h("div", { class: "form-actions" }, submit),
  );

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problems.replaceChildren();
    let config;
    try {
      config = configOf(form);
    } catch (error) {
      fill(problems, errorBox("Check the form", error));
      return;
    }
    submit.disabled = true;
    let doing = "Upload refused";
    try {
      const modelResource = await model.upload();
      const dataResource = await data.upload();
      const evalResource = evalData.file() ? await evalData.upload() : null;
      doing = "The service refused the job";
      submit.textContent = "Starting\u2026";
      const job = await postJson("v1/jobs", {
        model_id: modelResource.id,
        data_id: dataResource.id,
        eval_data_id: evalResource?.id ?? null,
        config,
      });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      if (error?.status !== 401) fill(problems, errorBox(doing, error));
    } finally {
      submit.disabled = false;
      submit.textContent = "Upload and start";
    }
  });

  view.append(
    h("div", { class: "page-head" }, h("h1", {}, "New job")),
    h(
      "p",
      { class: "muted" },
      "The model is the teacher: a quantized copy of it learns to match its outputs on your " +
        "images. No labels needed; labelled eval images (class folders) add top-1.",
    ),
    form,
  );
}
