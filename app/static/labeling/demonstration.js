/* The demonstration page: write the ideal response to a prompt, autosaved as a draft, submitted with Ctrl+Enter. */
(function () {
  "use strict";

  const L = window.Labeling;
  const form = document.getElementById("demonstration-form");
  const text = document.getElementById("demonstration-text");
  const count = document.getElementById("char-count");
  const message = document.getElementById("form-message");
  const button = form.querySelector("button[type=submit]");
  const clock = new L.ActiveClock(L.data.active_seconds, null);
  const autosave = new L.Autosave(() => ({ text: text.value }), document.getElementById("save-status"), clock);
  let submitting = false;

  // The server renders the draft into the textarea; the JSON copy covers a page served from an older cache.
  if (!text.value && L.data.draft && typeof L.data.draft.text === "string") text.value = L.data.draft.text;

  function renderCount() {
    const n = text.value.length;
    count.textContent = n.toLocaleString() + " / " + L.data.max_chars.toLocaleString() + " characters";
    count.classList.toggle("near-limit", n > L.data.max_chars * 0.9);
  }

  async function submit() {
    if (submitting) return;
    if (!text.value.trim()) {
      L.showMessage(message, "Write a response before submitting.");
      text.focus();
      return;
    }
    L.hideMessage(message);
    submitting = true;
    button.disabled = true;
    await autosave.stop();
    try {
      await L.api("POST", L.assignmentUrl + "/submit", { text: text.value, active_seconds: Math.floor(clock.seconds) });
      clock.stop();
      window.location.assign(L.data.submitted_url || L.data.next_url);
    } catch (err) {
      L.showMessage(message, "Not submitted: " + err.message, err.status === 409);
      submitting = false;
      button.disabled = false;
      if (err.status !== 409) autosave.resume();
    }
  }

  text.addEventListener("input", () => {
    renderCount();
    autosave.changed();
  });
  text.addEventListener("blur", () => autosave.flush());
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  L.onSubmitShortcut(submit);
  L.setupSkip(autosave);
  renderCount();
  if (L.data.draft && L.data.draft.text) autosave.setStatus("Draft restored", "saved");
  text.focus();
})();
