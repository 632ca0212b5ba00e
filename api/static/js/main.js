// The dashboard's start: find out whether the service needs a key (keyless local mode needs
// none: never ask then), ask for one when it does, then show the page the URL's fragment names.

import { ApiError, forgetKey, getJson, onUnauthorized, storedKey, storeKey } from "./api.js";
import { errorBox, fill, h } from "./dom.js";
import * as jobPage from "./pages/job.js";
import * as jobsPage from "./pages/jobs.js";
import * as newJobPage from "./pages/new-job.js";
import * as sweepPage from "./pages/sweep.js";
import * as sweepsPage from "./pages/sweeps.js";

const ROUTES = [
  { pattern: /^#\/jobs\/([^/]+)$/, nav: "jobs", page: jobPage },
  { pattern: /^#\/(jobs\/?)?$/, nav: "jobs", page: jobsPage },
  { pattern: /^#\/sweeps\/([^/]+)$/, nav: "sweeps", page: sweepPage },
  { pattern: /^#\/sweeps\/?$/, nav: "sweeps", page: sweepsPage },
  { pattern: /^#\/new\/?$/, nav: "new", page: newJobPage },
];
const PROBE = "v1/jobs?limit=1";

const view = document.getElementById("view");
const sessionNote = document.getElementById("session-note");
const forgetButton = document.getElementById("forget-key");
let shown = null; // the AbortController of the page on screen: aborting it stops its updates
let signedIn = false;

/** Show the page the fragment names; the previous one's polls and streams stop. */
function route() {
  shown?.abort();
  shown = new AbortController();
  const hash = location.hash || "#/jobs";
  const match = ROUTES.map((r) => ({ ...r, found: hash.match(r.pattern) })).find((r) => r.found);
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === match?.nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  view.replaceChildren();
  if (!match) {
    view.append(errorBox("No such page", new Error(`Nothing lives at ${hash}.`)));
    return;
  }
  const signal = shown.signal;
  const params = match.found.slice(1).map(decodeURIComponent);
  Promise.resolve(match.page.render(view, { signal, params })).catch((error) => {
    if (signal.aborted || error?.status === 401) return; // the key form took over
    view.append(errorBox("This page could not be shown", error));
  });
}

/** The key form, with what the service said (``error``: a wrong key is shown as an error). */
function askForKey(serviceSaid, isError) {
  shown?.abort();
  signedIn = false;
  forgetButton.hidden = true;
  sessionNote.textContent = "";
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
  });
  const form = h(
    "form",
    { class: "key-form", "aria-labelledby": "key-title" },
    h("h1", { id: "key-title" }, "API key"),
    h(
      "p",
      {},
      "This service needs an API key. It is kept in this browser tab only (sessionStorage, ",
      "gone when the tab closes) and sent in a header, never in a URL.",
    ),
    h("label", { for: "api-key" }, "API key"),
    h("div", { class: "row" }, input, h("button", { type: "submit" }, "Use this key")),
    isError
      ? errorBox("The service refused the key", serviceSaid)
      : h("p", { class: "muted" }, "The service said: ", serviceSaid.message),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    storeKey(input.value.trim());
    await signIn();
  });
  fill(view, form);
  input.focus();
}

function showUnreachable(error) {
  fill(
    view,
    errorBox("The service cannot be reached", error),
    h("button", { type: "button", onclick: () => start() }, "Try again"),
  );
}

/** Ask the API whether it needs a key, without one, so that keyless local mode never asks. */
async function start() {
  try {
    await getJson(PROBE, { anonymous: true });
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 401) return showUnreachable(error);
    return storedKey() ? signIn() : askForKey(error, false);
  }
  forgetKey(); // nothing to keep: this service answers without one
  enter(true);
}

/** Check the key this tab keeps; a wrong one brings back the form with the API's message. */
async function signIn() {
  try {
    await getJson(PROBE);
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 401) return showUnreachable(error);
    forgetKey();
    return askForKey(error, true);
  }
  enter(false);
}

function enter(keyless) {
  signedIn = true;
  sessionNote.textContent = keyless ? "local mode: no key needed" : "";
  forgetButton.hidden = keyless;
  route();
}

onUnauthorized((error) => {
  if (!signedIn) return; // start() shows the form itself
  forgetKey();
  askForKey(error, true);
});
forgetButton.addEventListener("click", () => {
  forgetKey();
  askForKey(new Error("the key was forgotten; enter one to go on"), false);
});
window.addEventListener("hashchange", () => {
  if (signedIn) route();
});
start();
