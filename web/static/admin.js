// Operator dashboard: signs in against /api/v1/auth, then polls GET /admin/overview (or, on a
// server without it, the separate admin endpoints) and drives the admin API.
// Every piece of data reaches the page as text (textContent / text nodes, SVG built with DOM
// calls), never as markup.
"use strict";

(() => {
  const API = "/api/v1";
  const POLL_MS = 5000;
  // The backup list changes rarely: read it every few polls unless one is queued or running.
  const BACKUP_EVERY = 3;
  // The day's history changes every ten minutes: read it at most this often (ms).
  const DAY_EVERY_MS = 30000;
  const STORE_KEY = "taskmanager.admin.session";
  // Without a latency objective from the server, the oldest age turns amber and red here.
  const LATENCY_WARN_S = 10;
  const LATENCY_BAD_S = 60;
  const HEARTBEAT_WARN_S = 5;
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Frames of our own code in a traceback (shown first by the server, highlighted here).
  const OUR_FRAME = /^\s*File "(?:[^"]*\/)?(core|workers|jobs|web|cli)\/[^"]*"/;
  const LIB_FRAME = /site-packages|dist-packages|\/lib\/python\d|\/tests\//;

  const $ = (id) => document.getElementById(id);

  // -- DOM helpers ---------------------------------------------------------------------------

  /** Build an element. Strings among the children become text nodes; props become attributes
   * (``class``, ``on<event>`` handlers and the boolean properties are special-cased). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "checked" || key === "disabled" || key === "open") node[key] = Boolean(value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  /** An SVG element (attributes set one by one; text only as text nodes). */
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function setText(node, text) {
    node.textContent = text || "";
    show(node, Boolean(text));
  }

  /** Replace ``body``'s content, keeping keyboard focus on the "same" control if it had it. */
  function replaceContent(body, ...nodes) {
    const active = document.activeElement;
    const key = active && body.contains(active) ? active.getAttribute("data-focus-key") : null;
    body.replaceChildren(...nodes);
    if (key) {
      const again = [...body.querySelectorAll("[data-focus-key]")].find(
        (n) => n.getAttribute("data-focus-key") === key,
      );
      if (again) again.focus();
    }
  }

  function table(caption, headers, rows, empty) {
    if (!rows.length) return el("p", { class: "empty muted" }, empty);
    return el(
      "div",
      { class: "table-wrap" },
      el(
        "table",
        {},
        el("caption", { class: "visually-hidden" }, caption),
        el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, rows),
      ),
    );
  }

  function button(label, props, onClick) {
    const node = el("button", { type: "button", ...props }, label);
    node.addEventListener("click", () => onClick(node));
    return node;
  }

  // -- Formatting ----------------------------------------------------------------------------

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "—";
    if (s === 0) return "0 s";
    if (s < 1) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) {
      const rest = Math.round(s % 60);
      return rest && rest < 60 ? `${Math.floor(s / 60)} min ${rest} s` : `${Math.round(s / 60)} min`;
    }
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  function fmtAbs(iso) {
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : `${d.toISOString().slice(0, 19).replace("T", " ")} UTC`;
  }

  function fmtClock(ms) {
    return new Date(ms).toISOString().slice(11, 16);
  }

  function fmtRel(iso) {
    const diff = (new Date(iso).getTime() - Date.now()) / 1000;
    if (Number.isNaN(diff)) return String(iso);
    if (Math.abs(diff) < 2) return "just now";
    return diff > 0 ? `in ${fmtSeconds(diff)}` : `${fmtSeconds(-diff)} ago`;
  }

  /** A ``<time>`` showing a relative time (kept current by :func:`tickTimes`). */
  function when(iso) {
    if (!iso) return el("span", { class: "muted" }, "—");
    return el("time", { datetime: iso, title: fmtAbs(iso), "data-rel": "" }, fmtRel(iso));
  }

  function tickTimes() {
    for (const node of document.querySelectorAll("time[data-rel]")) {
      node.textContent = fmtRel(node.getAttribute("datetime"));
    }
    if (lastUpdated) $("updated").textContent = `Updated ${fmtRel(lastUpdated)}`;
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return `${i ? v.toFixed(1) : v} ${units[i]}`;
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "—";
    return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    return fmtMs(Math.round(seconds * 1000));
  }

  function fmtCount(n) {
    return n === null || n === undefined ? "—" : String(n);
  }

  function clip(text, max) {
    const s = String(text);
    return s.length > max ? `${s.slice(0, max - 1)}…` : s;
  }

  function safeClass(text) {
    return String(text).replace(/[^a-z_]/g, "");
  }

  function badge(status, extraClass) {
    return el("span", { class: `badge status-${safeClass(status)} ${extraClass || ""}`.trim() }, String(status));
  }

  function json(value) {
    return JSON.stringify(value === undefined ? null : value, null, 2);
  }

  function idFor(prefix, text) {
    return `${prefix}-${String(text).replace(/[^A-Za-z0-9_-]/g, "_")}`;
  }

  function q(queue) {
    return encodeURIComponent(queue);
  }

  // -- Session and API -----------------------------------------------------------------------

  const session = { access: null, refresh: null, email: null };

  function loadSession() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
      if (saved && typeof saved.access === "string") Object.assign(session, saved);
    } catch {
      sessionStorage.removeItem(STORE_KEY);
    }
  }

  function saveSession() {
    sessionStorage.setItem(STORE_KEY, JSON.stringify(session));
  }

  function clearSession() {
    session.access = null;
    session.refresh = null;
    session.email = null;
    sessionStorage.removeItem(STORE_KEY);
  }

  /** An answer that was not 2xx, carrying its problem+json body. */
  class ApiError extends Error {
    constructor(status, problem, requestId, retryAfter) {
      super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
      this.status = status;
      this.problem = problem || {};
      this.requestId = requestId;
      this.retryAfter = retryAfter;
    }
  }

  /** True for an answer meaning "this server has no such route" (an older server). */
  function missingRoute(err) {
    return err instanceof ApiError && (err.status === 404 || err.status === 405);
  }

  async function send(method, path, body, token) {
    const headers = { Accept: "application/json, application/problem+json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { method, headers, credentials: "omit", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    try {
      return await fetch(API + path, init);
    } catch {
      throw new ApiError(0, {
        title: "Network error",
        detail: "The server did not answer; the next refresh tries again",
      });
    }
  }

  async function parse(resp) {
    const type = resp.headers.get("Content-Type") || "";
    let data = null;
    if (resp.status !== 204 && type.includes("json")) {
      try {
        data = await resp.json();
      } catch {
        data = null;
      }
    }
    if (resp.ok) return { status: resp.status, data };
    throw new ApiError(
      resp.status,
      data || { title: resp.statusText || `HTTP ${resp.status}` },
      resp.headers.get("X-Request-ID"),
      resp.headers.get("Retry-After"),
    );
  }

  // One refresh at a time: each refresh token works once, and presenting a spent one revokes
  // the whole login, so parallel polls that all met a 401 must share a single refresh.
  let refreshing = null;

  function refreshTokens() {
    if (!refreshing) {
      refreshing = (async () => {
        if (!session.refresh) return false;
        const resp = await send("POST", "/auth/refresh", { refresh_token: session.refresh });
        if (!resp.ok) return false;
        const data = await resp.json();
        session.access = data.access_token;
        session.refresh = data.refresh_token;
        saveSession();
        return true;
      })().finally(() => {
        refreshing = null;
      });
    }
    return refreshing;
  }

  /** Call the API with the access token; on a 401, refresh once and try again. */
  async function api(method, path, body) {
    const used = session.access;
    let resp = await send(method, path, body, used);
    if (resp.status === 401 && session.refresh) {
      // Another call may have refreshed already while this one was in flight.
      const renewed = session.access !== used || (await refreshTokens());
      if (renewed && session.access) resp = await send(method, path, body, session.access);
    }
    return parse(resp);
  }

  function problemText(err) {
    if (!(err instanceof ApiError)) return String(err && err.message ? err.message : err);
    const p = err.problem;
    let text = p.title || `HTTP ${err.status}`;
    if (p.detail) text += `: ${p.detail}`;
    if (Array.isArray(p.errors) && p.errors.length) {
      text += ` (${p.errors.map((e) => `${e.field}: ${e.message}`).join("; ")})`;
    }
    const tail = [];
    if (err.status) tail.push(`HTTP ${err.status}`);
    if (err.requestId) tail.push(`request ${err.requestId}`);
    return tail.length ? `${text} — ${tail.join(", ")}` : text;
  }

  // -- Views ---------------------------------------------------------------------------------

  let epoch = 0; // bumped on sign-in/out: answers to an older session's polls are dropped
  let forbidden = false;
  let lastUpdated = null;

  function showView(name) {
    show($("signin-view"), name === "signin");
    show($("forbidden-view"), name === "forbidden");
    show($("dashboard-view"), name === "dashboard");
    show($("session-bar"), name !== "signin");
    show($("refresh"), name === "dashboard");
    if (name !== "dashboard") show($("health-badge"), false);
    $("who").textContent = session.email ? `Signed in as ${session.email}` : "";
  }

  function signedOut(notice) {
    epoch += 1;
    stopPolling();
    clearSession();
    forbidden = false;
    lastUpdated = null;
    $("updated").textContent = "";
    resetPanels();
    setText($("signin-notice"), notice);
    setText($("signin-error"), "");
    showView("signin");
    $("email").focus();
  }

  function showForbidden(err) {
    forbidden = true;
    stopPolling();
    $("forbidden-text").textContent =
      `Signed in as ${session.email || "this account"}, which does not have the admin role: ` +
      "the operator dashboard needs the admin role.";
    $("forbidden-detail").textContent = problemText(err);
    showView("forbidden");
  }

  /** Handle answers that concern the whole session; true when the caller should stop. */
  function escalate(err) {
    if (!(err instanceof ApiError)) return false;
    if (err.status === 401) {
      signedOut("Your session has ended: sign in again.");
      return true;
    }
    if (err.status === 403) {
      showForbidden(err);
      return true;
    }
    if (err.status === 429) {
      const wait = Math.max(1, Number.parseInt(err.retryAfter || "5", 10) || 5);
      pausedUntil = Date.now() + wait * 1000;
      setText($("global-notice"), `The API's rate limit was reached: refreshing again in ${wait} s.`);
    }
    return false;
  }

  const PANEL_NAMES = [
    "message", "charts", "queues", "health", "backlog", "workers", "messages", "dead",
    "schedules", "backups",
  ];
  const panels = {};
  for (const name of PANEL_NAMES) {
    const root = $(`${name}-panel`);
    panels[name] = {
      root,
      body: $(`${name}-body`),
      meta: $(`${name}-meta`),
      error: root.querySelector(".error"),
      status: root.querySelector(".status"),
      sig: null,
    };
  }

  function panelError(name, err) {
    setText(panels[name].error, err ? problemText(err) : "");
  }

  function panelStatus(name, text) {
    const status = panels[name].status;
    if (status) status.textContent = text || "";
  }

  /** Run an action of a panel: disable ``control`` meanwhile, show a failure in the panel, and
   * refresh afterwards. ``work`` returns the status line to show. */
  async function act(name, control, work) {
    if (control) control.disabled = true;
    panelError(name, null);
    try {
      const text = await work();
      if (text) panelStatus(name, text);
      return true;
    } catch (err) {
      if (!escalate(err)) panelError(name, err);
      return false;
    } finally {
      if (control && control.isConnected) control.disabled = false;
      refreshNow();
    }
  }

  function notAvailable(name, what) {
    const p = panels[name];
    const sig = "n/a";
    if (p.sig === sig) return;
    p.sig = sig;
    p.meta.textContent = "";
    replaceContent(p.body, el("p", { class: "muted unavailable" }, `${what} is not available on this server.`));
  }

  function resetPanels() {
    for (const p of Object.values(panels)) {
      p.sig = null;
      setText(p.error, "");
      if (p.status) p.status.textContent = "";
      p.meta.textContent = "";
      replaceContent(p.body, el("p", { class: "muted" }, "Loading…"));
    }
    show(panels.message.root, false);
    message.current = null;
    replaceContent($("busy-body"), el("p", { class: "muted" }, "Loading…"));
    busySig = null;
    deadSections.clear();
    selected.clear();
    openHistories.clear();
    browse.queue = "";
    browse.pages = null;
    day.data = null;
    day.at = 0;
    overviewAvailable = null;
    unavailable.clear();
    latestQueues = [];
    backupsAvailable = true;
    backupActive = false;
    setText($("global-notice"), "");
  }

  /** Re-render a panel only when its data changed, so controls keep focus between polls. */
  function renderIfChanged(name, data, render) {
    const sig = JSON.stringify(data);
    if (panels[name].sig === sig) return;
    panels[name].sig = sig;
    render(data);
  }

  // -- Health --------------------------------------------------------------------------------

  function checkSummary(value) {
    if (value && typeof value === "object") {
      const status = value.status || (value.ok === true ? "ok" : value.ok === false ? "failing" : "unknown");
      return { status: String(status), detail: value.detail || value.message || "" };
    }
    return { status: "unknown", detail: String(value) };
  }

  function renderHealth(health) {
    const p = panels.health;
    const status = String(health.status || "unknown");
    const top = $("health-badge");
    top.className = `health-badge health-${safeClass(status)}`;
    top.textContent = `Health: ${status}`;
    show(top, true);
    p.meta.replaceChildren(badge(status, "health-status"));
    const rows = Object.entries(health.checks || {}).map(([name, value]) => {
      const c = checkSummary(value);
      return el(
        "tr",
        { "data-check": name },
        el("th", { scope: "row" }, name.replace(/_/g, " ")),
        el("td", {}, badge(c.status, "check-status")),
        el("td", { class: "detail" }, c.detail),
      );
    });
    replaceContent(p.body, table("Health checks", ["Check", "Status", "Detail"], rows, "No checks."));
  }

  // -- Throughput charts ---------------------------------------------------------------------

  const chart = { window: "1h", queue: "" };
  const day = { data: null, err: null, at: 0 };
  let hourHistory = null;

  /** Sum of the per-queue series (or one queue's) of a history answer. */
  function seriesOf(history, queue) {
    const n = history.step_seconds ? Math.round(
      (Date.parse(history.until) - Date.parse(history.since)) / 1000 / history.step_seconds,
    ) : 0;
    const queues = history.queues || {};
    const names = queue ? [queue] : Object.keys(queues);
    let length = Number.isFinite(n) && n > 0 ? n : 0;
    for (const name of names) {
      const s = queues[name];
      if (s) length = Math.max(length, (s.processed || []).length, (s.failed || []).length);
    }
    const processed = new Array(length).fill(0);
    const failed = new Array(length).fill(0);
    for (const name of names) {
      const s = queues[name];
      if (!s) continue;
      (s.processed || []).forEach((v, i) => { processed[i] += v; });
      (s.failed || []).forEach((v, i) => { failed[i] += v; });
    }
    return { processed, failed };
  }

  function sum(values) {
    return values.reduce((a, b) => a + b, 0);
  }

  /** One bar chart: an inline SVG drawn from numbers, with the labels as HTML around it. */
  function barChart(kind, title, values, history) {
    const step = history.step_seconds || 60;
    const start = Date.parse(history.since);
    const per = step === 60 ? "minute" : step >= 3600 ? `${step / 3600} h` : step >= 60 ? `${step / 60} min` : `${step} s`;
    const max = Math.max(1, ...values);
    const total = sum(values);
    const width = Math.max(1, values.length) * 10;
    const height = 100;
    const plot = svg("svg", {
      class: `chart ${kind}`,
      viewBox: `0 0 ${width} ${height}`,
      preserveAspectRatio: "none",
      role: "img",
      "aria-label": `${title} per ${per}: ${total} in all, at most ${Math.max(0, ...values)}`,
      "data-total": total,
      "data-points": values.length,
    });
    for (const y of [25, 50, 75]) {
      plot.append(svg("line", { class: "gridline", x1: 0, x2: width, y1: y, y2: y }));
    }
    values.forEach((v, i) => {
      if (!v) return;
      const h = Math.max(1.5, (v / max) * (height - 4));
      const at = Number.isFinite(start) ? fmtClock(start + i * step * 1000) : String(i);
      plot.append(
        svg(
          "rect",
          { class: `bar ${kind}`, x: i * 10 + 1, y: height - h, width: 8, height: h, "data-value": v },
          svg("title", {}, `${at} UTC: ${v} ${kind}`),
        ),
      );
    });
    plot.append(svg("line", { class: "axis", x1: 0, x2: width, y1: height, y2: height }));
    const end = Date.parse(history.until);
    const ticks = Number.isFinite(start) && Number.isFinite(end)
      ? [fmtClock(start), fmtClock((start + end) / 2), fmtClock(end)]
      : ["", "", ""];
    return el(
      "figure",
      { class: `chart-figure ${kind}`, "data-kind": kind },
      el(
        "figcaption",
        {},
        el("span", { class: "chart-title" }, `${title} per ${per}`),
        el("span", { class: "chart-total" }, `${total} in all · peak ${Math.max(0, ...values)}`),
      ),
      el("div", { class: "chart-box" }, el("span", { class: "chart-max muted" }, String(max)), plot),
      el("div", { class: "chart-ticks muted" }, ticks.map((t) => el("span", {}, t))),
    );
  }

  function actorTable(history) {
    const rows = Object.entries(history.actors || {})
      .map(([actor, s]) => ({ actor, processed: sum(s.processed || []), failed: sum(s.failed || []) }))
      .filter((r) => r.processed || r.failed)
      .sort((a, b) => b.processed + b.failed - (a.processed + a.failed))
      .slice(0, 10)
      .map((r) =>
        el(
          "tr",
          { "data-actor": r.actor },
          el("th", { scope: "row" }, r.actor),
          el("td", { class: "num processed" }, String(r.processed)),
          el("td", { class: `num failed ${r.failed ? "bad" : ""}`.trim() }, String(r.failed)),
          el(
            "td",
            { class: "num" },
            r.processed + r.failed ? `${((100 * r.failed) / (r.processed + r.failed)).toFixed(1)} %` : "—",
          ),
        ),
      );
    return table("Busiest actors", ["Actor", "Processed", "Failed", "Failure rate"], rows, "No messages in this window.");
  }

  function syncChartQueues(names) {
    const select = $("chart-queue");
    const have = [...select.options].slice(1).map((o) => o.value);
    if (JSON.stringify(have) === JSON.stringify(names)) return;
    select.replaceChildren(el("option", { value: "" }, "All queues"), names.map((n) => el("option", { value: n }, n)));
    select.value = names.includes(chart.queue) ? chart.queue : "";
    chart.queue = select.value;
  }

  function renderCharts() {
    const p = panels.charts;
    const history = chart.window === "24h" ? day.data : hourHistory;
    const err = chart.window === "24h" ? day.err : null;
    panelError("charts", err);
    if (history === UNAVAILABLE || unavailable.has("history")) {
      notAvailable("charts", "Throughput history");
      return;
    }
    if (!history || !history.since) {
      const sig = `wait:${chart.window}`;
      if (p.sig !== sig) {
        p.sig = sig;
        replaceContent(p.body, el("p", { class: "muted" }, "Loading…"));
      }
      return;
    }
    const names = [...new Set([...latestQueues, ...Object.keys(history.queues || {})])].sort();
    syncChartQueues(names);
    const sig = JSON.stringify([chart, history]);
    if (p.sig === sig) return;
    p.sig = sig;
    const s = seriesOf(history, chart.queue);
    const processed = sum(s.processed);
    const failed = sum(s.failed);
    const rate = processed + failed ? ` (${((100 * failed) / (processed + failed)).toFixed(1)} % failed)` : "";
    p.meta.textContent = `${chart.window === "24h" ? "last day" : "last hour"}: ${processed} processed · ${failed} failed${rate}`;
    replaceContent(
      p.body,
      el(
        "div",
        { class: "charts", "data-window": chart.window, "data-queue": chart.queue },
        barChart("processed", "Processed", s.processed, history),
        barChart("failed", "Failed", s.failed, history),
      ),
      chart.queue ? null : el("h3", { class: "sub-title" }, "By actor"),
      chart.queue ? null : actorTable(history),
    );
  }

  function setWindow(win) {
    chart.window = win;
    $("window-1h").setAttribute("aria-pressed", String(win === "1h"));
    $("window-24h").setAttribute("aria-pressed", String(win === "24h"));
    panels.charts.sig = null;
    renderCharts();
    if (win === "24h") {
      day.at = 0;
      refreshNow();
    }
  }

  async function loadDay(my) {
    if (chart.window !== "24h" || unavailable.has("history")) return;
    if (day.data && Date.now() - day.at < DAY_EVERY_MS) return;
    try {
      const { data } = await api("GET", "/admin/history?window=24h");
      if (my !== epoch) return;
      day.data = data;
      day.err = null;
      day.at = Date.now();
    } catch (err) {
      if (my !== epoch || escalate(err)) return;
      if (missingRoute(err)) unavailable.add("history");
      else day.err = err;
    }
    renderCharts();
  }

  // -- Queues --------------------------------------------------------------------------------

  let latestQueues = [];

  function latencyCell(queue) {
    const seconds = queue.oldest_age_seconds;
    const objective = queue.objective_seconds;
    if (seconds === null || seconds === undefined) return el("td", { class: "num latency" }, "—");
    let level = "ok";
    let label = null;
    if (objective !== null && objective !== undefined) {
      if (seconds > objective) {
        level = "bad";
        label = "over objective";
      }
    } else if (seconds >= LATENCY_BAD_S) {
      level = "bad";
      label = "stalled";
    } else if (seconds >= LATENCY_WARN_S) {
      level = "warn";
      label = "slow";
    }
    return el(
      "td",
      { class: `num latency ${level}`, title: `The next message has waited ${fmtSeconds(seconds)}` },
      fmtSeconds(seconds),
      label ? el("span", { class: `tag ${level}` }, label) : null,
    );
  }

  function objectiveCell(queue) {
    const limit = queue.objective_seconds;
    if (limit === null || limit === undefined) return el("td", { class: "objective muted" }, "—");
    // An empty queue meets its objective (the broker reports no age then).
    const met = queue.objective_met === null && queue.ready === 0 ? true : queue.objective_met;
    const state = met === false ? "breached" : met === true ? "met" : "unknown";
    return el(
      "td",
      {
        class: `objective ${state === "breached" ? "bad" : state === "met" ? "ok" : ""}`.trim(),
        "data-objective": state,
        title: `Objective: the oldest waiting message is at most ${fmtSeconds(limit)} old`,
      },
      `≤ ${fmtSeconds(limit)} `,
      el("span", { class: `tag objective-state ${state === "breached" ? "bad" : state === "met" ? "ok" : ""}`.trim() }, state),
    );
  }

  async function setPaused(queue, pause, control) {
    await act("queues", control, async () => {
      await api("POST", `/admin/queues/${q(queue)}/${pause ? "pause" : "resume"}`);
      return pause
        ? `Paused ${queue}: workers take none of its messages until it is resumed.`
        : `Resumed ${queue}.`;
    });
  }

  function renderQueues(data) {
    const p = panels.queues;
    const items = data.items || [];
    const dead = items.reduce((n, x) => n + (x.dead || 0), 0);
    const paused = items.filter((x) => x.paused).length;
    const breached = items.filter((x) => x.objective_met === false).length;
    const parts = [`broker: ${data.broker || "?"}`, `${items.length} queues`, `${dead} dead`];
    if (paused) parts.push(`${paused} paused`);
    if (breached) parts.push(`${breached} over objective`);
    p.meta.textContent = parts.join(" · ");
    const rows = items.map((x) => {
      const isPaused = Boolean(x.paused);
      const toggle = button(
        isPaused ? "Resume" : "Pause",
        {
          class: isPaused ? "primary" : "",
          "data-focus-key": `pause:${x.queue}`,
          "aria-label": `${isPaused ? "Resume" : "Pause"} queue ${x.queue}`,
        },
        (b) => setPaused(x.queue, !isPaused, b),
      );
      const browseButton = button(
        "Browse",
        { "data-focus-key": `browse:${x.queue}`, "aria-label": `Browse messages of ${x.queue}` },
        () => browseQueue(x.queue, x.ready || !x.delayed ? "ready" : "delayed", true),
      );
      return el(
        "tr",
        { "data-queue": x.queue, class: isPaused ? "paused" : null },
        el("th", { scope: "row" }, x.queue),
        el(
          "td",
          { class: "queue-state", "data-paused": String(isPaused) },
          badge(isPaused ? "paused" : "running", "queue-status"),
        ),
        el("td", { class: "num ready" }, fmtCount(x.ready)),
        el("td", { class: "num delayed" }, fmtCount(x.delayed)),
        el("td", { class: "num in-progress" }, fmtCount(x.in_progress)),
        el("td", { class: `num dead ${x.dead > 0 ? "bad" : ""}`.trim() }, fmtCount(x.dead)),
        latencyCell(x),
        objectiveCell(x),
        el("td", { class: "action" }, toggle, " ", browseButton),
      );
    });
    replaceContent(
      p.body,
      table(
        "Messages per queue",
        ["Queue", "State", "Ready", "Delayed", "In progress", "Dead", "Oldest age", "Objective", ""],
        rows,
        "No queues.",
      ),
    );
  }

  // -- Backlog per user ----------------------------------------------------------------------

  function renderBacklog(backlog) {
    const p = panels.backlog;
    const byQueue = (backlog && (backlog.queues || backlog)) || {};
    const sections = [];
    let users = 0;
    for (const [queue, list] of Object.entries(byQueue).sort()) {
      if (!Array.isArray(list) || !list.length) continue;
      const top = Math.max(1, ...list.map((u) => u.waiting || 0));
      users += list.length;
      sections.push(
        el(
          "section",
          { class: "backlog-queue", "data-queue": queue },
          el("h3", {}, queue),
          table(
            `Users with most messages waiting in ${queue}`,
            ["User", "Waiting", ""],
            list.map((u) =>
              el(
                "tr",
                { "data-user": u.user_id },
                el("th", { scope: "row" }, el("code", {}, String(u.user_id))),
                el("td", { class: "num waiting" }, String(u.waiting)),
                el("td", { class: "meter" }, el("meter", { min: 0, max: top, value: u.waiting, "aria-hidden": "true" })),
              ),
            ),
            "",
          ),
        ),
      );
    }
    p.meta.textContent = users ? `${users} users in ${sections.length} queues` : "";
    replaceContent(
      p.body,
      ...(sections.length ? sections : [el("p", { class: "empty muted" }, "No user has messages waiting.")]),
    );
  }

  // -- Workers and the busy view -------------------------------------------------------------

  let busySig = null;

  function renderWorkers(data) {
    const p = panels.workers;
    const items = data.items || [];
    const inFlight = items.reduce((n, w) => n + (w.in_flight || 0), 0);
    const threads = items.reduce((n, w) => n + (w.threads || 0), 0);
    p.meta.textContent = `${items.length} live · ${inFlight} of ${threads} threads busy`;
    const rows = items.map((w) => {
      const age = w.heartbeat_age_seconds;
      const level = age >= HEARTBEAT_WARN_S ? "warn" : "ok";
      return el(
        "tr",
        { "data-worker": w.id },
        el("th", { scope: "row", title: w.id }, `${w.host}:${w.pid}`),
        el("td", {}, (w.queues || []).join(", ")),
        el("td", {}, badge(w.state)),
        el("td", { class: `num heartbeat ${level}` }, fmtSeconds(age)),
        el("td", { class: "num in-flight" }, `${w.in_flight} / ${w.threads}`),
        el("td", { class: "num processed" }, fmtCount(w.processed)),
        el("td", { class: `num failed ${w.failed ? "bad" : ""}`.trim() }, fmtCount(w.failed)),
        el("td", { class: "num memory" }, fmtBytes(w.rss_bytes)),
        el("td", { class: "num uptime" }, w.uptime_seconds !== undefined ? fmtSeconds(w.uptime_seconds) : when(w.started_at)),
      );
    });
    replaceContent(
      p.body,
      table(
        "Live workers",
        ["Worker", "Queues", "State", "Heartbeat", "Busy", "Processed", "Failed", "Memory", "Uptime"],
        rows,
        "No live workers: messages wait until one starts.",
      ),
    );
  }

  function renderBusy(data) {
    const items = data.items || [];
    const hasBusy = items.some((w) => Array.isArray(w.busy));
    const sig = JSON.stringify(items.map((w) => [w.id, w.busy]));
    if (sig === busySig) return;
    busySig = sig;
    const body = $("busy-body");
    if (items.length && !hasBusy) {
      replaceContent(body, el("p", { class: "muted unavailable" }, "This server does not report what each thread runs."));
      return;
    }
    const rows = [];
    for (const w of items) {
      for (const b of w.busy || []) {
        const running = b.running_seconds !== undefined && b.running_seconds !== null
          ? b.running_seconds
          : b.started_at ? (Date.now() - new Date(b.started_at).getTime()) / 1000 : null;
        rows.push(
          el(
            "tr",
            { "data-message-id": b.message_id, "data-worker": w.id },
            el("th", { scope: "row" }, `${w.host}:${w.pid}`, el("div", { class: "muted small" }, b.thread || "")),
            el("td", { class: "actor" }, b.actor, el("div", { class: "muted small" }, b.queue || "")),
            el(
              "td",
              { class: "message-id" },
              button(
                b.message_id,
                { class: "link", "aria-label": `Show message ${b.message_id}`, "data-focus-key": `busy:${b.message_id}` },
                () => findMessage(b.message_id),
              ),
            ),
            el("td", { class: "args" }, el("code", {}, clip(b.args_summary || "", 160))),
            el("td", { class: "num running-for" }, fmtSeconds(running)),
          ),
        );
      }
    }
    replaceContent(
      body,
      table("Busy threads", ["Worker / thread", "Actor", "Message", "Arguments", "Running for"], rows, "Every thread is idle."),
    );
  }

  // -- Messages: browse ready and delayed ----------------------------------------------------

  const browse = { queue: "", state: "ready", pages: null, err: null };

  function syncBrowseQueues(names) {
    const select = $("browse-queue");
    const have = [...select.options].map((o) => o.value);
    if (JSON.stringify(have) === JSON.stringify(names)) return;
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    if (!browse.queue || !names.includes(browse.queue)) browse.queue = names[0] || "";
    select.value = browse.queue;
  }

  function browseQueue(queue, state, scroll) {
    browse.queue = queue;
    browse.state = state;
    browse.pages = null;
    $("browse-queue").value = queue;
    $("browse-state").value = state;
    panels.messages.sig = null;
    panelStatus("messages", "");
    if (scroll) panels.messages.root.scrollIntoView({ block: "start" });
    loadBrowse(epoch, true);
  }

  async function loadBrowse(my, force) {
    if (!browse.queue || unavailable.has("messages")) {
      renderBrowse();
      return;
    }
    // A second page was loaded by hand: keep it until the operator changes the selection.
    if (!force && browse.pages && browse.pages.length > 1) return;
    const want = `${browse.queue}|${browse.state}`;
    try {
      const { data } = await api(
        "GET",
        `/admin/queues/${q(browse.queue)}/messages?state=${browse.state}&limit=50`,
      );
      if (my !== epoch || want !== `${browse.queue}|${browse.state}`) return;
      browse.pages = [data];
      browse.err = null;
    } catch (err) {
      if (my !== epoch || escalate(err)) return;
      // The route itself is missing (an older server), not the queue.
      if (err.status === 405 || (err.status === 404 && err.problem.detail === "No such resource")) {
        unavailable.add("messages");
      }
      browse.err = err;
      browse.pages = null;
    }
    renderBrowse();
  }

  async function moreBrowse(control) {
    const last = browse.pages && browse.pages[browse.pages.length - 1];
    if (!last || !last.next_cursor) return;
    control.disabled = true;
    try {
      const { data } = await api(
        "GET",
        `/admin/queues/${q(browse.queue)}/messages?state=${browse.state}&limit=50&cursor=${encodeURIComponent(last.next_cursor)}`,
      );
      browse.pages.push(data);
      renderBrowse();
    } catch (err) {
      if (!escalate(err)) panelError("messages", err);
      control.disabled = false;
    }
  }

  async function retryMessage(queue, id, panel, control) {
    await act(panel, control, async () => {
      await api("POST", `/admin/queues/${q(queue)}/messages/${encodeURIComponent(id)}/retry`);
      return `Message ${id} moved to the head of ${queue}: it runs next.`;
    });
  }

  async function deleteMessage(queue, id, actor, panel, control) {
    const ok = window.confirm(
      `Delete message ${id} (${actor}) from the "${queue}" queue? It cannot be recovered.`,
    );
    if (!ok) return false;
    return act(panel, control, async () => {
      await api("DELETE", `/admin/queues/${q(queue)}/messages/${encodeURIComponent(id)}`);
      return `Deleted message ${id} from ${queue}.`;
    });
  }

  function renderBrowse() {
    const p = panels.messages;
    if (unavailable.has("messages")) {
      notAvailable("messages", "Browsing messages");
      return;
    }
    panelError("messages", browse.err);
    const sig = JSON.stringify([browse.queue, browse.state, browse.pages]);
    if (p.sig === sig) return;
    p.sig = sig;
    if (!browse.queue) {
      p.meta.textContent = "";
      replaceContent(p.body, el("p", { class: "muted" }, "Choose a queue."));
      return;
    }
    if (!browse.pages) {
      replaceContent(p.body, el("p", { class: "muted" }, browse.err ? "" : "Loading…"));
      return;
    }
    const items = browse.pages.flatMap((page) => page.items || []);
    const last = browse.pages[browse.pages.length - 1];
    const delayed = browse.state === "delayed";
    p.meta.textContent = `${items.length}${last.next_cursor ? "+" : ""} ${browse.state} in ${browse.queue}`;
    const rows = items.map((m) => {
      const actions = el("td", { class: "action" });
      if (m.state === "delayed" || delayed) {
        actions.append(
          button(
            "Retry now",
            { "data-focus-key": `retry:${m.id}`, "aria-label": `Retry message ${m.id} now` },
            (b) => retryMessage(m.queue || browse.queue, m.id, "messages", b),
          ),
          " ",
        );
      }
      actions.append(
        button(
          "Delete",
          { class: "danger", "data-focus-key": `delete:${m.id}`, "aria-label": `Delete message ${m.id}` },
          (b) => deleteMessage(m.queue || browse.queue, m.id, m.actor, "messages", b),
        ),
      );
      return el(
        "tr",
        { "data-id": m.id },
        el(
          "td",
          { class: "message-id" },
          button(m.id, { class: "link", "aria-label": `Show message ${m.id}` }, () => findMessage(m.id)),
        ),
        el("th", { scope: "row" }, m.actor),
        el("td", { class: "args" }, el("code", {}, clip(m.args_summary || "", 120))),
        el("td", { class: "user" }, m.user_id ? el("code", {}, String(m.user_id)) : el("span", { class: "muted" }, "—")),
        el("td", {}, when(m.enqueued_at)),
        el("td", { class: "eta" }, when(m.eta)),
        el("td", { class: "num" }, fmtCount(m.retries)),
        actions,
      );
    });
    const nodes = [
      table(
        `${browse.state} messages of ${browse.queue}`,
        ["Id", "Actor", "Arguments", "User", "Enqueued", delayed ? "Due" : "ETA", "Retries", ""],
        rows,
        `No ${browse.state} messages in ${browse.queue}.`,
      ),
    ];
    if (last.next_cursor) {
      nodes.push(button("More", { class: "more" }, (b) => moreBrowse(b)));
    }
    replaceContent(p.body, ...nodes);
  }

  // -- One message: find by id, detail, actions ----------------------------------------------

  const message = { current: null };

  function tracebackNode(text) {
    const pre = el("pre", { class: "traceback" });
    for (const line of String(text).split("\n")) {
      let cls = null;
      // The server marks our frames with "> " (its order: the error, our frames, the rest).
      if (/^> /.test(line) || (OUR_FRAME.test(line) && !LIB_FRAME.test(line))) cls = "frame ours";
      else if (/^\s*File "/.test(line)) cls = "frame lib";
      pre.append(cls ? el("span", { class: cls }, line) : line, "\n");
    }
    return pre;
  }

  function field(label, ...value) {
    return [el("dt", {}, label), el("dd", {}, ...value)];
  }

  function showMessage(data, origin) {
    message.current = { data, origin };
    const p = panels.message;
    show(p.root, true);
    panelError("message", null);
    const state = data.state || (origin === "dead" ? "dead" : "unknown");
    $("message-title").textContent = `Message ${data.id}`;
    p.meta.replaceChildren(badge(state, "message-state"));
    const list = el(
      "dl",
      { class: "fields" },
      field("Id", el("code", { class: "message-id" }, String(data.id))),
      data.message_id && data.message_id !== data.id
        ? field("Message id", el("code", {}, String(data.message_id)))
        : null,
      field("Queue", data.queue || "—"),
      field("Actor", data.actor || "—"),
      field("State", state),
      field("Enqueued", data.enqueued_at ? `${fmtAbs(data.enqueued_at)} ` : "—", when(data.enqueued_at)),
      data.eta ? field("Due", `${fmtAbs(data.eta)} `, when(data.eta)) : null,
      data.failed_at ? field("Failed", `${fmtAbs(data.failed_at)} `, when(data.failed_at)) : null,
      field("Retries", fmtCount(data.retries)),
      data.user_id ? field("User", el("code", {}, String(data.user_id))) : null,
    );
    const parts = [list];
    parts.push(el("h3", { class: "sub-title" }, "Arguments"), el("pre", { class: "args" }, json(data.args)));
    if (data.kwargs && Object.keys(data.kwargs).length) {
      parts.push(el("h3", { class: "sub-title" }, "Keyword arguments"), el("pre", { class: "kwargs" }, json(data.kwargs)));
    }
    if (data.options && Object.keys(data.options).length) {
      parts.push(
        el("details", {}, el("summary", {}, "Options"), el("pre", { class: "options" }, json(data.options))),
      );
    }
    if (data.error) {
      parts.push(el("h3", { class: "sub-title" }, "Error"), el("p", { class: "error-text message-error" }, data.error));
    }
    if (data.traceback) {
      parts.push(
        el("h3", { class: "sub-title" }, "Traceback ", el("span", { class: "muted small" }, "(our frames first)")),
        tracebackNode(data.traceback),
      );
    }
    const actions = el("div", { class: "actions" });
    const queue = data.queue;
    if (queue && (state === "delayed" || state === "dead")) {
      actions.append(
        button("Retry now", { "aria-label": `Retry message ${data.id} now`, class: "primary" }, async (b) => {
          const done = await act("message", b, async () => {
            if (state === "dead") {
              const { data: r } = await api("POST", `/admin/queues/${q(queue)}/dead/retry`, { ids: [data.id] });
              if (!r.retried) throw new Error(`Dead letter ${data.id} is gone already`);
              return `Dead letter ${data.id} replayed as a fresh message on ${queue}.`;
            }
            await api("POST", `/admin/queues/${q(queue)}/messages/${encodeURIComponent(data.id)}/retry`);
            return `Message ${data.id} moved to the head of ${queue}: it runs next.`;
          });
          if (done) {
            b.disabled = true;
            forgetDead(queue);
          }
        }),
      );
    }
    if (queue && state !== "in_progress") {
      actions.append(
        button("Delete", { class: "danger", "aria-label": `Delete message ${data.id}` }, async (b) => {
          let done;
          if (state === "dead") done = await deleteDead(queue, data.id, data.actor, "message", b);
          else done = await deleteMessage(queue, data.id, data.actor, "message", b);
          if (done) {
            b.disabled = true;
            p.meta.replaceChildren(badge("deleted", "message-state"));
          }
        }),
      );
    }
    parts.push(actions);
    panelStatus("message", "");
    replaceContent(p.body, ...parts);
    p.root.scrollIntoView({ block: "start" });
  }

  async function findMessage(id) {
    const wanted = String(id).trim();
    if (!wanted) return;
    $("find-id").value = wanted;
    const p = panels.message;
    show(p.root, true);
    panelStatus("message", "");
    try {
      const { data } = await api("GET", `/admin/messages/${encodeURIComponent(wanted)}`);
      showMessage(data, "find");
    } catch (err) {
      if (escalate(err)) return;
      message.current = null;
      $("message-title").textContent = `Message ${wanted}`;
      p.meta.textContent = "";
      replaceContent(
        p.body,
        el("p", { class: "muted not-found" }, err.status === 404 ? `No message ${wanted} in any queue.` : ""),
      );
      panelError("message", err);
      p.root.scrollIntoView({ block: "start" });
    }
  }

  // -- Dead letters --------------------------------------------------------------------------

  const deadSections = new Map(); // queue -> {sig, node}
  const selected = new Map(); // queue -> Set of dead-letter ids
  const deadFilter = { actor: "", error: "" };
  const deadActors = new Set();

  function selectionOf(queue) {
    if (!selected.has(queue)) selected.set(queue, new Set());
    return selected.get(queue);
  }

  function forgetDead(queue) {
    deadSections.delete(queue);
    panels.dead.sig = null;
  }

  async function deadAction(queue, kind, control) {
    const path = `/admin/queues/${q(queue)}/dead`;
    const ids = [...selectionOf(queue)];
    if (kind === "purge") {
      const total = deadSections.get(queue)?.count ?? 0;
      const ok = window.confirm(
        `Purge all ${total} dead letters of the "${queue}" queue? They cannot be recovered.`,
      );
      if (!ok) return;
    }
    await act("dead", control, async () => {
      let text;
      if (kind === "purge") {
        const { data } = await api("DELETE", path);
        text = `Purged ${data.purged} dead letters of ${queue}.`;
      } else {
        const body = kind === "selected" ? { ids } : {};
        const { data } = await api("POST", `${path}/retry`, body);
        const gone = data.not_found.length ? ` (${data.not_found.length} were already gone)` : "";
        text = `Retried ${data.retried} dead letters of ${queue}${gone}.`;
      }
      selectionOf(queue).clear();
      // Rebuild the list even if nothing changed, so no checkbox stays ticked.
      forgetDead(queue);
      return text;
    });
  }

  async function deleteDead(queue, id, actor, panel, control) {
    const ok = window.confirm(
      `Delete dead letter ${id} (${actor}) of the "${queue}" queue? It cannot be recovered.`,
    );
    if (!ok) return false;
    return act(panel, control, async () => {
      await api("DELETE", `/admin/queues/${q(queue)}/dead/${encodeURIComponent(id)}`);
      selectionOf(queue).delete(id);
      forgetDead(queue);
      return `Deleted dead letter ${id} of ${queue}.`;
    });
  }

  async function deadDetail(queue, item, control) {
    control.disabled = true;
    try {
      const { data } = await api("GET", `/admin/queues/${q(queue)}/dead/${encodeURIComponent(item.id)}`);
      showMessage({ state: "dead", queue, ...data }, "dead");
    } catch (err) {
      if (escalate(err)) return;
      // The list's copy (traceback as recorded), and why the detail could not be read.
      showMessage({ state: "dead", queue, ...item }, "dead");
      panelError("message", err);
    } finally {
      control.disabled = false;
    }
  }

  function deadSection(queue, count, page, err) {
    const chosen = selectionOf(queue);
    const items = page ? page.items : [];
    const present = new Set(items.map((m) => m.id));
    for (const id of [...chosen]) if (!present.has(id)) chosen.delete(id);
    for (const m of items) deadActors.add(m.actor);

    const headingId = idFor("dead", queue);
    const retrySelected = button(
      "Retry selected",
      {
        "data-focus-key": `${queue}:retry-selected`,
        "aria-label": `Retry selected dead letters of ${queue}`,
        disabled: chosen.size === 0,
      },
      (b) => deadAction(queue, "selected", b),
    );
    const retryAll = button(
      "Retry all",
      { "data-focus-key": `${queue}:retry-all`, "aria-label": `Retry all dead letters of ${queue}` },
      (b) => deadAction(queue, "all", b),
    );
    const purge = button(
      "Purge",
      { class: "danger", "data-focus-key": `${queue}:purge`, "aria-label": `Purge dead letters of ${queue}` },
      (b) => deadAction(queue, "purge", b),
    );

    const syncButton = () => {
      retrySelected.disabled = chosen.size === 0;
    };
    const boxes = [];
    const rows = items.map((m) => {
      const box = el("input", {
        type: "checkbox",
        checked: chosen.has(m.id),
        "data-focus-key": `${queue}:${m.id}`,
        "aria-label": `Select dead letter ${m.id} (${m.actor})`,
      });
      box.addEventListener("change", () => {
        if (box.checked) chosen.add(m.id);
        else chosen.delete(m.id);
        syncButton();
      });
      boxes.push(box);
      const args = JSON.stringify(m.args) + (m.kwargs && Object.keys(m.kwargs).length ? ` ${JSON.stringify(m.kwargs)}` : "");
      return el(
        "tr",
        { "data-id": m.id },
        el("td", { class: "select" }, box),
        el("th", { scope: "row" }, m.actor),
        el("td", { class: "args", title: args }, el("code", {}, clip(args, 80))),
        el("td", { class: "error-text" }, m.error ? clip(m.error, 200) : "—"),
        el("td", {}, when(m.failed_at || m.enqueued_at)),
        el("td", { class: "num" }, String(m.retries)),
        el(
          "td",
          { class: "action" },
          button(
            "Details",
            { "data-focus-key": `${queue}:detail:${m.id}`, "aria-label": `Details of dead letter ${m.id}` },
            (b) => deadDetail(queue, m, b),
          ),
          " ",
          button(
            "Delete",
            { class: "danger", "data-focus-key": `${queue}:delete:${m.id}`, "aria-label": `Delete dead letter ${m.id}` },
            (b) => deleteDead(queue, m.id, m.actor, "dead", b),
          ),
        ),
      );
    });
    const all = el("input", {
      type: "checkbox",
      "data-focus-key": `${queue}:all`,
      "aria-label": `Select every listed dead letter of ${queue}`,
      checked: items.length > 0 && chosen.size === items.length,
    });
    all.addEventListener("change", () => {
      for (const [i, box] of boxes.entries()) {
        box.checked = all.checked;
        if (all.checked) chosen.add(items[i].id);
        else chosen.delete(items[i].id);
      }
      syncButton();
    });

    const filtered = deadFilter.actor || deadFilter.error;
    let shown = "";
    if (filtered) shown = ` · ${items.length}${page && page.next_cursor ? "+" : ""} match the filter`;
    else if (items.length < count) shown = ` (oldest ${items.length} shown)`;
    const section = el(
      "section",
      { class: "dead-queue", "data-queue": queue, "aria-labelledby": headingId },
      el(
        "div",
        { class: "dead-head" },
        el("h3", { id: headingId }, `${queue}`, el("span", { class: "count" }, `${count} dead${shown}`)),
        el("div", { class: "actions" }, retrySelected, retryAll, purge),
      ),
    );
    if (err) section.append(el("p", { class: "error", role: "alert" }, problemText(err)));
    if (page) {
      section.append(
        table(
          `Dead letters of ${queue}`,
          [all, "Actor", "Arguments", "Error", "Failed", "Retries", ""],
          rows,
          filtered ? "No dead letter of this queue matches the filter." : "No dead letters listed.",
        ),
      );
    }
    return section;
  }

  function syncActorList() {
    const list = $("dead-actors");
    const names = [...deadActors].sort();
    if (list.options.length === names.length) return;
    list.replaceChildren(...names.map((n) => el("option", { value: n })));
  }

  function renderDead(results) {
    const p = panels.dead;
    const total = results.reduce((n, r) => n + r.q.dead, 0);
    const where = results.length === 1 ? "1 queue" : `${results.length} queues`;
    p.meta.textContent = total ? `${total} in ${where}` : "";
    const nodes = [];
    const keep = new Set();
    for (const r of results) {
      const queue = r.q.queue;
      keep.add(queue);
      const sig = JSON.stringify([r.q.dead, r.page, r.err ? problemText(r.err) : null, deadFilter]);
      let entry = deadSections.get(queue);
      if (!entry || entry.sig !== sig) {
        entry = { sig, count: r.q.dead, node: deadSection(queue, r.q.dead, r.page, r.err) };
        deadSections.set(queue, entry);
      }
      nodes.push(entry.node);
    }
    for (const queue of [...deadSections.keys()]) {
      if (!keep.has(queue)) {
        deadSections.delete(queue);
        selected.delete(queue);
      }
    }
    syncActorList();
    if (!nodes.length) nodes.push(el("p", { class: "empty muted" }, "No dead letters in any queue."));
    const sig = JSON.stringify(results.map((r) => deadSections.get(r.q.queue).sig));
    if (p.sig !== sig) {
      p.sig = sig;
      replaceContent(p.body, ...nodes);
    }
  }

  async function loadDead(my, queues) {
    const withDead = (queues.items || []).filter((x) => x.dead > 0);
    const params = new URLSearchParams({ limit: "50" });
    if (deadFilter.actor) params.set("actor", deadFilter.actor);
    if (deadFilter.error) params.set("error", deadFilter.error);
    const results = await Promise.all(
      withDead.map(async (x) => {
        try {
          const path = `/admin/queues/${q(x.queue)}/dead?${params}`;
          return { q: x, page: (await api("GET", path)).data, err: null };
        } catch (err) {
          return { q: x, page: null, err };
        }
      }),
    );
    if (my !== epoch) return;
    for (const r of results) if (r.err && escalate(r.err)) return;
    panelError("dead", null);
    renderDead(results);
  }

  function applyDeadFilter(event) {
    if (event) event.preventDefault();
    deadFilter.actor = $("dead-actor").value.trim();
    deadFilter.error = $("dead-error").value.trim();
    deadSections.clear();
    panels.dead.sig = null;
    refreshNow();
  }

  function clearDeadFilter() {
    $("dead-actor").value = "";
    $("dead-error").value = "";
    applyDeadFilter(null);
  }

  // -- Schedules -----------------------------------------------------------------------------

  const openHistories = new Map(); // schedule name -> {data, err}

  async function runNow(name, control) {
    await act("schedules", control, async () => {
      const { data } = await api("POST", `/admin/schedules/${encodeURIComponent(name)}/run`);
      return `Started ${data.name} (fire key ${data.fire_key}).`;
    });
  }

  async function loadHistory(name) {
    try {
      const { data } = await api("GET", `/admin/schedules/${encodeURIComponent(name)}/runs?limit=20`);
      if (openHistories.has(name)) openHistories.set(name, { data, err: null });
    } catch (err) {
      if (escalate(err)) return;
      if (openHistories.has(name)) openHistories.set(name, { data: null, err });
    }
  }

  async function toggleHistory(name) {
    if (openHistories.has(name)) {
      openHistories.delete(name);
      renderSchedules(lastSchedules);
      return;
    }
    openHistories.set(name, { data: null, err: null });
    renderSchedules(lastSchedules);
    await loadHistory(name);
    renderSchedules(lastSchedules);
  }

  async function loadHistories(my) {
    if (!openHistories.size) return;
    await Promise.all([...openHistories.keys()].map(loadHistory));
    if (my === epoch && lastSchedules) renderSchedules(lastSchedules);
  }

  function lastRunCell(run) {
    if (!run) return el("td", { class: "last-run" }, el("span", { class: "last-status muted" }, "never"));
    const cell = el(
      "td",
      { class: "last-run" },
      badge(run.status, "last-status"),
      run.manual ? el("span", { class: "tag" }, "manual") : null,
      " ",
      when(run.finished_at || run.started_at || run.enqueued_at),
    );
    if (run.error) cell.append(el("div", { class: "error-text" }, clip(run.error, 200)));
    return cell;
  }

  function historyRow(name, entry) {
    let content;
    if (entry.err) content = el("p", { class: "error" }, problemText(entry.err));
    else if (!entry.data) content = el("p", { class: "muted" }, "Loading…");
    else {
      const rows = (entry.data.items || []).map((r) =>
        el(
          "tr",
          { "data-fire-key": r.fire_key },
          el("th", { scope: "row" }, el("code", {}, r.fire_key)),
          el("td", {}, badge(r.status, "run-status"), r.manual ? el("span", { class: "tag" }, "manual") : null),
          el("td", {}, when(r.scheduled_for)),
          el("td", {}, when(r.started_at)),
          el("td", { class: "num duration" }, fmtDuration(r.duration_seconds)),
          el("td", { class: "error-text" }, r.error ? clip(r.error, 200) : ""),
        ),
      );
      content = table(
        `Latest runs of ${name}`,
        ["Fire key", "Status", "Scheduled for", "Started", "Duration", "Error"],
        rows,
        "No runs recorded yet.",
      );
    }
    return el(
      "tr",
      { class: "history-row", "data-history": name },
      el("td", { colspan: 5 }, el("h4", {}, `Latest runs of ${name}`), content),
    );
  }

  let lastSchedules = null;

  function renderSchedules(data) {
    lastSchedules = data;
    const p = panels.schedules;
    if (data.leader !== undefined) {
      p.meta.replaceChildren(
        data.leader
          ? el("span", { class: "leader" }, "Leader: ", el("code", {}, data.leader))
          : el("span", { class: "leader warn" }, "No leader: is a scheduler running?"),
      );
    }
    const rows = [];
    for (const job of data.items) {
      const open = openHistories.has(job.name);
      const run = job.last_run;
      rows.push(
        el(
          "tr",
          { "data-job": job.name },
          el(
            "th",
            { scope: "row" },
            el("div", {}, job.name),
            job.description ? el("div", { class: "muted small" }, job.description) : null,
          ),
          el("td", {}, el("code", { class: "trigger" }, job.trigger)),
          el("td", { class: "next-run" }, when(job.next_run_at)),
          lastRunCell(run),
          el(
            "td",
            { class: "action" },
            button(
              "Run now",
              { "data-focus-key": `run:${job.name}`, "aria-label": `Run ${job.name} now` },
              (b) => runNow(job.name, b),
            ),
            " ",
            button(
              open ? "Hide history" : "History",
              {
                "data-focus-key": `history:${job.name}`,
                "aria-label": `History of ${job.name}`,
                "aria-expanded": String(open),
              },
              () => toggleHistory(job.name),
            ),
          ),
        ),
      );
      if (open) rows.push(historyRow(job.name, openHistories.get(job.name)));
    }
    replaceContent(
      p.body,
      table(
        "Scheduled jobs",
        ["Job", "Trigger", "Next run", "Last run", ""],
        rows,
        "No scheduled jobs published yet: start a scheduler.",
      ),
    );
  }

  /** The overview's schedule briefs as the schedule list (leader from the health check). */
  function schedulesFromOverview(ov) {
    const raw = ov.schedules;
    if (raw && !Array.isArray(raw) && Array.isArray(raw.items)) return raw;
    const check = ov.health && ov.health.checks && ov.health.checks.scheduler;
    const leader = check && check.data && "leader" in check.data ? check.data.leader : undefined;
    const items = (raw || []).map((s) => ({
      name: s.name,
      description: s.description || "",
      trigger: s.trigger,
      next_run_at: s.next_run_at,
      last_run: s.last_run !== undefined ? s.last_run : s.last_status
        ? { status: s.last_status, finished_at: s.last_finished_at, error: s.last_error }
        : null,
    }));
    return { leader, items };
  }

  // -- Backups -------------------------------------------------------------------------------

  let backupsAvailable = true;
  let backupActive = false;

  async function startBackup() {
    const control = $("start-backup");
    await act("backups", control, async () => {
      const { data } = await api("POST", "/admin/backups");
      backupActive = true;
      forceBackups = true;
      return `Started backup ${data.id}.`;
    });
    control.disabled = !backupsAvailable;
  }

  function renderBackups(data) {
    const p = panels.backups;
    const items = data.items.slice(0, 10);
    const last = data.items.find((b) => b.status === "succeeded");
    p.meta.textContent = last ? `last good: ${fmtAbs(last.finished_at)}` : "no successful backup listed";
    const rows = items.map((b) =>
      el(
        "tr",
        { "data-backup": b.id },
        el("th", { scope: "row" }, el("code", {}, b.id)),
        el("td", {}, badge(b.status, "backup-status"), b.manual ? el("span", { class: "tag" }, "manual") : null),
        el("td", {}, when(b.requested_at)),
        el("td", {}, when(b.finished_at)),
        el("td", { class: "num" }, fmtBytes(b.size)),
        el("td", { class: "num" }, fmtCount(b.documents)),
        el("td", { class: "error-text" }, b.error ? clip(b.error, 200) : ""),
      ),
    );
    replaceContent(
      p.body,
      table(
        "Backups, newest first",
        ["Backup", "Status", "Requested", "Finished", "Size", "Documents", "Error"],
        rows,
        "No backups yet.",
      ),
    );
  }

  async function loadBackups(my) {
    try {
      const { data } = await api("GET", "/admin/backups?limit=20");
      if (my !== epoch) return;
      panelError("backups", null);
      backupActive = data.items.some((b) => b.status === "queued" || b.status === "running");
      renderIfChanged("backups", data, renderBackups);
    } catch (err) {
      if (my !== epoch || escalate(err)) return;
      if (missingRoute(err)) {
        // An older server without the backup routes.
        backupsAvailable = false;
        $("start-backup").disabled = true;
        notAvailable("backups", "Backups");
        return;
      }
      panelError("backups", err);
    }
  }

  // -- Polling -------------------------------------------------------------------------------

  const UNAVAILABLE = Symbol("unavailable");
  let overviewAvailable = null; // null: not asked yet
  const unavailable = new Set(); // optional endpoints this server does not have

  let timer = null;
  let running = false;
  let again = false;
  let cycle = 0;
  let pausedUntil = 0;
  let forceBackups = false;

  /** GET an endpoint a server may lack: its body, ``UNAVAILABLE`` (404/405), or ``{error}``. */
  async function optional(name, path) {
    if (unavailable.has(name)) return UNAVAILABLE;
    try {
      return (await api("GET", path)).data;
    } catch (err) {
      if (missingRoute(err)) {
        unavailable.add(name);
        return UNAVAILABLE;
      }
      return { error: err };
    }
  }

  /** What the overview holds, read from the separate endpoints (a server without it). */
  async function legacyOverview(my) {
    // Queues first, alone: a non-admin meets one 403 rather than one per panel.
    let queues = null;
    let queuesErr = null;
    try {
      queues = (await api("GET", "/admin/queues")).data;
    } catch (err) {
      if (my !== epoch || escalate(err)) return null;
      queuesErr = err;
    }
    const [workers, schedules, history, backlog, health] = await Promise.all([
      optional("workers", "/admin/workers"),
      optional("schedules", "/admin/schedules"),
      optional("history", "/admin/history?window=1h"),
      optional("backlog", "/admin/backlog?limit=10"),
      optional("health", "/admin/health"),
    ]);
    if (my !== epoch) return null;
    for (const x of [workers, schedules, history, backlog, health]) {
      if (x && x.error && escalate(x.error)) return null;
    }
    return { queues, queuesErr, workers, schedules, history, backlog, health };
  }

  /** The overview as the panels' parts; what it leaves empty is read from its own endpoint. */
  async function fromOverview(ov) {
    const [history, backlog] = await Promise.all([
      ov.history && ov.history.since ? ov.history : optional("history", "/admin/history?window=1h"),
      ov.backlog && ov.backlog.queues ? ov.backlog : optional("backlog", "/admin/backlog?limit=10"),
    ]);
    return {
      queues: ov.queues,
      queuesErr: ov.queues ? null : new Error("The broker is unreachable (see Health)"),
      workers: ov.workers || { error: new Error("Redis is unreachable (see Health)") },
      schedules: schedulesFromOverview(ov),
      history,
      backlog,
      health: ov.health,
    };
  }

  function renderPart(name, value, what, render) {
    if (value === UNAVAILABLE) {
      notAvailable(name, what);
      return false;
    }
    if (value && value.error) {
      panelError(name, value.error);
      return false;
    }
    if (!value) return false;
    panelError(name, null);
    renderIfChanged(name, value, render);
    return true;
  }

  async function pollOnce() {
    const my = epoch;
    cycle += 1;
    let view = null;
    if (overviewAvailable !== false) {
      try {
        const { data } = await api("GET", "/admin/overview");
        overviewAvailable = true;
        view = await fromOverview(data);
        if (my !== epoch) return;
        for (const x of [view.history, view.backlog]) if (x && x.error && escalate(x.error)) return;
      } catch (err) {
        if (my !== epoch || escalate(err)) return;
        if (missingRoute(err)) overviewAvailable = false;
        else {
          panelError("queues", err);
          return;
        }
      }
    }
    if (!view) view = await legacyOverview(my);
    if (!view || my !== epoch) return;

    const queues = view.queues;
    if (queues) {
      panelError("queues", null);
      latestQueues = (queues.items || []).map((x) => x.queue);
      renderIfChanged("queues", queues, renderQueues);
      syncBrowseQueues(latestQueues);
      if (!$("global-notice").hidden && Date.now() >= pausedUntil) setText($("global-notice"), "");
    } else if (view.queuesErr) {
      panelError("queues", view.queuesErr);
    }
    if (renderPart("workers", view.workers, "The worker list", renderWorkers)) renderBusy(view.workers);
    renderPart("schedules", view.schedules, "The schedule", renderSchedules);
    renderPart("health", view.health, "The health summary", renderHealth);
    renderPart("backlog", view.backlog, "The per-user backlog", renderBacklog);
    if (view.history === UNAVAILABLE) unavailable.add("history");
    else if (view.history && !view.history.error) hourHistory = view.history;
    renderCharts();

    const work = [loadBrowse(my, false), loadDay(my), loadHistories(my)];
    if (queues) work.push(loadDead(my, queues));
    if (backupsAvailable && (backupActive || forceBackups || cycle % BACKUP_EVERY === 1)) {
      forceBackups = false;
      work.push(loadBackups(my));
    }
    await Promise.all(work);
    if (my === epoch && queues) {
      lastUpdated = new Date().toISOString();
      tickTimes();
    }
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(tick, ms);
  }

  async function tick() {
    timer = null;
    if (!session.access || forbidden) return;
    if (document.hidden) return; // resumed by the visibilitychange listener
    const wait = pausedUntil - Date.now();
    if (wait > 0) {
      schedule(wait);
      return;
    }
    if (running) {
      again = true;
      return;
    }
    running = true;
    const my = epoch;
    try {
      await pollOnce();
    } catch (err) {
      // A bug must not stop the polling: show it and carry on.
      setText($("global-notice"), `Refresh failed: ${problemText(err)}`);
    } finally {
      running = false;
    }
    if (my !== epoch || !session.access || forbidden) return;
    const next = again ? 0 : POLL_MS;
    again = false;
    schedule(next);
  }

  function refreshNow() {
    schedule(0);
  }

  function stopPolling() {
    clearTimeout(timer);
    timer = null;
    again = false;
  }

  function startDashboard() {
    epoch += 1;
    forbidden = false;
    cycle = 0;
    resetPanels();
    showView("dashboard");
    refreshNow();
  }

  // -- Sign in / out -------------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    const control = $("signin-submit");
    const email = $("email").value.trim();
    const password = $("password").value;
    setText($("signin-error"), "");
    setText($("signin-notice"), "");
    control.disabled = true;
    try {
      const resp = await send("POST", "/auth/login", { email, password });
      const { data } = await parse(resp);
      session.access = data.access_token;
      session.refresh = data.refresh_token;
      session.email = (data.user && data.user.email) || email;
      saveSession();
      $("password").value = "";
      startDashboard();
    } catch (err) {
      setText($("signin-error"), problemText(err));
    } finally {
      control.disabled = false;
    }
  }

  async function signOut() {
    const token = session.access;
    signedOut("Signed out.");
    if (token) {
      // Ends this login on the server too (the access token stops working at once).
      await send("POST", "/auth/logout", undefined, token).catch(() => null);
    }
  }

  function init() {
    $("signin-form").addEventListener("submit", signIn);
    $("signout").addEventListener("click", signOut);
    $("refresh").addEventListener("click", () => {
      forceBackups = true;
      day.at = 0;
      refreshNow();
    });
    $("start-backup").addEventListener("click", startBackup);
    $("find-form").addEventListener("submit", (event) => {
      event.preventDefault();
      findMessage($("find-id").value);
    });
    $("message-close").addEventListener("click", () => {
      show(panels.message.root, false);
      message.current = null;
    });
    $("window-1h").addEventListener("click", () => setWindow("1h"));
    $("window-24h").addEventListener("click", () => setWindow("24h"));
    $("chart-queue").addEventListener("change", (event) => {
      chart.queue = event.target.value;
      renderCharts();
    });
    $("browse-queue").addEventListener("change", (event) => browseQueue(event.target.value, browse.state));
    $("browse-state").addEventListener("change", (event) => browseQueue(browse.queue, event.target.value));
    $("dead-filter").addEventListener("submit", applyDeadFilter);
    $("dead-clear").addEventListener("click", clearDeadFilter);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && session.access && !forbidden) refreshNow();
    });
    setInterval(tickTimes, 1000);
    loadSession();
    if (session.access) startDashboard();
    else showView("signin");
  }

  init();
})();
