// The service's API from the browser. The key the user typed is kept in sessionStorage (this
// tab only, gone when it closes) and sent as "Authorization: Bearer"; it never goes into a URL.
// Paths are relative ("v1/jobs"), resolved against the page, so a proxy may mount the service
// under a path of its own.

const KEY_STORAGE = "sqakd.apiKey";
const unauthorizedListeners = new Set();

/** An answer that is not 2xx, as the API words it: {"error": {"code", "message"}}. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

/** Call ``listener(error)`` whenever the API answers 401 (a missing, wrong or revoked key). */
export function onUnauthorized(listener) {
  unauthorizedListeners.add(listener);
}

export function apiUrl(path) {
  return new URL(path, document.baseURI).href;
}

function withKey(headers, key) {
  const result = new Headers(headers);
  if (key) result.set("Authorization", `Bearer ${key}`);
  return result;
}

/** The ApiError of a failed answer, from its JSON body or, failing that, its status line. */
export function apiError(status, statusText, bodyText) {
  let detail = null;
  try {
    detail = JSON.parse(bodyText)?.error;
  } catch {
    // not JSON: a proxy's page, an empty body
  }
  const error =
    detail && typeof detail.message === "string"
      ? new ApiError(status, String(detail.code ?? "error"), detail.message)
      : new ApiError(status, `http_${status}`, `HTTP ${status} ${statusText}`.trim());
  if (status === 401) unauthorizedListeners.forEach((listener) => listener(error));
  return error;
}

/**
 * fetch() with the key; resolves to the Response when it is 2xx, else throws an ApiError.
 * ``anonymous``: send no key (to find out whether the service needs one).
 */
export async function apiFetch(path, { method = "GET", headers, body, signal, anonymous } = {}) {
  let response;
  try {
    response = await fetch(apiUrl(path), {
      method,
      body,
      signal,
      headers: withKey(headers, anonymous ? null : storedKey()),
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "unreachable", `the service did not answer (${error.message})`);
  }
  if (!response.ok) throw apiError(response.status, response.statusText, await response.text());
  return response;
}

/** The JSON of a GET (or of ``options.method``); null for 204. */
export async function getJson(path, options = {}) {
  const response = await apiFetch(path, options);
  return response.status === 204 ? null : response.json();
}

export function postJson(path, body, options = {}) {
  return getJson(path, {
    ...options,
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

/**
 * POST a file as the multipart field "file" (POST /v1/models, /v1/datasets), reporting
 * ``onProgress(sentBytes, totalBytes)``: XMLHttpRequest, since fetch() cannot report an
 * upload's progress. Resolves to the stored resource.
 */
export function uploadFile(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", apiUrl(path));
    const key = storedKey();
    if (key) request.setRequestHeader("Authorization", `Bearer ${key}`);
    request.upload.addEventListener("progress", (event) => {
      onProgress(event.loaded, event.lengthComputable ? event.total : file.size);
    });
    request.addEventListener("load", () => {
      if (request.status >= 200 && request.status < 300) {
        resolve(JSON.parse(request.responseText));
      } else {
        reject(apiError(request.status, request.statusText, request.responseText));
      }
    });
    request.addEventListener("error", () => {
      reject(new ApiError(0, "unreachable", `the upload of ${file.name} was cut off`));
    });
    const form = new FormData();
    form.append("file", file, file.name);
    request.send(form);
  });
}

/** Hex SHA-256 of a blob; null where the browser offers no WebCrypto (plain http, not local). */
export async function sha256Hex(blob) {
  if (!globalThis.crypto?.subtle) return null;
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/**
 * Download with the key (a plain link could not send it): fetch the file as a blob, check its
 * SHA-256 against ``expectedSha256`` where the browser can, and save it through an
 * <a download> on an object URL. Resolves to "checked" or "unchecked"; throws on a mismatch.
 */
export async function saveDownload(path, fileName, expectedSha256) {
  const response = await apiFetch(path);
  const blob = await response.blob();
  const actual = await sha256Hex(blob);
  if (actual !== null && expectedSha256 && actual !== expectedSha256) {
    throw new ApiError(
      0,
      "checksum_mismatch",
      `${fileName}: SHA-256 ${actual}, expected ${expectedSha256}`,
    );
  }
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = fileName;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  // The download has its own reference to the blob once it started.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return actual === null ? "unchecked" : "checked";
}
