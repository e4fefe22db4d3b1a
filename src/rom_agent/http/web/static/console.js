// The operator console: live state from one EventSource, flags and actions through the
// console endpoints (session cookie + CSRF header).
"use strict";

(() => {
  const { el, duration, clock } = Rom;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  let flagsVersion = null;

  async function call(method, url, body) {
    const options = { method, headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(url, options);
    if (response.status === 401) { location.reload(); throw new Error("session expired"); }
    let data = {};
    try { data = await response.json(); } catch { /* empty */ }
    return { ok: response.ok, status: response.status, data };
  }

  function stats(target, rows) {
    target.replaceChildren(...rows.flatMap(([label, value, id]) => [
      el("dt", {}, label), el("dd", id ? { "data-stat": id } : {}, value)]));
  }

  // ------------------------------------------------------------------ breakers

  const ACTIONS = [
    ["open", "Force open", "Force the breaker of %s OPEN? Requests to it will fail over or be rejected until you close or reset it."],
    ["close", "Force close", "Force the breaker of %s CLOSED? Traffic resumes at once, even if the model is still failing."],
    ["reset", "Reset", "Reset the breaker of %s (CLOSED, counters to zero)?"],
  ];

  function breakerRow(model) {
    const id = "breaker-" + model;
    let row = document.getElementById(id);
    if (row) return row;
    const buttons = ACTIONS.map(([action, label, question]) => el("button", {
      type: "button", class: "small", "data-action": action,
      onclick: async () => {
        if (!confirm(question.replace("%s", model))) return;
        const result = await call("POST", `/console/api/breakers/${encodeURIComponent(model)}/${action}`);
        if (!result.ok) alert(result.data.error || "failed");
        loadFlags();
      },
    }, label));
    row = el("tr", { id, "data-model": model },
      el("td", {}, el("b", {}, model)),
      el("td", {}, el("span", { class: "state", "data-field": "state" })),
      el("td", { "data-field": "since" }), el("td", { "data-field": "why" }),
      el("td", { "data-field": "next" }), el("td", { "data-field": "counts" }),
      el("td", { "data-field": "rejected" }), el("td", { class: "actions" }, buttons));
    $("breakers").tBodies[0].append(row);
    return row;
  }

  function renderBreakers(state) {
    $("breakers-enabled").textContent = state.breakersEnabled ? "" : "(ENABLE_CIRCUIT_BREAKER is off: breakers are inert)";
    for (const m of state.models) {
      const row = breakerRow(m.model);
      const field = (name) => row.querySelector(`[data-field="${name}"]`);
      const badge = field("state");
      badge.textContent = m.forced ? m.state + " (forced)" : m.state;
      badge.dataset.state = m.state;
      row.dataset.state = m.state;
      field("since").textContent = `${clock(m.since)} (${duration(m.sinceS)} ago)`;
      field("why").textContent = m.why || "–";
      field("next").textContent = m.state === "OPEN" ? (m.forced ? "held open" : "in " + duration(m.nextProbeS)) : m.state === "HALF_OPEN" ? "probing now" : "–";
      field("counts").textContent = `${m.failuresLastMinute} / ${m.successesLastMinute}`;
      field("rejected").textContent = String(m.rejectedLastMinute);
    }
    $("fallbacks").textContent = String(state.fallbacksLastMinute);
  }

  // ------------------------------------------------------------------ panels

  function renderPanels(state) {
    const a = state.admission;
    stats($("admission"), [
      ["Enabled", a.enabled ? "yes" : "no (ENABLE_BOTTLENECK off)"],
      ["Running", `${a.running} / ${a.limit}`, "running"],
      ["Queued", `${a.queued} / ${a.queueLimit}`, "queued"],
      ["Rejections", `${a.rejectionsPerS}/s`, "rejections"],
      ["Retry-After now", `${a.retryAfterS} s`],
    ]);
    const r = state.retry;
    stats($("retry"), [
      ["Retry", r.enabled ? `on, up to ${r.maxRetries} per model` : "off"],
      ["Budget ratio", String(r.budgetRatio)],
      ["Retries (1 min)", String(r.retriesLastMinute)],
      ["Refused by budget (1 min)", String(r.refusedByBudgetLastMinute)],
    ]);
    const p = state.process;
    stats($("processinfo"), [
      ["Version", p.version], ["Uptime", duration(p.uptimeS)], ["Started", clock(p.startedAt)],
      ["Draining", p.draining ? "yes" : "no"],
      ["Fault injection", state.faultInjection ? "ON" : "off"],
    ]);
    $("draining").hidden = !p.draining;
    $("process").textContent = `version ${p.version} · up ${duration(p.uptimeS)}`;
    renderFleet(state.fleet);
    renderRollout(state.rollout);
  }

  function renderFleet(fleet) {
    $("fleet-card").hidden = !fleet;
    if (!fleet) return;
    const parts = [];
    const replicas = fleet.replicas || [];
    if (replicas.length) {
      const keys = [...new Set(replicas.flatMap((r) => Object.keys(r)))];
      parts.push(el("table", {},
        el("thead", {}, el("tr", {}, keys.map((k) => el("th", {}, k)))),
        el("tbody", {}, replicas.map((r) => el("tr", {}, keys.map((k) => el("td", {}, fmt(r[k]))))))));
    }
    const rest = Object.entries(fleet).filter(([k]) => k !== "replicas");
    if (rest.length) parts.push(el("dl", { class: "stats" }, rest.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, fmt(v))])));
    $("fleet").replaceChildren(...parts);
  }

  function fmt(value) {
    if (value === null || value === undefined) return "–";
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }

  // ------------------------------------------------------------------ rollout

  function renderRollout(run) {
    const status = $("rollout-status");
    $("rollout-start").disabled = Boolean(run && run.status === "running");
    if (!run) return;
    status.hidden = false;
    const origin = run.source === "cli" ? ` (CLI, ${run.client})` : "";
    const quiet = run.status === "running" && run.lastLineAt && Date.now() / 1000 - run.lastLineAt > 120;
    status.textContent = run.status + origin + (quiet ? " — no output for over 2 min" : "");
    status.dataset.status = run.status;
    $("rollout-report").hidden = !run.reportUrl;
    const list = $("rollout-events");
    if (list.dataset.run !== run.runId) { list.replaceChildren(); list.dataset.run = run.runId; }
    for (let i = list.children.length; i < run.events.length; i++) {
      const e = run.events[i];
      const mark = e.kind === "check" ? el("span", { class: "outcome", "data-outcome": e.outcome }, e.outcome) : null;
      list.append(el("li", { class: e.kind }, mark, " ", e.text));
    }
  }

  $("rollout-start").addEventListener("click", async () => {
    if (!confirm("Start the rollout (stages A → B → C) against this service? It changes flags and switches fault injection on for each drill.")) return;
    $("rollout-events").replaceChildren();
    const key = $("rollout-key").value.trim();
    const body = key ? { apiKey: key } : {};
    const delay = parseInt($("rollout-delay").value, 10);
    if (delay > 0) body.burst_delay_ms = delay; // stage C: how long each burst request is held
    const result = await call("POST", "/console/api/rollout", body);
    $("rollout-error").textContent = result.ok ? "" : result.data.error || "could not start";
  });

  // ------------------------------------------------------------------ flags and audit

  function flagRow(key, runtime) {
    const id = "flag-" + key;
    let row = document.getElementById(id);
    if (row) return row;
    const error = el("div", { class: "error", "data-field": "error", role: "alert" });
    const valueCell = el("td", {}, el("span", { "data-field": "value" }), error);
    const actions = el("td", { class: "actions" });
    row = el("tr", { id, "data-key": key }, el("td", {}, el("code", {}, key)), valueCell,
      el("td", { "data-field": "source" }), actions);
    if (runtime) {
      const input = el("input", { "data-field": "input", "aria-label": key, spellcheck: "false" });
      input.addEventListener("input", () => { row.dataset.dirty = "1"; });
      input.addEventListener("keydown", (e) => { if (e.key === "Enter") save(); });
      valueCell.firstChild.replaceWith(input);
      const save = async () => {
        error.textContent = "";
        const value = input.value.trim();
        if (key === "ENABLE_FAULT_INJECTION" && /^(true|1|yes)$/i.test(value) &&
            !confirm("Switch FAULT INJECTION on? FORCE_ERROR messages and X-Fault headers will make requests fail on purpose. Never in production.")) return;
        const result = await call("PATCH", "/console/api/flags", { [key]: value });
        if (!result.ok) { error.textContent = result.data.error || "rejected"; return; }
        delete row.dataset.dirty;
        loadFlags();
      };
      actions.append(el("button", { type: "button", class: "small", "data-action": "save", onclick: save }, "Save"),
        el("button", { type: "button", class: "small ghost", "data-action": "unset", onclick: async () => {
          const result = await call("DELETE", "/console/api/flags/" + key);
          if (!result.ok) { error.textContent = result.data.error || "failed"; return; }
          delete row.dataset.dirty;
          loadFlags();
        } }, "Unset"));
    }
    $("flags").tBodies[0].append(row);
    return row;
  }

  async function loadFlags() {
    const response = await fetch("/console/api/flags", { credentials: "same-origin" });
    if (response.status === 401) { location.reload(); return; }
    const data = await response.json();
    const runtime = new Set(data.runtimeKeys);
    for (const [key, value] of Object.entries(data.flags)) {
      const row = flagRow(key, runtime.has(key));
      const shown = Array.isArray(value) ? value.join(",") : value === null ? "" : String(value);
      const input = row.querySelector('[data-field="input"]');
      if (input) { if (!row.dataset.dirty) input.value = shown; }
      else row.querySelector('[data-field="value"]').textContent = shown || "–";
      const source = data.sources[key];
      const cell = row.querySelector('[data-field="source"]');
      cell.textContent = { runtime: "override", env: "environment", default: "default" }[source] || source;
      cell.dataset.source = source;
      const unset = row.querySelector('[data-action="unset"]');
      if (unset) unset.hidden = source !== "runtime";
    }
    renderAudit(data.history);
  }

  function renderAudit(entries) {
    $("audit").tBodies[0].replaceChildren(...entries.map((e) => el("tr", { "data-id": e.id },
      el("td", {}, clock(e.time)),
      el("td", {}, e.action + (e.target ? " " + e.target : "")),
      el("td", {}, Object.entries(e.changes).map(([k, c]) => el("div", {}, el("code", {}, k), `: ${fmt(c.old)} → ${fmt(c.new)}`))),
      el("td", {}, e.client))));
  }

  // ------------------------------------------------------------------ the live stream

  const link = $("link");
  const source = new EventSource("/console/events");
  source.onopen = () => { link.textContent = "live"; link.dataset.state = "live"; };
  source.onerror = () => {
    link.textContent = source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…";
    link.dataset.state = "down";
    if (source.readyState === EventSource.CLOSED) setTimeout(() => location.reload(), 3000);
  };
  source.onmessage = (message) => {
    const state = JSON.parse(message.data);
    renderBreakers(state);
    renderPanels(state);
    if (state.flagsUpdatedAt !== flagsVersion) {
      flagsVersion = state.flagsUpdatedAt;
      loadFlags();
    }
  };

  $("logout-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    await fetch("/console/logout", { method: "POST", headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" });
    location.href = "/console";
  });
})();
