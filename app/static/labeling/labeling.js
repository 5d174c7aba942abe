/* Shared by the labeling pages: the JSON API client, draft autosave, the active-time clock and the skip form.
 *
 * The pages render prompts and outputs server-side (escaped); these scripts only ever write
 * untrusted text with textContent, never as HTML. Every write goes to /api/v1 with the session's
 * CSRF token in the X-CSRF-Token header.
 */
(function () {
  "use strict";

  const root = document.getElementById("labeling-root");
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const csrf = root.dataset.csrf;
  const assignmentUrl = "/api/v1/assignments/" + data.assignment_id;
  const IDLE_MS = 60 * 1000; // no input for this long and the clock stops: the labeler stepped away
  const HEARTBEAT_MS = 5 * 60 * 1000; // a save this often keeps the lease alive while someone reads

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function detailText(payload, fallback) {
    if (payload && typeof payload.detail === "string") return payload.detail;
    if (payload && Array.isArray(payload.detail)) {
      return payload.detail.map((e) => (e.loc || []).join(".") + ": " + e.msg).join("; ");
    }
    return fallback;
  }

  /** Calls the labeler API; resolves with the JSON body, rejects with an ApiError carrying the server's message. */
  async function api(method, path, body, options) {
    const init = {
      method: method,
      credentials: "same-origin",
      headers: { "Accept": "application/json", "X-CSRF-Token": csrf },
      keepalive: Boolean(options && options.keepalive),
    };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, "the server could not be reached; check your connection");
    }
    let payload = null;
    try {
      payload = await response.json();
    } catch (err) {
      payload = null;
    }
    if (!response.ok) throw new ApiError(response.status, detailText(payload, response.statusText));
    return payload;
  }

  /** Counts seconds while the tab is visible and the labeler did something in the last minute. */
  class ActiveClock {
    constructor(initialSeconds, display) {
      this.seconds = Math.max(0, Number(initialSeconds) || 0);
      this.display = display;
      this.lastInput = Date.now();
      const touch = () => { this.lastInput = Date.now(); };
      ["keydown", "mousedown", "mousemove", "wheel", "scroll", "input", "touchstart", "dragover", "focusin"]
        .forEach((name) => document.addEventListener(name, touch, { passive: true, capture: true }));
      document.addEventListener("visibilitychange", () => { if (!document.hidden) touch(); });
      this.timer = setInterval(() => this.tick(), 1000);
      this.render();
    }
    get isActive() {
      return document.visibilityState === "visible" && Date.now() - this.lastInput < IDLE_MS;
    }
    tick() {
      if (this.isActive) this.seconds += 1;
      this.render();
    }
    stop() {
      clearInterval(this.timer);
    }
    render() {
      root.dataset.activeSeconds = String(Math.floor(this.seconds));
      if (!this.display) return;
      const s = Math.floor(this.seconds);
      this.display.textContent = "Active " + Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
    }
  }

  /** Saves the page's draft to the server a moment after each change, on demand, and before the page goes away. */
  class Autosave {
    constructor(collect, statusEl, clock, delayMs) {
      this.collect = collect;
      this.statusEl = statusEl;
      this.clock = clock;
      this.delayMs = delayMs || 2000;
      this.dirty = false;
      this.stopped = false;
      this.timer = null;
      this.chain = Promise.resolve();
      this.lastSaveAt = Date.now();
      window.addEventListener("pagehide", () => this.saveOnExit());
      document.addEventListener("visibilitychange", () => { if (document.hidden) this.flush(); });
      this.startHeartbeat();
    }
    startHeartbeat() {
      this.heartbeat = setInterval(() => {
        if (this.clock.isActive && Date.now() - this.lastSaveAt >= HEARTBEAT_MS) {
          this.dirty = true;
          this.flush();
        }
      }, 30 * 1000);
    }
    setStatus(text, state) {
      this.statusEl.textContent = text;
      this.statusEl.dataset.state = state;
    }
    changed() {
      if (this.stopped) return;
      this.dirty = true;
      this.setStatus("Unsaved changes", "dirty");
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.flush(), this.delayMs);
    }
    body() {
      return { draft: this.collect(), active_seconds: Math.floor(this.clock.seconds) };
    }
    /** Saves now if anything changed; saves run one after another, never overlapping. */
    flush() {
      clearTimeout(this.timer);
      if (!this.dirty || this.stopped) return this.chain;
      this.dirty = false;
      const body = this.body();
      this.chain = this.chain.then(async () => {
        if (this.stopped) return;
        this.setStatus("Saving…", "saving");
        try {
          await api("PUT", assignmentUrl + "/draft", body);
          this.lastSaveAt = Date.now();
          if (!this.dirty) this.setStatus("Saved", "saved");
        } catch (err) {
          this.setStatus("Not saved: " + err.message, "error");
          if (err.status === 409 || err.status === 404) {
            this.stopped = true; // the task is gone (submitted elsewhere, or taken): saving again cannot help
          } else {
            this.dirty = true;
            this.timer = setTimeout(() => this.flush(), 10000);
          }
        }
      });
      return this.chain;
    }
    /** Stops saving (before a submit or skip) once the save in flight has finished. */
    stop() {
      clearTimeout(this.timer);
      clearInterval(this.heartbeat);
      this.stopped = true;
      return this.chain;
    }
    /** Saves again after a submit that the server refused (the labeler is still on the page). */
    resume() {
      this.stopped = false;
      clearInterval(this.heartbeat);
      this.startHeartbeat();
      this.changed();
    }
    saveOnExit() {
      if (!this.dirty || this.stopped) return;
      this.dirty = false;
      // keepalive lets the request outlive the page; a plain fetch would be cancelled on unload.
      api("PUT", assignmentUrl + "/draft", this.body(), { keepalive: true }).catch(() => {});
    }
  }

  /** Shows a message in a form's alert area; `next` adds a link to the next task. */
  function showMessage(el, text, next) {
    el.textContent = text;
    if (next) {
      const link = document.createElement("a");
      link.href = data.next_url;
      link.textContent = "Take the next task";
      el.append(" ", link);
    }
    el.hidden = false;
  }

  function hideMessage(el) {
    el.hidden = true;
    el.textContent = "";
  }

  /** Wires the skip form: a reason from the list, a note, then on to the next task. */
  function setupSkip(autosave) {
    const form = document.getElementById("skip-form");
    const message = document.getElementById("skip-message");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const reason = form.elements.reason.value;
      const note = form.elements.note.value.trim();
      if (reason === "other" && !note) {
        showMessage(message, "Please say in the note why you skip this task.");
        form.elements.note.focus();
        return;
      }
      hideMessage(message);
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      await autosave.stop();
      try {
        await api("POST", assignmentUrl + "/skip", { reason: reason, note: note });
        window.location.assign(data.next_url);
      } catch (err) {
        showMessage(message, "Could not skip: " + err.message, err.status === 409);
        button.disabled = false;
        if (err.status !== 409) autosave.resume();
      }
    });
  }

  /** Calls `submit` on Ctrl+Enter (or Cmd+Enter) anywhere on the page. */
  function onSubmitShortcut(submit) {
    document.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        submit();
      }
    });
  }

  // On a phone the guidelines sit above the task: folded, so the prompt is on the first screen.
  const guidelines = document.querySelector("details.guidelines");
  if (guidelines && window.matchMedia("(max-width: 900px)").matches) guidelines.open = false;

  // The "submitted" confirmation is shown once: a reload of this page should not say it again.
  if (new URLSearchParams(window.location.search).has("submitted")) {
    window.history.replaceState(null, "", window.location.pathname);
  }

  window.Labeling = {
    data: data,
    root: root,
    assignmentUrl: assignmentUrl,
    api: api,
    ApiError: ApiError,
    ActiveClock: ActiveClock,
    Autosave: Autosave,
    showMessage: showMessage,
    hideMessage: hideMessage,
    setupSkip: setupSkip,
    onSubmitShortcut: onSubmitShortcut,
  };
})();
