// A job's events live, as Server-Sent Events read with fetch(): EventSource cannot send the
// Authorization header. The stream is parsed as the HTML standard's EventSource does, and a
// cut stream is resumed with Last-Event-ID, which the API answers without gaps or repeats.

import { ApiError, apiFetch } from "./api.js";
import { FINAL } from "./format.js";
import { sleep } from "./dom.js";

const RETRY_FIRST_MS = 1000;
const RETRY_MAX_MS = 15000;

/** The messages of an event stream's body: {id, event, data} each; comments are skipped. */
export async function* eventStreamMessages(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let message = { id: null, event: "message", data: [] };
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // A "\r" at the end may be the first half of "\r\n": keep it for the next chunk.
      const complete = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      const lines = buffer.slice(0, complete).split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(complete);
      for (const line of lines) {
        if (line === "") {
          if (message.data.length)
            yield { id: message.id, event: message.event, data: message.data.join("\n") };
          message = { id: null, event: "message", data: [] };
          continue;
        }
        if (line.startsWith(":")) continue; // a comment: the server's keep-alive
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") message.data.push(value);
        else if (field === "event") message.event = value;
        else if (field === "id" && !value.includes("\0")) message.id = value;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * Follow a job's events until it is final: ``onEvent({id, type, data, created_at})`` for each,
 * from its first event on; ``onState("live" | "reconnecting")`` as the connection goes.
 * Reconnects after a cut or a 5xx with backoff; a 4xx (401, 404) ends it with the ApiError.
 */
export async function followJobEvents(jobId, { signal, onEvent, onState }) {
  const path = `v1/jobs/${encodeURIComponent(jobId)}/events`;
  let lastId = null;
  let final = false;
  let retryMs = RETRY_FIRST_MS;
  while (!signal.aborted) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const response = await apiFetch(path, { headers, signal });
      onState?.("live");
      for await (const message of eventStreamMessages(response.body)) {
        const event = JSON.parse(message.data);
        lastId = message.id ?? String(event.id);
        retryMs = RETRY_FIRST_MS;
        if (event.type === "status") final = FINAL.has(event.data.status);
        onEvent(event);
      }
      if (final) return; // the API ends the stream once the job is final
    } catch (error) {
      if (signal.aborted) return;
      const refused = error instanceof ApiError && error.status >= 400 && error.status < 500;
      if (refused && error.status !== 429) throw error;
    }
    onState?.("reconnecting");
    await sleep(retryMs, signal);
    retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
  }
}
