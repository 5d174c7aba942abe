/* Training runs, live: poll the runs API every 2 s and update status, progress and message without a reload. */
(function () {
  "use strict";

  const INTERVAL_MS = 2000;
  const ACTIVE = ["queued", "running"];

  function formatNumber(value) {
    if (typeof value !== "number") return value === null || value === undefined ? "—" : String(value);
    if (Number.isInteger(value)) return value.toLocaleString("en");
    return Number(value.toPrecision(4)).toString();
  }

  function formatTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    const pad = (n) => String(n).padStart(2, "0");
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  // Rows of the latest curve point, built as text nodes: metric names come from the worker.
  function renderLatest(tbody, metrics) {
    const curve = metrics && Array.isArray(metrics.curve) ? metrics.curve : [];
    const last = curve.length ? curve[curve.length - 1] : null;
    if (!last || typeof last !== "object") return;
    tbody.replaceChildren(...Object.entries(last).map(([name, value]) => {
      const row = document.createElement("tr");
      const th = document.createElement("th");
      const td = document.createElement("td");
      th.textContent = name;
      td.textContent = formatNumber(value);
      row.append(th, td);
      return row;
    }));
  }

  function update(root, run) {
    root.dataset.status = run.status;
    root.querySelectorAll("[data-field]").forEach((el) => {
      switch (el.dataset.field) {
        case "status":
          el.textContent = run.status;
          el.className = "pill " + run.status;
          break;
        case "progress":
          el.value = run.progress;
          break;
        case "percent":
          el.textContent = Math.round(run.progress * 100) + "%";
          break;
        case "message":
          el.textContent = run.error || run.message || "";
          break;
        case "heartbeat":
          el.textContent = formatTime(run.heartbeat_at);
          break;
        case "latest":
          renderLatest(el, run.metrics);
          break;
      }
    });
  }

  async function fetchJson(url) {
    const response = await fetch(url, { headers: { accept: "application/json" }, credentials: "same-origin" });
    if (!response.ok) {
      const err = new Error("HTTP " + response.status);
      err.status = response.status;
      throw err;
    }
    return response.json();
  }

  // Polls while `step` says there is something left to watch; stops on 401/403/404 (signed out, gone).
  function poll(step) {
    let failures = 0;
    async function tick() {
      if (document.hidden) return setTimeout(tick, INTERVAL_MS);
      try {
        const more = await step();
        failures = 0;
        if (more) setTimeout(tick, INTERVAL_MS);
      } catch (err) {
        if ([401, 403, 404].includes(err.status)) return;
        failures += 1;
        setTimeout(tick, INTERVAL_MS * Math.min(failures + 1, 15));
      }
    }
    setTimeout(tick, INTERVAL_MS);
  }

  function watchRun(root) {
    if (!ACTIVE.includes(root.dataset.status)) return;
    poll(async () => {
      const run = await fetchJson(root.dataset.runUrl);
      update(root, run);
      if (ACTIVE.includes(run.status)) return true;
      // Finished: reload once for the final curves, metrics, error and traceback.
      window.location.reload();
      return false;
    });
  }

  function watchTable(table) {
    const rows = () => Array.from(table.querySelectorAll("tr[data-run-id]"));
    const anyActive = () => rows().some((row) => ACTIVE.includes(row.dataset.status));
    if (!anyActive()) return;
    poll(async () => {
      const runs = await fetchJson(table.dataset.runsUrl);
      const byId = new Map(runs.map((run) => [String(run.id), run]));
      rows().forEach((row) => {
        const run = byId.get(row.dataset.runId);
        if (run) update(row, run);
      });
      return anyActive();
    });
  }

  document.querySelectorAll("[data-run-url]").forEach(watchRun);
  document.querySelectorAll("[data-runs-url]").forEach(watchTable);
})();
