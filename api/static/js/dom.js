// Building the page from data. Every string becomes a text node or an attribute value, never
// markup: job metadata, file names, labels and error messages are the user's own strings.

/**
 * An element: h("td", {class: "num", title: sha}, "text", node, [more nodes]).
 * Attributes go through setAttribute (true: present, null/undefined/false: left out);
 * functions under "on<event>" become listeners; "dataset" fills data-* attributes.
 * Children: nodes, strings and numbers (as text), arrays of them; null/undefined/false skipped.
 */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(element.dataset, value);
    } else {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(element, children);
  return element;
}

/** Append children as h() takes them. */
export function append(parent, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : String(child));
  }
}

/** Replace an element's children with these (as h() takes them). */
export function fill(parent, ...children) {
  parent.replaceChildren();
  append(parent, children);
  return parent;
}

/** Resolve after ``ms``, or at once when ``signal`` aborts. */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/** A line that says what went wrong with the last refresh, cleared by the next good one. */
export function noticeLine() {
  const line = h("p", { class: "notice", role: "status", hidden: true });
  line.show = (error) => {
    fill(line, errorText(error));
    line.hidden = false;
  };
  line.clear = () => {
    line.hidden = true;
    line.replaceChildren();
  };
  return line;
}

/** "message (code)" of an ApiError or any Error. */
export function errorText(error) {
  return error?.code ? `${error.message} (${error.code})` : String(error?.message ?? error);
}

/** A box that shows an error readably: a title, the message, and its code. */
export function errorBox(title, error) {
  return h(
    "div",
    { class: "error-box", role: "alert" },
    h("strong", {}, title),
    h("p", {}, error?.message ?? String(error)),
    error?.code ? h("p", { class: "muted" }, "code: ", h("code", {}, error.code)) : null,
  );
}

/**
 * Run ``step`` now and every ``intervalMs`` until ``signal`` aborts or ``step`` returns false.
 * A failure shows on ``notice`` and the polling goes on (the service may be back next time),
 * except for a 401, which the key form takes over.
 */
export async function poll(signal, intervalMs, step, notice) {
  while (!signal.aborted) {
    try {
      const goOn = await step();
      notice?.clear();
      if (goOn === false) return;
    } catch (error) {
      if (signal.aborted || error?.status === 401) return;
      notice?.show(error);
    }
    await sleep(intervalMs, signal);
  }
}

/** A table: ``columns`` are [label, "num"?] pairs; numeric columns align right. */
export function table(columns, attributes = {}) {
  const head = h(
    "tr",
    {},
    columns.map(([label, kind]) => h("th", { scope: "col", class: kind }, label)),
  );
  const body = h("tbody");
  const element = h("table", { class: "data", ...attributes }, h("thead", {}, head), body);
  return { element, body };
}

/** A two-column table of [label, value] rows; values align right. */
export function facts(rows, attributes = {}) {
  return h(
    "table",
    { class: "data facts", ...attributes },
    h(
      "tbody",
      {},
      rows
        .filter((row) => row)
        .map(([label, value]) =>
          h("tr", {}, h("th", { scope: "row" }, label), h("td", { class: "num" }, value)),
        ),
    ),
  );
}

/** A status badge: "running", "succeeded", ... */
export function badge(status, text = status) {
  return h("span", { class: `badge status-${status}` }, text);
}
