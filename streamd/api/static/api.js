// The control API from the page: the token lives in this tab's sessionStorage and travels only as a bearer header
// (never in a URL). Server-Sent Events are read with fetch() and a ReadableStream, so they carry the header too.

const TOKEN_KEY = "streamd.token";

export function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
export function setToken(t) { sessionStorage.setItem(TOKEN_KEY, t); }
export function forgetToken() { sessionStorage.removeItem(TOKEN_KEY); }

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || "http_error";
    this.details = err.details || {};
  }
  // the API's message and, for a body that failed its schema, each path's message
  describe() {
    const lines = [`${this.message} (${this.code})`];
    for (const e of this.details.errors || []) lines.push(`${e.path}: ${e.message}`);
    return lines.join("\n");
  }
}

export function headers(extra = {}) {
  const h = { ...extra };
  const t = token();
  if (t) h["Authorization"] = `Bearer ${t}`;
  return h;
}

// JSON in, JSON out; throws ApiError (with the API's code and message) on an error status
export async function api(path, { method = "GET", body, etag, signal } = {}) {
  const h = headers(body === undefined ? {} : { "Content-Type": "application/json" });
  if (etag) h["If-Match"] = etag;
  const resp = await fetch(path, { method, headers: h, signal, cache: "no-store",
                                   body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return { data, etag: resp.headers.get("ETag"), status: resp.status };
}

// an image (snapshot) as an ImageBitmap, with the response's headers; null on 404 (no such frame kept)
export async function image(path, signal) {
  const resp = await fetch(path, { headers: headers(), signal, cache: "no-store" });
  if (resp.status === 404) return null;
  if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
  const bitmap = await createImageBitmap(await resp.blob());
  return { bitmap, entry: resp.headers.get("X-Streamd-Entry-Id") };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Server-Sent Events over fetch: calls onEvent({id, data}) for each; reconnects with Last-Event-ID (nothing missed,
// nothing twice) until `signal` aborts. onError(ApiError) is told about refused connections.
export async function events(path, onEvent, signal, onError = () => {}) {
  let lastId = null;
  while (!signal.aborted) {
    try {
      const h = headers({ "Accept": "text/event-stream" });
      if (lastId) h["Last-Event-ID"] = lastId;
      const resp = await fetch(path, { headers: h, signal, cache: "no-store" });
      if (!resp.ok) {
        onError(new ApiError(resp.status, await resp.json().catch(() => null)));
        await sleep(2000);
        continue;
      }
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let id = null; const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("id: ")) id = line.slice(4);
            else if (line.startsWith("data: ")) data.push(line.slice(6));
          }
          if (!data.length) continue;  // a keep-alive comment
          if (id) lastId = id;
          onEvent({ id, data: JSON.parse(data.join("\n")) });
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      onError(e);
    }
    await sleep(1000);
  }
}
