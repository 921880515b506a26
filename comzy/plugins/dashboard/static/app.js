// The Comzy admin dashboard: one WebSocket feed (/feed) drives everything on the page.
//
// Aliases, paths and client addresses come from visitors and agents, so every piece of data
// reaches the page through textContent or setAttribute, never through innerHTML.
"use strict";

(() => {
  /** Rows kept in the live request stream. */
  const MAX_REQUEST_ROWS = 200;
  /** Seconds of per-second buckets kept for the charts (the widest window the page offers). */
  const KEEP_SECONDS = 600;
  /** Reconnect delays: doubling from the first to the last, with some jitter. */
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_LAST_MS = 15000;
  /** Seconds averaged for the "Requests/s" figure. */
  const RATE_SECONDS = 10;

  const byId = (id) => document.getElementById(id);

  const view = {
    version: byId("server-version"),
    domain: byId("server-domain"),
    agentUrl: byId("server-agent-url"),
    startCommand: byId("start-command"),
    plugins: byId("server-plugins"),
    feedState: byId("feed-state"),
    feedStateText: byId("feed-state-text"),
    notice: byId("notice"),
    noticeText: byId("notice-text"),
    tunnelRows: byId("tunnel-rows"),
    tunnelsEmpty: byId("tunnels-empty"),
    tunnelCount: byId("tunnel-count"),
    requestRows: byId("request-rows"),
    requestsEmpty: byId("requests-empty"),
    requestShown: byId("request-shown"),
    filter: byId("request-filter"),
    chartWindow: byId("chart-window"),
    requestsChart: byId("chart-requests"),
    bytesChart: byId("chart-bytes"),
    statTunnels: byId("stat-tunnels"),
    statRequests: byId("stat-requests"),
    statRate: byId("stat-rate"),
    statBytes: byId("stat-bytes"),
  };

  const state = {
    /** alias -> {data, row, cells, button} */
    tunnels: new Map(),
    /** unix second -> [requests, bytes in, bytes out] */
    buckets: new Map(),
    /** Server clock minus ours, in seconds: relative times and chart edges follow the server. */
    clockOffset: 0,
    windowSeconds: Number(view.chartWindow.value) || 300,
    filter: "",
    /** Requests in the snapshot that may also arrive as events (published while it was built). */
    snapshotKeys: new Set(),
    socket: null,
    live: false,
    backoffMs: BACKOFF_FIRST_MS,
    reconnectAt: 0,
  };

  // -- formatting ------------------------------------------------------------------------------
  const serverNow = () => Date.now() / 1000 + state.clockOffset;

  function formatBytes(bytes) {
    const units = ["B", "kB", "MB", "GB", "TB"];
    let value = Number(bytes) || 0;
    let unit = 0;
    while (Math.abs(value) >= 1000 && unit < units.length - 1) {
      value /= 1000;
      unit += 1;
    }
    const digits = unit === 0 || value >= 100 ? 0 : value >= 10 ? 1 : 2;
    return `${value.toFixed(digits)} ${units[unit]}`;
  }

  function formatCount(value) {
    if (value >= 100 || Number.isInteger(value)) return Math.round(value).toLocaleString();
    return value >= 10 ? value.toFixed(1) : value.toFixed(2);
  }

  function formatDuration(ms) {
    if (ms == null) return "–";
    if (ms < 1) return `${ms.toFixed(2)} ms`;
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(2)} s`;
    return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
  }

  function spanText(seconds) {
    if (seconds < 60) return `${Math.floor(seconds)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
    return `${Math.floor(seconds / 86400)} d ${Math.floor((seconds % 86400) / 3600)} h`;
  }

  function ago(unix) {
    const seconds = Math.max(0, serverNow() - unix);
    return seconds < 5 ? "just now" : `${spanText(seconds)} ago`;
  }

  function until(unix) {
    if (unix == null) return "never";
    const seconds = unix - serverNow();
    return seconds <= 0 ? "expiring" : `in ${spanText(seconds)}`;
  }

  const pad = (n) => String(n).padStart(2, "0");

  function clock(unix, withSeconds = true) {
    const date = new Date((unix - state.clockOffset) * 1000);
    const hm = `${pad(date.getHours())}:${pad(date.getMinutes())}`;
    return withSeconds ? `${hm}:${pad(date.getSeconds())}` : hm;
  }

  function fullDate(unix) {
    return new Date((unix - state.clockOffset) * 1000).toLocaleString();
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text != null) node.textContent = String(text);
    return node;
  }

  // -- notices and the feed's state ------------------------------------------------------------
  function showNotice(message) {
    view.noticeText.textContent = message;
    view.notice.hidden = false;
  }

  byId("notice-dismiss").addEventListener("click", () => {
    view.notice.hidden = true;
  });

  function setFeedState(kind, text) {
    view.feedState.className = `live-state ${kind}`;
    view.feedStateText.textContent = text || kind;
  }

  // -- tunnels -----------------------------------------------------------------------------------
  function safeUrl(url) {
    // The server builds public URLs, but only ever link to http(s): never javascript: or data:.
    return typeof url === "string" && /^https?:\/\//i.test(url) ? url : null;
  }

  function formatSummaryValue(value) {
    if (value === true) return "yes";
    if (value === false) return "no";
    if (Array.isArray(value)) return value.map(formatSummaryValue).join(", ");
    if (value !== null && typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function policyText(policies) {
    // Each plugin's public summary (describe_policy), e.g. "rate_limit: operator 60/min, owner 10/min".
    return Object.entries(policies || {}).map(([plugin, summary]) => {
      // An empty list (ip_filter's "deny" when only "allow" is set) says nothing: left out.
      const parts = Object.entries(summary || {})
        .filter(([, value]) => value !== null && value !== undefined && !(Array.isArray(value) && value.length === 0))
        .map(([key, value]) => `${key.replace(/_/g, " ")} ${formatSummaryValue(value)}`);
      return parts.length ? `${plugin}: ${parts.join(", ")}` : plugin;
    }).join("; ");
  }

  function addTunnel(data) {
    removeTunnel(data.alias);
    const row = el("tr");
    row.setAttribute("data-alias", data.alias);
    const cells = {};
    const aliasCell = el("td", "alias");
    const url = safeUrl(data.url);
    if (url) {
      const link = el("a", null, data.alias);
      link.href = url;
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      link.title = url;
      aliasCell.append(link);
    } else {
      aliasCell.textContent = data.alias;
    }
    row.append(aliasCell);
    cells.owner = el("td", data.user ? "owner" : "owner muted", data.user || "anonymous");
    cells.port = el("td", "num mono", data.port);
    cells.client = el("td", "mono", data.client || "–");
    cells.since = el("td", "since");
    cells.since.title = fullDate(data.since);
    cells.expires = el("td", "expires");
    if (data.expires_at != null) cells.expires.title = fullDate(data.expires_at);
    const policies = policyText(data.policies);
    cells.policy = el("td", policies ? "policy" : "policy muted", policies || "none");
    cells.policy.title = policies;
    cells.requests = el("td", "num requests");
    cells.bytesIn = el("td", "num bytes-in");
    cells.bytesOut = el("td", "num bytes-out");
    const actions = el("td", "actions");
    const button = el("button", "danger", "Close");
    button.type = "button";
    button.setAttribute("aria-label", `Close tunnel ${data.alias}`);
    button.addEventListener("click", () => closeTunnel(data.alias, button));
    actions.append(button);
    row.append(cells.owner, cells.port, cells.client, cells.since, cells.expires, cells.policy, cells.requests,
      cells.bytesIn, cells.bytesOut, actions);
    const entry = { data, row, cells, button };
    state.tunnels.set(data.alias, entry);
    refreshTunnel(entry);
    // Newest tunnels first.
    view.tunnelRows.prepend(row);
    tunnelsChanged();
  }

  function refreshTunnel(entry) {
    const { data, cells } = entry;
    cells.since.textContent = ago(data.since);
    cells.expires.textContent = until(data.expires_at);
    cells.expires.classList.toggle("soon", data.expires_at != null && data.expires_at - serverNow() < 60);
    cells.requests.textContent = Number(data.requests || 0).toLocaleString();
    cells.bytesIn.textContent = formatBytes(data.bytes_in);
    cells.bytesOut.textContent = formatBytes(data.bytes_out);
  }

  function removeTunnel(alias, session) {
    const entry = state.tunnels.get(alias);
    if (!entry) return;
    // A takeover registers the new session before the old one's close arrives: keep the new row.
    if (session !== undefined && entry.data.session !== session) return;
    entry.row.remove();
    state.tunnels.delete(alias);
    tunnelsChanged();
  }

  function replaceTunnels(list) {
    for (const alias of [...state.tunnels.keys()]) removeTunnel(alias);
    // Oldest first, so that prepending leaves the newest on top.
    [...list].sort((a, b) => a.since - b.since).forEach(addTunnel);
  }

  function tunnelsChanged() {
    const count = state.tunnels.size;
    view.tunnelCount.textContent = String(count);
    view.statTunnels.textContent = String(count);
    view.tunnelsEmpty.hidden = count > 0;
  }

  async function closeTunnel(alias, button) {
    const question = `Close the tunnel "${alias}"?\n\nIts agent is disconnected and told not to reconnect; ` +
      "visitors get an error page from then on.";
    if (!window.confirm(question)) return;
    button.disabled = true;
    button.textContent = "Closing…";
    const restore = () => {
      button.disabled = false;
      button.textContent = "Close";
    };
    let response;
    try {
      response = await fetch(`/api/tunnels/${encodeURIComponent(alias)}`, {
        method: "DELETE", headers: { accept: "application/json" }, credentials: "same-origin",
      });
    } catch (error) {
      restore();
      showNotice(`Could not reach the server to close ${alias} (${error.message}); check that it is running.`);
      return;
    }
    if (response.status === 401) {
      window.location.assign("/login");
      return;
    }
    if (response.status === 404) {
      removeTunnel(alias); // already gone: the feed will say so too
      return;
    }
    if (!response.ok) {
      restore();
      let reason = `HTTP ${response.status}`;
      try {
        reason = (await response.json()).error || reason;
      } catch (_) { /* not JSON: keep the status */ }
      showNotice(`Could not close ${alias}: ${reason}`);
      return;
    }
    // The row goes when `tunnel_closed` arrives; without a live feed, nothing would remove it.
    if (!state.live) removeTunnel(alias);
  }

  // -- requests ----------------------------------------------------------------------------------
  function statusClass(status) {
    if (!status) return "status-none";
    if (status === 101) return "status-ws";
    return `status-${Math.floor(status / 100)}xx`;
  }

  function requestKey(event) {
    return [event.time, event.alias, event.method, event.path, event.status, event.duration_ms].join("\u0000");
  }

  function matchesFilter(row) {
    if (!state.filter) return true;
    return row.getAttribute("data-alias").includes(state.filter) ||
      row.getAttribute("data-path").toLowerCase().includes(state.filter);
  }

  function addRequestRow(event, live) {
    const row = el("tr", live ? "fresh" : null);
    row.setAttribute("data-alias", String(event.alias || ""));
    row.setAttribute("data-path", String(event.path || ""));
    const time = el("td", "mono muted", clock(event.time));
    time.title = fullDate(event.time);
    const method = el("td", "method");
    method.append(el("span", `method-badge method-${/^[A-Z]+$/.test(event.method) ? event.method : "OTHER"}`,
      event.websocket ? "WS" : event.method));
    const path = el("td", "path mono", event.path);
    path.title = event.path;
    const status = el("td", "num");
    const badge = el("span", `status-badge ${statusClass(event.status)}`, event.status || "–");
    if (event.error) {
      badge.title = event.error;
      row.classList.add("failed");
    }
    status.append(badge);
    row.append(time, el("td", "alias mono", event.alias), method, path, status,
      el("td", "num mono", formatDuration(event.duration_ms)),
      el("td", "num mono", formatBytes(event.bytes_in)), el("td", "num mono", formatBytes(event.bytes_out)));
    row.hidden = !matchesFilter(row);
    view.requestRows.prepend(row);
    while (view.requestRows.rows.length > MAX_REQUEST_ROWS) view.requestRows.lastElementChild.remove();
  }

  function requestsChanged() {
    const total = view.requestRows.rows.length;
    view.requestsEmpty.hidden = total > 0;
    if (!state.filter) {
      view.requestShown.textContent = "";
      return;
    }
    let shown = 0;
    for (const row of view.requestRows.rows) if (!row.hidden) shown += 1;
    view.requestShown.textContent = `${shown} of ${total}`;
  }

  function onRequest(event) {
    const key = requestKey(event);
    if (state.snapshotKeys.delete(key)) return; // already counted in the snapshot
    addRequestRow(event, true);
    requestsChanged();
    const second = Math.floor(event.time);
    const bucket = state.buckets.get(second);
    if (bucket) {
      bucket[0] += 1;
      bucket[1] += event.bytes_in || 0;
      bucket[2] += event.bytes_out || 0;
    } else {
      state.buckets.set(second, [1, event.bytes_in || 0, event.bytes_out || 0]);
    }
    const tunnel = state.tunnels.get(event.alias);
    if (tunnel && !event.refused_by) { // a refused request never reached the tunnel: not in its totals
      tunnel.data.requests = (tunnel.data.requests || 0) + 1;
      tunnel.data.bytes_in = (tunnel.data.bytes_in || 0) + (event.bytes_in || 0);
      tunnel.data.bytes_out = (tunnel.data.bytes_out || 0) + (event.bytes_out || 0);
      refreshTunnel(tunnel);
    }
  }

  view.filter.addEventListener("input", () => {
    state.filter = view.filter.value.trim().toLowerCase();
    for (const row of view.requestRows.rows) row.hidden = !matchesFilter(row);
    requestsChanged();
  });

  // -- charts ------------------------------------------------------------------------------------
  function cssColor(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
  }

  /** A round grid step (1, 2, 2.5 or 5 times a power of ten, at least ``smallest``) at or above ``value``. */
  function niceStep(value, smallest) {
    if (value <= smallest) return smallest;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  /** A byte figure for an axis: without trailing zeros ("50 kB", "2.5 kB", not "50.0 kB", "2.50 kB"). */
  const axisBytes = (value) => formatBytes(value).replace(/(\.\d*?)0+ /, "$1 ").replace(/\. /, " ");

  function labelStep(windowSeconds) {
    if (windowSeconds <= 60) return 15;
    if (windowSeconds <= 300) return 60;
    return 120;
  }

  /** Draw lines (with a soft fill under the first) for ``series`` over the chart window. */
  function drawChart(canvas, series, format, smallestStep) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const left = 64;
    const right = 12;
    const top = 10;
    const bottom = 24;
    const plotWidth = width - left - right;
    const plotHeight = height - top - bottom;
    const windowSeconds = state.windowSeconds;
    // The current second is still filling up: the chart ends at the last complete one.
    const end = Math.floor(serverNow()) - 1;
    const start = end - windowSeconds + 1;
    const x = (second) => left + ((second - start) / Math.max(1, windowSeconds - 1)) * plotWidth;

    let peak = 0;
    for (const line of series) for (const value of line.values) peak = Math.max(peak, value);
    const lines = 4;
    const max = niceStep(peak / lines, smallestStep) * lines;
    const y = (value) => top + plotHeight - (value / max) * plotHeight;

    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    ctx.strokeStyle = cssColor("--chart-grid");
    ctx.fillStyle = cssColor("--chart-text");
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= lines; i += 1) {
      const value = (max * i) / lines;
      const lineY = Math.round(y(value)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, lineY);
      ctx.lineTo(left + plotWidth, lineY);
      ctx.stroke();
      ctx.fillText(format(value), left - 8, lineY);
    }
    // Time labels sit on round clock times, so they move left as time passes.
    const step = labelStep(windowSeconds);
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let second = Math.ceil(start / step) * step; second <= end; second += step) {
      const labelX = Math.round(x(second)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(labelX, top);
      ctx.lineTo(labelX, top + plotHeight);
      ctx.stroke();
      if (labelX > left + 20 && labelX < left + plotWidth - 20) {
        ctx.fillText(clock(second, step < 60), labelX, top + plotHeight + 6);
      }
    }

    series.forEach((line, index) => {
      const color = cssColor(line.color);
      ctx.beginPath();
      line.values.forEach((value, i) => {
        const px = x(start + i);
        const py = y(value);
        if (i === 0) ctx.moveTo(px, py);
        else ctx.lineTo(px, py);
      });
      ctx.lineWidth = 1.6;
      ctx.lineJoin = "round";
      ctx.strokeStyle = color;
      ctx.stroke();
      if (index === 0) {
        ctx.lineTo(x(end), y(0));
        ctx.lineTo(x(start), y(0));
        ctx.closePath();
        const gradient = ctx.createLinearGradient(0, top, 0, top + plotHeight);
        gradient.addColorStop(0, cssColor(`${line.color}-fill`));
        gradient.addColorStop(1, "transparent");
        ctx.fillStyle = gradient;
        ctx.fill();
      }
    });
  }

  /** Per-second values over the chart window (oldest first), for bucket field ``index``. */
  function windowValues(index) {
    const end = Math.floor(serverNow()) - 1;
    const values = new Array(state.windowSeconds);
    for (let i = 0; i < state.windowSeconds; i += 1) {
      const bucket = state.buckets.get(end - state.windowSeconds + 1 + i);
      values[i] = bucket ? bucket[index] : 0;
    }
    return values;
  }

  function pruneBuckets() {
    const oldest = Math.floor(serverNow()) - KEEP_SECONDS - 5;
    for (const second of state.buckets.keys()) if (second < oldest) state.buckets.delete(second);
  }

  function drawCharts() {
    const requests = windowValues(0);
    const bytesIn = windowValues(1);
    const bytesOut = windowValues(2);
    // Requests come whole: the grid never shows 0.25 of one.
    drawChart(view.requestsChart, [{ values: requests, color: "--chart-requests" }], formatCount, 1);
    drawChart(view.bytesChart, [{ values: bytesOut, color: "--chart-out" }, { values: bytesIn, color: "--chart-in" }],
      axisBytes, 1);

    const sum = (values) => values.reduce((total, value) => total + value, 0);
    view.statRequests.textContent = sum(requests).toLocaleString();
    view.statRate.textContent = formatCount(sum(requests.slice(-RATE_SECONDS)) / RATE_SECONDS);
    view.statBytes.textContent = `${formatBytes(sum(bytesIn))} / ${formatBytes(sum(bytesOut))}`;
  }

  view.chartWindow.addEventListener("change", () => {
    state.windowSeconds = Number(view.chartWindow.value) || 300;
    const label = view.chartWindow.selectedOptions[0].textContent;
    for (const node of document.querySelectorAll(".window-label")) node.textContent = `(${label})`;
    drawCharts();
  });

  if (window.ResizeObserver) new ResizeObserver(() => drawCharts()).observe(view.requestsChart);

  // -- the feed ----------------------------------------------------------------------------------
  function onSnapshot(snapshot) {
    state.clockOffset = snapshot.time - Date.now() / 1000;
    const server = snapshot.server || {};
    view.version.textContent = server.version || "?";
    view.domain.textContent = server.base_domain || "?";
    // The public agent URL (COMZY_PUBLIC_AGENT_URL) when set: behind a proxy, the internal one is no use.
    view.agentUrl.textContent = server.agent_url || "not on this node";
    view.startCommand.textContent = server.agent_url ? `comzy 3000 --server ${server.agent_url}` : "comzy 3000";
    view.plugins.replaceChildren();
    const plugins = server.plugins || [];
    if (plugins.length === 0) view.plugins.textContent = "none";
    for (const name of plugins) view.plugins.append(el("span", "chip", name));

    replaceTunnels(snapshot.tunnels || []);

    view.requestRows.replaceChildren();
    state.snapshotKeys = new Set();
    for (const event of snapshot.recent || []) {
      addRequestRow(event, false);
      state.snapshotKeys.add(requestKey(event));
    }
    requestsChanged();

    state.buckets = new Map();
    for (const bucket of snapshot.series || []) {
      state.buckets.set(bucket.t, [bucket.requests, bucket.bytes_in, bucket.bytes_out]);
    }
    drawCharts();
  }

  function onEvent(event) {
    switch (event.type) {
      case "snapshot":
        onSnapshot(event);
        state.live = true;
        state.backoffMs = BACKOFF_FIRST_MS;
        setFeedState("live");
        break;
      case "tunnel_registered":
        addTunnel(event.tunnel);
        break;
      case "tunnel_closed":
        removeTunnel(event.alias, event.tunnel ? event.tunnel.session : undefined);
        break;
      case "request":
        onRequest(event);
        break;
      case "lagged":
        showNotice(`This page fell behind the live feed and missed ${event.dropped} event(s); ` +
          "it reloaded its view from a fresh snapshot.");
        resync();
        break;
      default:
        break; // a newer server's event: ignore it
    }
  }

  /** Start over from a new snapshot: after missed events, the counts and lists are incomplete. */
  function resync() {
    const socket = state.socket;
    if (!socket) return;
    state.socket = null; // so that its close handler does not schedule a reconnect as well
    socket.close(1000, "resync after lag");
    connect();
  }

  async function checkLoggedIn() {
    // A browser hides why a WebSocket handshake failed: ask the API whether the login still holds.
    try {
      const response = await fetch("/api/tunnels", { headers: { accept: "application/json" } });
      if (response.status === 401) window.location.assign("/login");
    } catch (_) { /* server unreachable: keep retrying the feed */ }
  }

  function connect() {
    state.reconnectAt = 0;
    setFeedState(state.live ? "reconnecting" : "connecting", "connecting");
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${window.location.host}/feed`);
    let opened = false;
    state.socket = socket;
    socket.addEventListener("open", () => {
      opened = true;
    });
    socket.addEventListener("message", (message) => {
      if (state.socket !== socket) return; // replaced by a resync
      let event;
      try {
        event = JSON.parse(message.data);
      } catch (_) {
        return;
      }
      onEvent(event);
    });
    socket.addEventListener("close", () => {
      if (state.socket !== socket) return;
      state.socket = null;
      state.live = false;
      if (!opened) checkLoggedIn();
      const delay = state.backoffMs * (0.8 + Math.random() * 0.4);
      state.backoffMs = Math.min(state.backoffMs * 2, BACKOFF_LAST_MS);
      state.reconnectAt = Date.now() + delay;
      showReconnecting();
      window.setTimeout(connect, delay);
    });
  }

  function showReconnecting() {
    if (!state.reconnectAt) return;
    const seconds = Math.max(0, Math.ceil((state.reconnectAt - Date.now()) / 1000));
    setFeedState("reconnecting", seconds > 0 ? `reconnecting in ${seconds} s` : "reconnecting");
  }

  // -- the clock ---------------------------------------------------------------------------------
  // Once a second, just after the second turns: the charts scroll even without traffic.
  function tick() {
    pruneBuckets();
    drawCharts();
    for (const entry of state.tunnels.values()) refreshTunnel(entry);
    showReconnecting();
    const serverMs = Date.now() + state.clockOffset * 1000;
    window.setTimeout(tick, 1000 - (((serverMs % 1000) + 1000) % 1000) + 20);
  }

  tunnelsChanged();
  requestsChanged();
  connect();
  tick();
})();
