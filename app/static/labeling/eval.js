/* The blind comparison page: pick the better of two responses (or a tie), by mouse or by keys 1, 2, 3. */
(function () {
  "use strict";

  const L = window.Labeling;
  const form = document.getElementById("eval-form");
  const message = document.getElementById("form-message");
  const button = form.querySelector("button[type=submit]");
  const choices = Array.from(form.querySelectorAll("input[name=choice]"));
  const clock = new L.ActiveClock(L.data.active_seconds, null);
  const autosave = new L.Autosave(() => ({ choice: selected() }), document.getElementById("save-status"), clock);
  let submitting = false;

  function selected() {
    const checked = choices.find((input) => input.checked);
    return checked ? checked.value : null;
  }

  function select(value) {
    const input = choices.find((candidate) => candidate.value === value);
    if (!input) return;
    input.checked = true;
    input.focus();
    autosave.changed();
  }

  // Keys follow the layout: 1 = the left response, 2 = tie, 3 = the right response.
  const byKey = { "1": choices[0] && choices[0].value, "2": "tie", "3": choices[1] && choices[1].value };

  async function submit() {
    if (submitting) return;
    const value = selected();
    if (value === null) {
      L.showMessage(message, "Choose the better response, or Tie, before submitting.");
      return;
    }
    L.hideMessage(message);
    submitting = true;
    button.disabled = true;
    await autosave.stop();
    try {
      const choice = value === "tie" ? "tie" : Number(value);
      await L.api("POST", L.assignmentUrl + "/submit", { choice: choice, active_seconds: Math.floor(clock.seconds) });
      clock.stop();
      window.location.assign(L.data.submitted_url || L.data.next_url);
    } catch (err) {
      L.showMessage(message, "Not submitted: " + err.message, err.status === 409);
      submitting = false;
      button.disabled = false;
      if (err.status !== 409) autosave.resume();
    }
  }

  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target && (target.tagName === "TEXTAREA" || target.tagName === "SELECT" || target.type === "text")) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (byKey[event.key]) {
      event.preventDefault();
      select(byKey[event.key]);
    }
  });
  choices.forEach((input) => input.addEventListener("change", () => autosave.changed()));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  L.onSubmitShortcut(submit);
  L.setupSkip(autosave);
  if (L.data.draft && L.data.draft.choice) {
    const restored = choices.find((input) => input.value === String(L.data.draft.choice));
    if (restored) restored.checked = true;
  }
})();
