// The agent's inspector page: the list comes live from /api/stream (Server-Sent Events), a request's
// detail from ngrok's GET /api/requests/http/{id}, replays go to POST /api/requests/http.
//
// Paths, headers and bodies come from visitors: every piece of captured data reaches the page
// through textContent, never through innerHTML (and the Content-Security-Policy forbids inline
// scripts, so even a mistake would not run one).
"use strict";

(() => {
  /** Bytes of a binary body shown as hex (the rest is counted, not drawn). */
  const HEX_LIMIT = 64 * 1024;
  /** Characters of a text body drawn, and of a JSON body pretty-printed with colours. */
  const TEXT_LIMIT = 512 * 1024;
  /** Nesting beyond which JSON is shown as text (the pretty view walks it recursively). */
  const MAX_JSON_DEPTH = 200;
  const TUNNEL_NAME = "command_line";
  /** Content-Encodings the page decompresses for display (the browser's DecompressionStream). */
  const DECODABLE = { gzip: "gzip", "x-gzip": "gzip", deflate: "deflate" };
  /** Bytes a compressed body is decompressed to at most: a small bomb must not eat the tab. */
  const DECODED_LIMIT = 4 * 1024 * 1024;

  const byId = (id) => document.getElementById(id);
  const view = {
    publicUrl: byId("public-url"),
    moreTunnels: byId("more-tunnels"),
    localAddr: byId("local-addr"),
    copyCurl: byId("copy-curl"),
    curlBox: byId("curl-box"),
    curl: byId("curl"),
    curlNote: byId("curl-note"),
    liveState: byId("live-state"),
    liveStateText: byId("live-state-text"),
    clear: byId("clear"),
    notice: byId("notice"),
    noticeText: byId("notice-text"),
    list: byId("request-list"),
    listEmpty: byId("list-empty"),
    count: byId("request-count"),
    shown: byId("shown"),
    filterPath: byId("filter-path"),
    filterStatus: byId("filter-status"),
    filterMethod: byId("filter-method"),
    detailEmpty: byId("detail-empty"),
    detailBody: byId("detail-body"),
    detailMethod: byId("detail-method"),
    detailPath: byId("detail-path"),
    detailStatus: byId("detail-status"),
    detailChips: byId("detail-chips"),
    detailFacts: byId("detail-facts"),
    detailError: byId("detail-error"),
    detailJson: byId("detail-json"),
    replay: byId("replay"),
    replayEdit: byId("replay-edit"),
    editForm: byId("edit-form"),
    editMethod: byId("edit-method"),
    editUri: byId("edit-uri"),
    editHeaders: byId("edit-headers"),
    editBody: byId("edit-body"),
    editBodyNote: byId("edit-body-note"),
    editError: byId("edit-error"),
    requestHeaders: byId("request-headers"),
    requestBody: byId("request-body"),
    responseHeaders: byId("response-headers"),
    responseBody: byId("response-body"),
    responseNone: byId("response-none"),
    streamSection: byId("stream-section"),
    streamTitle: byId("stream-title"),
    streamFacts: byId("stream-facts"),
    streamHead: byId("stream-head"),
    streamRows: byId("stream-rows"),
  };

  const state = {
    /** id -> {data: summary, row} */
    items: new Map(),
    selected: null,
    /** The selected exchange's detail (ngrok's JSON), and the summary it was fetched for. */
    detail: null,
    detailFor: "",
    /** A replay's new id, selected once the stream lists it. */
    pendingSelect: null,
    /** The first tunnel's local address (host:port), where a copied curl command goes. */
    localAddr: "",
    /** The id being replayed: its replay is selected when it shows up (before the answer, often). */
    pendingReplayOf: null,
    /** The body of the edited request when it is binary (sent back as it was). */
    editBinary: null,
  };

  // -- small helpers -----------------------------------------------------------------------------
  /** An element with a class and text; children appended. Text only: never HTML. */
  function el(tag, className, text, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function formatBytes(bytes) {
    const units = ["B", "kB", "MB", "GB"];
    let value = Number(bytes) || 0;
    let unit = 0;
    while (value >= 1000 && unit < units.length - 1) {
      value /= 1000;
      unit += 1;
    }
    return `${unit === 0 || value >= 100 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
  }

  function formatDuration(ns) {
    if (ns === null || ns === undefined) return "running";
    const ms = ns / 1e6;
    if (ms < 1) return `${(ns / 1e3).toFixed(0)} µs`;
    if (ms < 1000) return `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
    return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  }

  function formatTime(seconds) {
    const date = new Date(seconds * 1000);
    return date.toLocaleTimeString([], { hour12: false }) + "." + String(date.getMilliseconds()).padStart(3, "0");
  }

  function statusClass(summary) {
    if (summary.status === null || summary.status === undefined) return summary.done ? "status-failed" : "status-none";
    return `status-${Math.floor(summary.status / 100)}xx`;
  }

  function statusText(summary) {
    if (summary.status === null || summary.status === undefined) return summary.done ? "failed" : "…";
    return String(summary.status);
  }

  function methodBadge(node, method) {
    node.textContent = method;
    // A class only for the methods the style colours: a visitor's method never becomes a class name.
    node.className = "method-badge" + (/^(GET|POST|PUT|PATCH|DELETE)$/.test(method) ? ` method-${method}` : "");
  }

  function showNotice(text, kind) {
    view.noticeText.textContent = text;
    view.notice.classList.toggle("info", kind === "info");
    view.notice.hidden = false;
  }

  async function apiError(response) {
    try {
      const document_ = await response.json();
      if (document_ && typeof document_.msg === "string") return document_.msg;
    } catch (_) { /* not ngrok's error document */ }
    return `${response.status} ${response.statusText}`;
  }

  // -- the list ----------------------------------------------------------------------------------
  function matches(summary) {
    const path = view.filterPath.value.trim().toLowerCase();
    if (path && !summary.uri.toLowerCase().includes(path)) return false;
    const status = view.filterStatus.value;
    const failed = Boolean(summary.error) || (summary.status === null && summary.done);
    if (status === "failed" && !failed) return false;
    if (status && status !== "failed" && String(Math.floor((summary.status || 0) / 100)) !== status) return false;
    const method = view.filterMethod.value;
    return !method || summary.method === method;
  }

  /** A finished exchange's duration, or how long a running one has run (the agent's clock is this machine's). */
  function runningText(summary) {
    if (summary.done) return formatDuration(summary.duration);
    return `running ${formatDuration(Math.max(0, Date.now() / 1000 - summary.start) * 1e9)}`;
  }

  function fillRow(item) {
    const summary = item.data;
    const row = item.row;
    row.replaceChildren();
    const method = el("span");
    methodBadge(method, summary.method);
    item.duration = el("span", "duration", runningText(summary));
    const meta = el("span", "meta",
      null,
      el("span", "time", formatTime(summary.start)),
      item.duration,
      el("span", "size", `${formatBytes(summary.request_size)} ↑ ${formatBytes(summary.response_size)} ↓`));
    if (summary.kind !== "http") {
      const count = summary.messages === null || summary.messages === undefined ? "" : ` · ${summary.messages}`;
      meta.append(el("span", "chip stream", (summary.kind === "websocket" ? "WebSocket" : "SSE") + count));
    }
    if (summary.replay_of) meta.append(el("span", "chip replay", "replay"));
    if (summary.edited) meta.append(el("span", "chip edited", "edited"));
    if (summary.error) meta.append(el("span", "chip cut", "error"));
    row.append(method, el("span", "path", summary.uri), el("span", `status-badge ${statusClass(summary)}`, statusText(summary)), meta);
    row.title = summary.uri;
    row.hidden = !matches(summary);
  }

  function addOrUpdate(summary, fresh) {
    let item = state.items.get(summary.id);
    if (!item) {
      const row = el("li", "request");
      row.dataset.id = summary.id;
      row.tabIndex = 0;
      row.setAttribute("role", "button");
      item = { data: summary, row };
      state.items.set(summary.id, item);
      view.list.prepend(row);
      if (fresh) row.classList.add("fresh");
      if (fresh && state.pendingReplayOf && summary.replay_of === state.pendingReplayOf) {
        state.pendingReplayOf = null;
        state.pendingSelect = summary.id;
      }
    }
    item.data = summary;
    fillRow(item);
    if (summary.id === state.selected) {
      item.row.classList.add("selected");
      refreshDetail();
    }
    if (state.pendingSelect === summary.id) {
      state.pendingSelect = null;
      select(summary.id);
    }
  }

  function removeItem(id) {
    const item = state.items.get(id);
    if (!item) return;
    item.row.remove();
    state.items.delete(id);
    if (state.selected === id) deselect();
  }

  function updateCounts() {
    const total = state.items.size;
    let shown = 0;
    for (const item of state.items.values()) if (!item.row.hidden) shown += 1;
    view.count.textContent = String(total);
    view.shown.textContent = shown === total ? "" : `${shown} of ${total}`;
    view.listEmpty.hidden = total > 0;
  }

  function applyFilters() {
    for (const item of state.items.values()) item.row.hidden = !matches(item.data);
    updateCounts();
  }

  // -- the stream --------------------------------------------------------------------------------
  function setLive(live, text) {
    view.liveState.className = `live-state ${live ? "live" : text}`;
    view.liveStateText.textContent = live ? "live" : text;
  }

  function connect() {
    const source = new EventSource("/api/stream");
    source.addEventListener("open", () => setLive(true));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused for good (the agent answered something other than a stream: too many pages open).
        setLive(false, "stopped");
        showNotice("The live list stopped: too many inspector pages may be open. Close some, then reload this one.");
      } else {
        setLive(false, "reconnecting");
      }
    });
    source.addEventListener("tunnel", (event) => {
      const tunnel = JSON.parse(event.data);
      const url = typeof tunnel.public_url === "string" ? tunnel.public_url : "";
      view.publicUrl.textContent = url || "not connected yet";
      if (/^https?:\/\//.test(url)) view.publicUrl.href = url;
      else view.publicUrl.removeAttribute("href");
      view.localAddr.textContent = String(tunnel.addr || "");
      state.localAddr = String(tunnel.addr || "");
      // An agent serving several tunnels: the others follow the first, named.
      view.moreTunnels.replaceChildren();
      for (const other of (Array.isArray(tunnel.tunnels) ? tunnel.tunnels.slice(1) : [])) {
        const otherUrl = typeof other.public_url === "string" ? other.public_url : "";
        const link = el("a", null, otherUrl || "not connected yet");
        if (/^https?:\/\//.test(otherUrl)) link.href = otherUrl;
        link.rel = "noreferrer";
        link.target = "_blank";
        view.moreTunnels.append(el("div", "more-tunnel", null, el("dt", null, other.name),
          el("dd", null, null, link, el("span", "muted", ` → ${other.addr}`))));
      }
    });
    source.addEventListener("snapshot", (event) => {
      const summaries = JSON.parse(event.data);
      const keep = new Set(summaries.map((summary) => summary.id));
      for (const id of [...state.items.keys()]) if (!keep.has(id)) removeItem(id);
      // Newest first in the snapshot: add the oldest first, each on top.
      for (let i = summaries.length - 1; i >= 0; i -= 1) addOrUpdate(summaries[i], false);
      updateCounts();
    });
    source.addEventListener("upsert", (event) => {
      for (const summary of JSON.parse(event.data)) addOrUpdate(summary, true);
      updateCounts();
    });
    source.addEventListener("remove", (event) => {
      for (const id of JSON.parse(event.data)) removeItem(id);
      updateCounts();
    });
  }

  // -- the detail --------------------------------------------------------------------------------
  function select(id) {
    if (state.selected && state.items.has(state.selected)) state.items.get(state.selected).row.classList.remove("selected");
    state.selected = id;
    const item = state.items.get(id);
    if (item) item.row.classList.add("selected");
    state.detail = null;
    state.detailFor = "";
    view.editForm.hidden = true;
    view.curlBox.hidden = true;
    document.body.classList.add("showing-detail");
    refreshDetail();
  }

  function deselect() {
    state.selected = null;
    state.detail = null;
    view.detailBody.hidden = true;
    view.detailEmpty.hidden = false;
    document.body.classList.remove("showing-detail");
  }

  /** A running exchange changes at every look: its detail (bodies and all) is read again at most this often. */
  const REFRESH_MS = 1000;
  let fetching = false;
  let fetchAgain = false;
  let lastFetch = { id: null, at: 0 };
  let refreshTimer = null;

  /** Fetch the selected exchange's detail again when its summary changed (one fetch at a time). */
  async function refreshDetail() {
    const id = state.selected;
    const item = state.items.get(id);
    if (!id || !item) return;
    const signature = JSON.stringify(item.data);
    if (state.detail && state.detailFor === signature) return;
    if (fetching) {
      fetchAgain = true;
      return;
    }
    const wait = lastFetch.id === id ? lastFetch.at + REFRESH_MS - Date.now() : 0;
    if (wait > 0) {
      if (!refreshTimer) {
        refreshTimer = setTimeout(() => {
          refreshTimer = null;
          refreshDetail();
        }, wait);
      }
      return;
    }
    fetching = true;
    lastFetch = { id, at: Date.now() };
    try {
      const response = await fetch(`/api/requests/http/${encodeURIComponent(id)}`, { cache: "no-store" });
      if (state.selected !== id) return;
      if (!response.ok) {
        showNotice(`Could not read the request: ${await apiError(response)}`);
        return;
      }
      state.detail = await response.json();
      state.detailFor = signature;
      renderDetail(state.detail, item.data);
    } catch (error) {
      showNotice(`Could not read the request (${error}). Is the agent still running?`);
    } finally {
      fetching = false;
      if (fetchAgain) {
        fetchAgain = false;
        refreshDetail();
      }
    }
  }

  function fact(name, value) {
    view.detailFacts.append(el("div", null, null, el("dt", null, name), el("dd", null, value)));
  }

  function renderDetail(detail, summary) {
    view.detailEmpty.hidden = true;
    view.detailBody.hidden = false;
    const request = detail.request;
    methodBadge(view.detailMethod, request.method);
    view.detailPath.textContent = request.uri;
    view.detailStatus.className = `status-badge ${statusClass(summary)}`;
    view.detailStatus.textContent = detail.response ? detail.response.status : statusText(summary);

    view.detailChips.replaceChildren();
    if (detail.kind !== "http") view.detailChips.append(el("span", "chip stream", detail.kind === "websocket" ? "WebSocket" : "Server-Sent Events"));
    if (detail.replay_of) {
      const link = el("a", null, detail.replay_of);
      link.href = "#";
      link.addEventListener("click", (event) => {
        event.preventDefault();
        if (state.items.has(detail.replay_of)) select(detail.replay_of);
        else showNotice("The original is no longer kept (only the last --inspect-max-requests are).", "info");
      });
      view.detailChips.append(el("span", "chip replay", "replay of ", link));
    }
    if (detail.edited) view.detailChips.append(el("span", "chip edited", "edited"));

    view.detailFacts.replaceChildren();
    fact("Started", new Date(detail.start).toLocaleString());
    fact("Duration", detail.done ? formatDuration(detail.duration) : `running (${formatDuration(detail.duration)})`);
    fact("From", detail.remote_addr || (detail.replay_of ? "replay (this agent)" : "—"));
    fact("Request body", formatBytes(request.body_size));
    if (detail.response) fact("Response body", formatBytes(detail.response.body_size));
    view.detailError.hidden = !detail.error;
    view.detailError.textContent = detail.error || "";
    view.detailJson.href = `/api/requests/http/${encodeURIComponent(detail.id)}`;
    view.replay.disabled = detail.kind === "websocket";
    view.replayEdit.disabled = detail.kind === "websocket";
    view.replay.title = detail.kind === "websocket" ? "A WebSocket cannot be replayed: open it again from its client" : "";

    const requestMessage = splitMessage(request.raw);
    renderHeaders(view.requestHeaders, requestMessage.headers);
    // A WebSocket's "bodies" are its messages run together: the table below shows them one by one.
    const messagesBelow = detail.kind === "websocket" && Boolean(detail.stream && detail.stream.messages);
    renderBody(view.requestBody, requestMessage, request.body_size, request.body_truncated, messagesBelow);
    if (detail.response) {
      view.responseNone.hidden = true;
      const responseMessage = splitMessage(detail.response.raw);
      renderHeaders(view.responseHeaders, responseMessage.headers);
      renderBody(view.responseBody, responseMessage, detail.response.body_size, detail.response.body_truncated,
        messagesBelow);
    } else {
      view.responseNone.hidden = false;
      view.responseNone.textContent = detail.done ? "No response: the local service did not answer." : "No response yet.";
      view.responseHeaders.replaceChildren();
      view.responseBody.replaceChildren();
    }
    renderStream(detail);
  }

  // -- messages: raw bytes to head and body ------------------------------------------------------
  function decodeBase64(text) {
    const binary = atob(text || "");
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  /** ngrok's raw message: the head as sent (its header lines in order), then the body. */
  function splitMessage(raw) {
    const bytes = decodeBase64(raw);
    let end = -1;
    for (let i = 0; i + 3 < bytes.length; i += 1) {
      if (bytes[i] === 13 && bytes[i + 1] === 10 && bytes[i + 2] === 13 && bytes[i + 3] === 10) {
        end = i;
        break;
      }
    }
    const headEnd = end < 0 ? bytes.length : end;
    const head = new TextDecoder("latin1").decode(bytes.subarray(0, headEnd));
    const lines = head.split("\r\n");
    const headers = [];
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      if (colon > 0) headers.push([line.slice(0, colon), line.slice(colon + 1).trim()]);
    }
    let body = end < 0 ? new Uint8Array(0) : bytes.subarray(end + 4);
    const header = (name) => {
      const found = headers.find(([key]) => key.toLowerCase() === name);
      return found ? found[1].toLowerCase() : "";
    };
    let chunked = false;
    if (header("transfer-encoding").includes("chunked")) {
      const whole = dechunk(body);
      if (whole) {
        body = whole;
        chunked = true;
      }
    }
    return { startLine: lines[0], headers, body, chunked, contentType: header("content-type"),
             contentEncoding: header("content-encoding") };
  }

  /** A chunked body's data, or null when it is not whole (a cut body is shown as the bytes kept). */
  function dechunk(bytes) {
    const parts = [];
    let at = 0;
    const ascii = new TextDecoder("latin1");
    while (at < bytes.length) {
      let lineEnd = at;
      while (lineEnd + 1 < bytes.length && !(bytes[lineEnd] === 13 && bytes[lineEnd + 1] === 10)) lineEnd += 1;
      if (lineEnd + 1 >= bytes.length) return null;
      const size = parseInt(ascii.decode(bytes.subarray(at, lineEnd)).split(";")[0], 16);
      if (Number.isNaN(size)) return null;
      if (size === 0) {
        const total = parts.reduce((sum, part) => sum + part.length, 0);
        const out = new Uint8Array(total);
        let offset = 0;
        for (const part of parts) {
          out.set(part, offset);
          offset += part.length;
        }
        return out;
      }
      const start = lineEnd + 2;
      if (start + size + 2 > bytes.length) return null;
      parts.push(bytes.subarray(start, start + size));
      at = start + size + 2;
    }
    return null;
  }

  function renderHeaders(table, headers) {
    table.replaceChildren();
    const body = el("tbody");
    for (const [name, value] of headers) body.append(el("tr", null, null, el("th", null, name), el("td", null, value)));
    table.append(body);
  }

  function asText(bytes) {
    try {
      const text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
      // Control characters other than tab and line ends: binary, shown as hex.
      // eslint-disable-next-line no-control-regex
      if (/[\u0000-\u0008\u000e-\u001f\u007f]/.test(text)) return null;
      return text;
    } catch (_) {
      return null;
    }
  }

  function hexDump(bytes) {
    const lines = [];
    const shown = Math.min(bytes.length, HEX_LIMIT);
    for (let offset = 0; offset < shown; offset += 16) {
      const row = bytes.subarray(offset, Math.min(offset + 16, shown));
      let hex = "";
      let ascii = "";
      for (let i = 0; i < 16; i += 1) {
        if (i < row.length) {
          hex += row[i].toString(16).padStart(2, "0") + (i === 7 ? "  " : " ");
          ascii += row[i] >= 32 && row[i] < 127 ? String.fromCharCode(row[i]) : ".";
        } else {
          hex += i === 7 ? "    " : "   ";
        }
      }
      lines.push(`${offset.toString(16).padStart(8, "0")}  ${hex} |${ascii}|`);
    }
    return lines.join("\n");
  }

  /** How deep JSON text nests (brackets outside strings), counted without recursion. */
  function nesting(text) {
    let depth = 0;
    let deepest = 0;
    let inString = false;
    for (let i = 0; i < text.length; i += 1) {
      const c = text.charCodeAt(i);
      if (inString) {
        if (c === 92) i += 1; // a backslash escapes the next character
        else if (c === 34) inString = false;
      } else if (c === 34) {
        inString = true;
      } else if (c === 91 || c === 123) {
        depth += 1;
        if (depth > deepest) deepest = depth;
      } else if (c === 93 || c === 125) {
        depth -= 1;
      }
    }
    return deepest;
  }

  /** Pretty JSON with coloured tokens: spans whose text is set, never markup. */
  function jsonNode(value, indent) {
    const pre = el("pre", "body json");
    const append = (text, className) => pre.append(className ? el("span", className, text) : document.createTextNode(text));
    const walk = (item, depth, key) => {
      const pad = "  ".repeat(depth);
      append(pad);
      if (key !== undefined) {
        append(JSON.stringify(key), "json-key");
        append(": ");
      }
      if (Array.isArray(item) || (item && typeof item === "object")) {
        const entries = Array.isArray(item) ? item.map((v) => [undefined, v]) : Object.entries(item);
        const [open, close] = Array.isArray(item) ? ["[", "]"] : ["{", "}"];
        if (!entries.length) {
          append(open + close);
          return;
        }
        append(open + "\n");
        entries.forEach(([childKey, child], i) => {
          walk(child, depth + 1, childKey);
          append(i < entries.length - 1 ? ",\n" : "\n");
        });
        append(pad + close);
      } else if (typeof item === "string") {
        append(JSON.stringify(item), "json-string");
      } else if (typeof item === "number") {
        append(String(item), "json-number");
      } else {
        append(String(item), "json-literal");
      }
    };
    walk(value, indent);
    return pre;
  }

  /** ``bytes`` decompressed (gzip or deflate), up to DECODED_LIMIT: {bytes, cut}. */
  async function decompress(bytes, format) {
    const reader = new Blob([bytes]).stream().pipeThrough(new DecompressionStream(format)).getReader();
    const parts = [];
    let total = 0;
    let cut = false;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      parts.push(value);
      total += value.length;
      if (total >= DECODED_LIMIT) {
        cut = true;
        await reader.cancel();
        break;
      }
    }
    const out = new Uint8Array(Math.min(total, DECODED_LIMIT));
    let offset = 0;
    for (const part of parts) {
      const room = out.length - offset;
      out.set(room < part.length ? part.subarray(0, room) : part, offset);
      offset += Math.min(room, part.length);
    }
    return { bytes: out, cut };
  }

  /** The body's views: pretty (JSON, form, text) when it is one of those, else hex; raw text and hex on demand. */
  function renderBody(container, message, size, truncated, messagesBelow) {
    container.replaceChildren();
    // A newer render of this body makes a decompression still running for an older one moot.
    const token = {};
    container.renderToken = token;
    const bytes = message.body;
    if (messagesBelow) {
      container.append(el("p", "muted small", `${formatBytes(size)} in messages, listed below.`));
      return;
    }
    if (!bytes.length && !size) {
      container.append(el("p", "muted small", "No body."));
      return;
    }
    const bar = el("div", "body-bar");
    const kind = message.contentType.split(";")[0].trim() || "no Content-Type";
    bar.append(el("span", null, `${kind} · ${formatBytes(size)}`));
    if (truncated) {
      bar.append(el("span", "truncated", `truncated: only the first ${formatBytes(bytes.length)} were kept (--inspect-max-body)`));
    }
    const encoding = message.decoded ? "" : message.contentEncoding.trim();
    if (message.decoded) {
      const sent = `${formatBytes(message.decoded.sent.length)} as sent`;
      bar.append(el("span", null, `decompressed from ${message.decoded.encoding} for display (${sent}` +
        (message.decoded.cut ? `; only its first ${formatBytes(DECODED_LIMIT)} shown)` : ")")));
    } else if (encoding && encoding !== "identity") {
      const format = DECODABLE[encoding];
      const whole = !truncated;
      bar.append(el("span", null, `Content-Encoding: ${encoding} (shown as sent${format && !whole ? ": cut, so not decompressed" : ""})`));
      if (format && whole && typeof DecompressionStream === "function") {
        decompress(bytes, format).then((result) => {
          if (container.renderToken !== token) return;
          const decoded = { encoding, sent: bytes, cut: result.cut };
          renderBody(container, { ...message, body: result.bytes, decoded }, size, truncated, false);
        }).catch(() => { /* not really compressed so: it stays shown as sent */ });
      }
    }
    const views = el("span", "views");
    bar.append(views);
    container.append(bar);

    const text = encoding && encoding !== "identity" ? null : asText(bytes);
    const options = [];
    if (text !== null) {
      let parsed;
      let isJson = false;
      if (/json/.test(message.contentType) || /^\s*[[{]/.test(text)) {
        try {
          parsed = JSON.parse(text);
          isJson = true;
        } catch (_) { /* cut or not JSON: text */ }
      }
      // The pretty view recurses: a visitor's [[[[...]]]] a million deep gets the text view instead.
      if (isJson && text.length <= TEXT_LIMIT && nesting(text) <= MAX_JSON_DEPTH) {
        options.push(["JSON", () => jsonNode(parsed, 0)]);
      }
      if (message.contentType.startsWith("application/x-www-form-urlencoded")) {
        options.push(["Form", () => formTable(text)]);
      }
      options.push(["Text", () => el("pre", "body text", text.length > TEXT_LIMIT ? text.slice(0, TEXT_LIMIT) + "\n…" : text)]);
    }
    const hexOf = (data) => () => {
      const pre = el("pre", "body hex", hexDump(data));
      if (data.length > HEX_LIMIT) pre.append(document.createTextNode(`\n… ${data.length - HEX_LIMIT} more bytes`));
      return pre;
    };
    options.push(["Hex", hexOf(bytes)]);
    if (message.decoded) options.push(["As sent", hexOf(message.decoded.sent)]);
    let current = null;
    const show = (index) => {
      if (current) current.remove();
      current = options[index][1]();
      container.append(current);
      views.querySelectorAll("button").forEach((button, i) => button.setAttribute("aria-pressed", String(i === index)));
    };
    options.forEach(([name], index) => {
      const button = el("button", null, name);
      button.type = "button";
      button.addEventListener("click", () => show(index));
      views.append(button);
    });
    show(0);
  }

  function formTable(text) {
    const table = el("table", "form");
    const body = el("tbody");
    for (const [key, value] of new URLSearchParams(text)) body.append(el("tr", null, null, el("th", null, key), el("td", null, value)));
    table.append(body);
    return table;
  }

  function renderStream(detail) {
    const stream = detail.stream;
    if (!stream || (!stream.messages && !stream.events)) {
      view.streamSection.hidden = true;
      return;
    }
    view.streamSection.hidden = false;
    const websocket = Array.isArray(stream.messages);
    view.streamTitle.textContent = websocket ? "WebSocket messages" : "Events";
    const items = websocket ? stream.messages : stream.events;
    let facts = `${stream.count} seen, ${formatBytes(stream.bytes)}`;
    if (stream.dropped) facts += `; the ${stream.dropped} oldest are no longer kept (the last ${stream.limits ? stream.limits.max_items : items.length} are)`;
    if (websocket && stream.close) {
      facts += `; closed by the ${stream.close.direction === "in" ? "visitor" : "local service"} with code ${stream.close.code}`;
      if (stream.close.reason) facts += ` (${stream.close.reason})`;
    }
    view.streamFacts.textContent = facts;
    const headRow = el("tr");
    for (const name of websocket ? ["#", "Time", "Direction", "Type", "Size", "Data"] : ["#", "Time", "Event", "Id", "Size", "Data"]) {
      headRow.append(el("th", null, name));
    }
    view.streamHead.replaceChildren(headRow);
    view.streamRows.replaceChildren();
    for (const item of items) {
      const row = el("tr");
      row.append(el("td", null, item.seq), el("td", null, `+${formatDuration(item.time)}`));
      let data;
      if (websocket) {
        const incoming = item.direction === "in";
        row.append(el("td", incoming ? "dir-in" : "dir-out", incoming ? "→ to local" : "← from local"), el("td", null, item.type));
        const bytes = decodeBase64(item.data);
        const text = item.type === "text" ? asText(bytes) : null;
        data = text !== null ? text : hexDump(bytes.subarray(0, 256)) + (bytes.length > 256 ? "\n…" : "");
      } else {
        row.append(el("td", null, item.event), el("td", null, item.id === null ? "" : item.id));
        data = item.data;
      }
      row.append(el("td", null, formatBytes(item.size)));
      const cell = el("td", "data", data);
      if (item.truncated) cell.append(el("span", "truncated", " … (cut)"));
      row.append(cell);
      view.streamRows.append(row);
    }
  }

  // -- copy as curl ----------------------------------------------------------------------------
  /** One shell word: single-quoted, a quote inside written '\'' (nothing in it is expanded). */
  function shellWord(text) {
    return `'${String(text).replace(/'/g, "'\\''")}'`;
  }

  /** The request as a curl command line to the local service (the first tunnel's, as a replay). */
  function curlCommand(detail) {
    const message = splitMessage(detail.request.raw);
    const words = ["curl", "-i", "-X", shellWord(detail.request.method)];
    for (const [name, value] of message.headers) {
      // curl frames the body itself; the rest goes as it went, Host included.
      if (/^(content-length|transfer-encoding)$/i.test(name)) continue;
      words.push("-H", shellWord(`${name}: ${value}`));
    }
    let note = "";
    if (message.body.length) {
      const text = asText(message.body);
      if (text === null) {
        words.push("--data-binary", "@-");
        note = "The body is binary: give it on standard input.";
      } else {
        words.push("--data-binary", shellWord(text));
      }
      if (detail.request.body_truncated) note += " The body was cut when captured: only its start is here.";
    }
    words.push(shellWord(`http://${state.localAddr || "localhost"}${detail.request.uri}`));
    return { command: words.join(" "), note };
  }

  async function copyAsCurl() {
    if (!state.detail) return;
    const { command, note } = curlCommand(state.detail);
    view.curl.textContent = command;
    view.curlBox.hidden = false;
    let copied = false;
    try {
      await navigator.clipboard.writeText(command);
      copied = true;
    } catch (_) { /* no clipboard permission: the command is on screen to copy */ }
    view.curlNote.textContent = `${copied ? "Copied." : "Copy it from here."} ${note}`.trim();
  }

  // -- replay ------------------------------------------------------------------------------------
  async function sendReplay(body, button) {
    button.disabled = true;
    state.pendingReplayOf = body.id;
    try {
      const response = await fetch("/api/requests/http", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (response.status !== 204) {
        state.pendingReplayOf = null;
        const message = await apiError(response);
        showNotice(`The replay failed: ${message}`);
        return { ok: false, message };
      }
      view.notice.hidden = true;
      const location = response.headers.get("Location") || "";
      const newId = location.split("/").pop();
      if (newId && newId !== state.selected) {
        state.pendingReplayOf = null;
        if (state.items.has(newId)) select(newId);
        else state.pendingSelect = newId;
      }
      return { ok: true };
    } catch (error) {
      state.pendingReplayOf = null;
      showNotice(`The replay could not be sent (${error}). Is the agent still running?`);
      return { ok: false, message: String(error) };
    } finally {
      button.disabled = false;
    }
  }

  function openEditForm() {
    const detail = state.detail;
    if (!detail) return;
    const message = splitMessage(detail.request.raw);
    view.editMethod.value = detail.request.method;
    view.editUri.value = detail.request.uri;
    // Framing is the agent's job for an edited request: Content-Length follows the body sent.
    view.editHeaders.value = message.headers
      .filter(([name]) => !/^(content-length|transfer-encoding)$/i.test(name))
      .map(([name, value]) => `${name}: ${value}`).join("\n");
    const text = asText(message.body);
    state.editBinary = null;
    view.editBody.disabled = false;
    const notes = [];
    if (text === null) {
      state.editBinary = message.body;
      view.editBody.value = "";
      view.editBody.disabled = true;
      notes.push(`The body is binary (${formatBytes(message.body.length)}): it is sent again as it was.`);
    } else {
      view.editBody.value = text;
    }
    if (detail.request.body_truncated) notes.push("The body was cut when captured: only its start is here, and that is what will be sent.");
    view.editBodyNote.textContent = notes.join(" ");
    view.editBodyNote.hidden = !notes.length;
    view.editError.hidden = true;
    view.editForm.hidden = false;
    view.editMethod.focus();
  }

  function parseHeaderLines(text) {
    const headers = [];
    const lines = text.split(/\r?\n/);
    for (let i = 0; i < lines.length; i += 1) {
      const line = lines[i];
      if (!line.trim()) continue;
      const colon = line.indexOf(":");
      if (colon <= 0) throw new Error(`header line ${i + 1} has no "Name: value": ${line.slice(0, 80)}`);
      headers.push([line.slice(0, colon).trim(), line.slice(colon + 1).trim()]);
    }
    return headers;
  }

  function base64Of(bytes) {
    let binary = "";
    for (let i = 0; i < bytes.length; i += 1) binary += String.fromCharCode(bytes[i]);
    return btoa(binary);
  }

  async function submitEdits(event) {
    event.preventDefault();
    const detail = state.detail;
    if (!detail) return;
    let headers;
    try {
      headers = parseHeaderLines(view.editHeaders.value);
    } catch (error) {
      view.editError.textContent = error.message;
      view.editError.hidden = false;
      return;
    }
    const body = { id: detail.id, tunnel_name: detail.tunnel_name || TUNNEL_NAME, method: view.editMethod.value.trim(),
                   uri: view.editUri.value.trim(), headers };
    if (state.editBinary) body.body_base64 = base64Of(state.editBinary);
    else body.body = view.editBody.value;
    const result = await sendReplay(body, event.submitter || view.replay);
    if (result.ok) {
      view.editForm.hidden = true;
    } else {
      view.editError.textContent = result.message;
      view.editError.hidden = false;
    }
  }

  // -- wiring ------------------------------------------------------------------------------------
  view.list.addEventListener("click", (event) => {
    const row = event.target.closest("li.request");
    if (row) select(row.dataset.id);
  });
  view.list.addEventListener("keydown", (event) => {
    const row = event.target.closest("li.request");
    if (!row) return;
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      select(row.dataset.id);
    } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      let next = event.key === "ArrowDown" ? row.nextElementSibling : row.previousElementSibling;
      while (next && next.hidden) next = event.key === "ArrowDown" ? next.nextElementSibling : next.previousElementSibling;
      if (next) {
        next.focus();
        select(next.dataset.id);
      }
    }
  });
  for (const input of [view.filterPath, view.filterStatus, view.filterMethod]) input.addEventListener("input", applyFilters);
  byId("notice-dismiss").addEventListener("click", () => { view.notice.hidden = true; });
  byId("back").addEventListener("click", deselect);
  view.replay.addEventListener("click", () => {
    if (state.detail) sendReplay({ id: state.detail.id, tunnel_name: state.detail.tunnel_name || TUNNEL_NAME }, view.replay);
  });
  view.replayEdit.addEventListener("click", openEditForm);
  view.copyCurl.addEventListener("click", copyAsCurl);
  byId("edit-cancel").addEventListener("click", () => { view.editForm.hidden = true; });
  view.editForm.addEventListener("submit", submitEdits);
  view.clear.addEventListener("click", async () => {
    const response = await fetch("/api/requests/http", { method: "DELETE" });
    if (response.status !== 204) showNotice(`Could not clear the list: ${await apiError(response)}`);
  });
  // Running exchanges (a long download, an open stream) count their time up on screen.
  setInterval(() => {
    for (const item of state.items.values()) if (!item.data.done) item.duration.textContent = runningText(item.data);
  }, 1000);
  connect();
})();
