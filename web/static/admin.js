// Operator dashboard: signs in against /api/v1/auth, then polls the admin API.
// Every piece of data reaches the page as text (textContent / text nodes), never as markup.
"use strict";

(() => {
  const API = "/api/v1";
  const POLL_MS = 5000;
  // The backup list changes rarely: read it every few polls unless one is queued or running.
  const BACKUP_EVERY = 3;
  const STORE_KEY = "taskmanager.admin.session";
  const LATENCY_WARN_S = 10;
  const LATENCY_BAD_S = 60;
  const HEARTBEAT_WARN_S = 5;

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
      else if (key === "checked" || key === "disabled") node[key] = Boolean(value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
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

  // -- Formatting ----------------------------------------------------------------------------

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "—";
    if (s === 0) return "0 s";
    if (s < 1) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  function fmtAbs(iso) {
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : `${d.toISOString().slice(0, 19).replace("T", " ")} UTC`;
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

  function fmtCount(n) {
    return n === null || n === undefined ? "—" : String(n);
  }

  function clip(text, max) {
    return text.length > max ? `${text.slice(0, max - 1)}…` : text;
  }

  function badge(status, extraClass) {
    const safe = String(status).replace(/[^a-z_]/g, "");
    return el("span", { class: `badge status-${safe} ${extraClass || ""}`.trim() }, String(status));
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

  const panels = {};
  for (const name of ["queues", "workers", "dead", "schedules", "backups"]) {
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

  function resetPanels() {
    for (const p of Object.values(panels)) {
      p.sig = null;
      setText(p.error, "");
      if (p.status) p.status.textContent = "";
      p.meta.textContent = "";
      replaceContent(p.body, el("p", { class: "muted" }, "Loading…"));
    }
    deadSections.clear();
    selected.clear();
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

  // -- Queues --------------------------------------------------------------------------------

  function latencyCell(seconds) {
    if (seconds === null || seconds === undefined) return el("td", { class: "num" }, "—");
    let level = "ok";
    if (seconds >= LATENCY_BAD_S) level = "bad";
    else if (seconds >= LATENCY_WARN_S) level = "warn";
    const label = { ok: null, warn: "slow", bad: "stalled" }[level];
    return el(
      "td",
      { class: `num latency ${level}`, title: `The next message has waited ${fmtSeconds(seconds)}` },
      fmtSeconds(seconds),
      label ? el("span", { class: `tag ${level}` }, label) : null,
    );
  }

  function renderQueues(data) {
    const p = panels.queues;
    const dead = data.items.reduce((n, q) => n + q.dead, 0);
    p.meta.textContent = `broker: ${data.broker} · ${data.items.length} queues · ${dead} dead`;
    const rows = data.items.map((q) =>
      el(
        "tr",
        { "data-queue": q.queue },
        el("th", { scope: "row" }, q.queue),
        el("td", { class: "num ready" }, fmtCount(q.ready)),
        el("td", { class: "num delayed" }, fmtCount(q.delayed)),
        el("td", { class: "num in-progress" }, fmtCount(q.in_progress)),
        el("td", { class: `num dead ${q.dead > 0 ? "bad" : ""}`.trim() }, fmtCount(q.dead)),
        latencyCell(q.oldest_age_seconds),
      ),
    );
    replaceContent(
      p.body,
      table(
        "Messages per queue",
        ["Queue", "Ready", "Delayed", "In progress", "Dead", "Oldest age"],
        rows,
        "No queues.",
      ),
    );
  }

  // -- Workers -------------------------------------------------------------------------------

  function renderWorkers(data) {
    const p = panels.workers;
    const inFlight = data.items.reduce((n, w) => n + w.in_flight, 0);
    p.meta.textContent = `${data.items.length} live · ${inFlight} in flight`;
    const rows = data.items.map((w) => {
      const age = w.heartbeat_age_seconds;
      const level = age >= HEARTBEAT_WARN_S ? "warn" : "ok";
      return el(
        "tr",
        { "data-worker": w.id },
        el("th", { scope: "row", title: w.id }, `${w.host}:${w.pid}`),
        el("td", {}, w.queues.join(", ")),
        el("td", { class: "num" }, String(w.threads)),
        el("td", {}, badge(w.state)),
        el("td", { class: `num heartbeat ${level}` }, fmtSeconds(age)),
        el("td", { class: "num in-flight" }, String(w.in_flight)),
        el("td", {}, when(w.started_at)),
      );
    });
    replaceContent(
      p.body,
      table(
        "Live workers",
        ["Worker", "Queues", "Threads", "State", "Heartbeat", "In flight", "Started"],
        rows,
        "No live workers: messages wait until one starts.",
      ),
    );
  }

  // -- Dead letters --------------------------------------------------------------------------

  const deadSections = new Map(); // queue -> {sig, node}
  const selected = new Map(); // queue -> Set of dead-letter ids

  function selectionOf(queue) {
    if (!selected.has(queue)) selected.set(queue, new Set());
    return selected.get(queue);
  }

  async function deadAction(queue, kind, button) {
    const path = `/admin/queues/${encodeURIComponent(queue)}/dead`;
    const ids = [...selectionOf(queue)];
    if (kind === "purge") {
      const total = deadSections.get(queue)?.count ?? 0;
      const ok = window.confirm(
        `Purge all ${total} dead letters of the "${queue}" queue? They cannot be recovered.`,
      );
      if (!ok) return;
    }
    button.disabled = true;
    panelError("dead", null);
    try {
      if (kind === "purge") {
        const { data } = await api("DELETE", path);
        panelStatus("dead", `Purged ${data.purged} dead letters of ${queue}.`);
      } else {
        const body = kind === "selected" ? { ids } : {};
        const { data } = await api("POST", `${path}/retry`, body);
        const gone = data.not_found.length ? ` (${data.not_found.length} were already gone)` : "";
        panelStatus("dead", `Retried ${data.retried} dead letters of ${queue}${gone}.`);
      }
      selectionOf(queue).clear();
      // Rebuild the list even if nothing changed, so no checkbox stays ticked.
      deadSections.delete(queue);
      panels.dead.sig = null;
    } catch (err) {
      if (!escalate(err)) panelError("dead", err);
    } finally {
      button.disabled = false;
      refreshNow();
    }
  }

  function deadSection(queue, count, page, err) {
    const chosen = selectionOf(queue);
    const items = page ? page.items : [];
    const present = new Set(items.map((m) => m.id));
    for (const id of [...chosen]) if (!present.has(id)) chosen.delete(id);

    const headingId = `dead-${queue.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    const retrySelected = el(
      "button",
      {
        type: "button",
        "data-focus-key": `${queue}:retry-selected`,
        "aria-label": `Retry selected dead letters of ${queue}`,
        disabled: chosen.size === 0,
      },
      "Retry selected",
    );
    retrySelected.addEventListener("click", () => deadAction(queue, "selected", retrySelected));
    const retryAll = el(
      "button",
      {
        type: "button",
        "data-focus-key": `${queue}:retry-all`,
        "aria-label": `Retry all dead letters of ${queue}`,
      },
      "Retry all",
    );
    retryAll.addEventListener("click", () => deadAction(queue, "all", retryAll));
    const purge = el(
      "button",
      {
        type: "button",
        class: "danger",
        "data-focus-key": `${queue}:purge`,
        "aria-label": `Purge dead letters of ${queue}`,
      },
      "Purge",
    );
    purge.addEventListener("click", () => deadAction(queue, "purge", purge));

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
      const args = JSON.stringify(m.args) + (Object.keys(m.kwargs).length ? ` ${JSON.stringify(m.kwargs)}` : "");
      const error = el("td", { class: "error-text" }, m.error || "—");
      if (m.traceback) {
        error.append(
          el("details", {}, el("summary", {}, "Traceback"), el("pre", {}, m.traceback)),
        );
      }
      return el(
        "tr",
        { "data-id": m.id },
        el("td", { class: "select" }, box),
        el("th", { scope: "row" }, m.actor),
        el("td", { class: "args", title: args }, el("code", {}, clip(args, 80))),
        error,
        el("td", {}, when(m.failed_at || m.enqueued_at)),
        el("td", { class: "num" }, String(m.retries)),
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

    const shown = items.length < count ? ` (oldest ${items.length} shown)` : "";
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
          [all, "Actor", "Arguments", "Error", "Failed", "Retries"],
          rows,
          "No dead letters listed.",
        ),
      );
    }
    return section;
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
      const sig = JSON.stringify([r.q.dead, r.page, r.err ? problemText(r.err) : null]);
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
    if (!nodes.length) nodes.push(el("p", { class: "empty muted" }, "No dead letters in any queue."));
    const sig = JSON.stringify(results.map((r) => deadSections.get(r.q.queue).sig));
    if (p.sig !== sig) {
      p.sig = sig;
      replaceContent(p.body, ...nodes);
    }
  }

  async function loadDead(my, queues) {
    const withDead = queues.items.filter((q) => q.dead > 0);
    const results = await Promise.all(
      withDead.map(async (q) => {
        try {
          const path = `/admin/queues/${encodeURIComponent(q.queue)}/dead?limit=50`;
          return { q, page: (await api("GET", path)).data, err: null };
        } catch (err) {
          return { q, page: null, err };
        }
      }),
    );
    if (my !== epoch) return;
    for (const r of results) if (r.err && escalate(r.err)) return;
    panelError("dead", null);
    renderDead(results);
  }

  // -- Schedules -----------------------------------------------------------------------------

  async function runNow(name, button) {
    button.disabled = true;
    panelError("schedules", null);
    try {
      const { data } = await api("POST", `/admin/schedules/${encodeURIComponent(name)}/run`);
      panelStatus("schedules", `Started ${data.name} (fire key ${data.fire_key}).`);
    } catch (err) {
      if (!escalate(err)) panelError("schedules", err);
    } finally {
      button.disabled = false;
      refreshNow();
    }
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

  function renderSchedules(data) {
    const p = panels.schedules;
    p.meta.replaceChildren(
      data.leader
        ? el("span", { class: "leader" }, "Leader: ", el("code", {}, data.leader))
        : el("span", { class: "leader warn" }, "No leader: is a scheduler running?"),
    );
    const rows = data.items.map((job) => {
      const button = el(
        "button",
        {
          type: "button",
          "data-focus-key": `run:${job.name}`,
          "aria-label": `Run ${job.name} now`,
        },
        "Run now",
      );
      button.addEventListener("click", () => runNow(job.name, button));
      const run = job.last_run;
      return el(
        "tr",
        { "data-job": job.name },
        el("th", { scope: "row" }, el("div", {}, job.name), el("div", { class: "muted small" }, job.description)),
        el("td", {}, el("code", { class: "trigger" }, job.trigger)),
        el("td", { class: "next-run" }, when(job.next_run_at)),
        lastRunCell(run),
        el("td", { class: "num duration" }, fmtMs(run ? run.duration_ms : null)),
        el("td", { class: "action" }, button),
      );
    });
    replaceContent(
      p.body,
      table(
        "Scheduled jobs",
        ["Job", "Trigger", "Next run", "Last run", "Duration", ""],
        rows,
        "No scheduled jobs published yet: start a scheduler.",
      ),
    );
  }

  // -- Backups -------------------------------------------------------------------------------

  let backupsAvailable = true;
  let backupActive = false;

  async function startBackup() {
    const button = $("start-backup");
    button.disabled = true;
    panelError("backups", null);
    try {
      const { data } = await api("POST", "/admin/backups");
      panelStatus("backups", `Started backup ${data.id}.`);
      backupActive = true;
    } catch (err) {
      if (!escalate(err)) panelError("backups", err);
    } finally {
      button.disabled = !backupsAvailable;
      forceBackups = true;
      refreshNow();
    }
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
      if (err.status === 404 || err.status === 405) {
        // An older server without the backup routes.
        backupsAvailable = false;
        $("start-backup").disabled = true;
        panels.backups.sig = null;
        replaceContent(panels.backups.body, el("p", { class: "muted" }, "Backups are not available on this server."));
        return;
      }
      panelError("backups", err);
    }
  }

  // -- Polling -------------------------------------------------------------------------------

  let timer = null;
  let running = false;
  let again = false;
  let cycle = 0;
  let pausedUntil = 0;
  let forceBackups = false;

  async function load(name, path, render, my) {
    try {
      const { data } = await api("GET", path);
      if (my !== epoch) return;
      panelError(name, null);
      renderIfChanged(name, data, render);
    } catch (err) {
      if (my !== epoch || escalate(err)) return;
      panelError(name, err);
    }
  }

  async function pollOnce() {
    const my = epoch;
    cycle += 1;
    // Queues first, alone: a non-admin meets one 403 rather than one per panel, and the dead
    // letters to list depend on the counts.
    let queues = null;
    try {
      queues = (await api("GET", "/admin/queues")).data;
    } catch (err) {
      if (my !== epoch || escalate(err)) return;
      panelError("queues", err);
    }
    if (my !== epoch) return;
    if (queues) {
      panelError("queues", null);
      renderIfChanged("queues", queues, renderQueues);
      if (!$("global-notice").hidden && Date.now() >= pausedUntil) setText($("global-notice"), "");
    }
    const work = [
      load("workers", "/admin/workers", renderWorkers, my),
      load("schedules", "/admin/schedules", renderSchedules, my),
    ];
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
    const button = $("signin-submit");
    const email = $("email").value.trim();
    const password = $("password").value;
    setText($("signin-error"), "");
    setText($("signin-notice"), "");
    button.disabled = true;
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
      button.disabled = false;
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
      refreshNow();
    });
    $("start-backup").addEventListener("click", startBackup);
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
