/* The ranking page (InstructGPT's interface): rate each of K outputs 1-7, tick flags, then drag each output
 * into a rank slot, best to worst; several outputs in one slot are a tie. The keyboard path takes 2K + 1 keys
 * from page load: focus starts on output A; on a focused output a digit 1-K puts it in that slot, after which
 * the card's pending field is its Likert score (shown on the card), the next digit 1-7 sets it and focus moves
 * to the next output; after the last one Enter submits. On a touch screen: tap an output's chip, then a slot.
 * The whole state is autosaved as the assignment's draft and restored on reload.
 */
(function () {
  "use strict";

  const L = window.Labeling;
  const ids = L.data.completion_ids.map(Number);
  const K = ids.length;
  const outputCards = Array.from(document.querySelectorAll(".output-card"));
  const rankCards = Array.from(document.querySelectorAll(".rank-card"));
  const zones = Array.from(document.querySelectorAll(".dropzone"));
  const unacceptable = document.getElementById("all-unacceptable");
  const message = document.getElementById("form-message");
  const announceEl = document.getElementById("announce");
  const button = document.getElementById("submit-ranking");
  const slotOf = new Map(ids.map((id) => [id, 0])); // 0 = not ranked yet
  const letterOf = new Map(outputCards.map((card) => [Number(card.dataset.completionId), card.dataset.letter]));
  const cardOf = new Map(outputCards.map((card) => [Number(card.dataset.completionId), card]));
  const chipOf = new Map(rankCards.map((chip) => [Number(chip.dataset.completionId), chip]));
  const clock = new L.ActiveClock(L.data.active_seconds, document.getElementById("active-time"));
  const autosave = new L.Autosave(collect, document.getElementById("save-status"), clock);
  const shortcuts = document.getElementById("shortcuts");
  const keyMode = new Map(ids.map((id) => [id, "rank"])); // which field the next digit on a card sets
  let selectedChip = null; // the chip tapped last, waiting for a tap on a slot
  let submitting = false;

  function zoneFor(slot) {
    return zones.find((zone) => Number(zone.dataset.slot) === slot);
  }

  function likertOf(id) {
    const checked = document.querySelector('input[name="likert-' + id + '"]:checked');
    return checked ? Number(checked.value) : null;
  }

  function flagsOf(id) {
    return Array.from(document.querySelectorAll('input[name="flag-' + id + '"]:checked')).map((box) => box.value);
  }

  function announce(text) {
    announceEl.textContent = text;
  }

  /** Puts an output in a slot (0 = back to the pool), keeping each slot's outputs in display order. */
  function place(id, slot, options) {
    if (!slotOf.has(id) || slot < 0 || slot > K) return;
    const chip = chipOf.get(id);
    const hadFocus = document.activeElement === chip;
    slotOf.set(id, slot);
    const holder = zoneFor(slot).querySelector(".chips");
    const after = ids.slice(ids.indexOf(id) + 1).map((other) => chipOf.get(other)).find((c) => c.parentNode === holder);
    holder.insertBefore(chip, after || null);
    if (hadFocus) chip.focus(); // moving a node drops its focus; the keyboard user keeps their place
    renderPlacement(id);
    if (!(options && options.quiet)) {
      refreshProblems();
      announce("Output " + letterOf.get(id) + (slot ? " is in slot " + slot : " is not ranked"));
      autosave.changed();
    }
  }

  function renderPlacement(id) {
    const slot = slotOf.get(id);
    const label = cardOf.get(id).querySelector(".placed");
    label.textContent = slot ? "slot " + slot + (slot === 1 ? " (best)" : slot === K ? " (worst)" : "") : "not ranked";
    label.classList.toggle("is-placed", slot > 0);
    clearMissing(id);
    zones.forEach((zone) => zone.classList.toggle("filled", zone.querySelector(".rank-card") !== null));
  }

  /** Drops an output's "missing" mark once it has both a score and a slot. */
  function clearMissing(id) {
    if (likertOf(id) && slotOf.get(id)) cardOf.get(id).classList.remove("missing");
  }

  /** Says on the card which field its next digit sets, so a score never lands the output in a slot. */
  function setKeyMode(id, mode) {
    keyMode.set(id, mode);
    const card = cardOf.get(id);
    card.dataset.keyMode = mode;
    card.querySelector(".key-mode").textContent = mode === "likert" ? "Next key: score 1–7" : "Next key: rank 1–" + K;
  }

  function isComplete(id) {
    return Boolean(likertOf(id) && slotOf.get(id));
  }

  /** Sets an output's Likert score from the keyboard, as a click on the radio would. */
  function setLikert(id, score) {
    const radio = document.querySelector('input[name="likert-' + id + '"][value="' + score + '"]');
    radio.checked = true;
    clearMissing(id);
    refreshProblems();
    autosave.changed();
    announce("Output " + letterOf.get(id) + " scored " + score);
  }

  /** After an output's score: on to the next output, or to Submit once every output is done. */
  function advance(id) {
    const index = outputCards.indexOf(cardOf.get(id));
    if (index < outputCards.length - 1) {
      outputCards[index + 1].focus();
    } else if (ids.every(isComplete)) {
      button.focus();
    } else {
      cardOf.get(ids.find((other) => !isComplete(other))).focus();
    }
  }

  function renderFlagCount(id) {
    const n = flagsOf(id).length;
    cardOf.get(id).querySelector(".flag-count").textContent = n ? "(" + n + ")" : "";
  }

  function collect() {
    const draft = { slots: {}, likert: {}, flags: {}, all_unacceptable: unacceptable.checked };
    ids.forEach((id) => {
      if (slotOf.get(id)) draft.slots[id] = slotOf.get(id);
      if (likertOf(id)) draft.likert[id] = likertOf(id);
      if (flagsOf(id).length) draft.flags[id] = flagsOf(id);
    });
    return draft;
  }

  function restore(draft) {
    if (!draft || typeof draft !== "object") return false;
    let restored = false;
    ids.forEach((id) => {
      const slot = Number((draft.slots || {})[id]);
      if (slot >= 1 && slot <= K) {
        place(id, slot, { quiet: true });
        restored = true;
      }
      const likert = Number((draft.likert || {})[id]);
      const radio = document.querySelector('input[name="likert-' + id + '"][value="' + likert + '"]');
      if (radio) {
        radio.checked = true;
        restored = true;
      }
      const flags = (draft.flags || {})[id] || [];
      document.querySelectorAll('input[name="flag-' + id + '"]').forEach((box) => {
        box.checked = flags.indexOf(box.value) >= 0;
      });
      renderFlagCount(id);
    });
    unacceptable.checked = Boolean(draft.all_unacceptable);
    return restored || unacceptable.checked;
  }

  /** What is still missing before the ranking can be submitted, one line per problem. */
  function missing() {
    const problems = [];
    ids.forEach((id) => {
      const needs = [];
      if (!likertOf(id)) needs.push("a Likert score");
      if (!slotOf.get(id)) needs.push("a rank slot");
      cardOf.get(id).classList.toggle("missing", needs.length > 0);
      if (needs.length) problems.push("Output " + letterOf.get(id) + " needs " + needs.join(" and ") + ".");
    });
    return problems;
  }

  /** Keeps a shown "Not ready" list in step with the page as the labeler fixes things. */
  function refreshProblems() {
    if (message.hidden || !message.dataset.problems) return;
    const problems = missing();
    if (problems.length) showProblems(problems);
    else L.hideMessage(message);
  }

  function showProblems(problems) {
    message.textContent = "";
    const intro = document.createElement("p");
    intro.textContent = "Not ready to submit yet:";
    const list = document.createElement("ul");
    problems.forEach((text) => {
      const item = document.createElement("li");
      item.textContent = text;
      list.append(item);
    });
    message.append(intro, list);
    message.dataset.problems = "1";
    message.hidden = false;
  }

  async function submit() {
    if (submitting) return;
    const problems = missing();
    if (problems.length) {
      showProblems(problems);
      return;
    }
    L.hideMessage(message);
    delete message.dataset.problems;
    submitting = true;
    button.disabled = true;
    await autosave.stop();
    const body = {
      items: ids.map((id) => ({ completion_id: id, rank: slotOf.get(id), likert: likertOf(id), flags: flagsOf(id) })),
      all_unacceptable: unacceptable.checked,
      active_seconds: Math.floor(clock.seconds),
    };
    try {
      await L.api("POST", L.assignmentUrl + "/submit", body);
      clock.stop();
      window.location.assign(L.data.submitted_url || L.data.next_url);
    } catch (err) {
      L.showMessage(message, "Not submitted: " + err.message, err.status === 409);
      submitting = false;
      button.disabled = false;
      if (err.status !== 409) autosave.resume();
    }
  }

  /** Keys on a focused output or rank card: digits set its slot (then, on an output, its score), arrows move. */
  function onCardKey(event, group) {
    if (event.target !== event.currentTarget || event.ctrlKey || event.metaKey || event.altKey) return;
    const id = Number(event.currentTarget.dataset.completionId);
    const key = event.key;
    const scoring = group === "output" && keyMode.get(id) === "likert";
    if (/^[0-9]$/.test(key) && scoring) {
      event.preventDefault();
      const score = Number(key);
      if (score < 1 || score > 7) {
        announce("Scores go from 1 to 7; press Escape to set the rank slot instead.");
        return;
      }
      setLikert(id, score);
      setKeyMode(id, "rank");
      advance(id);
    } else if (/^[0-9]$/.test(key)) {
      event.preventDefault();
      const slot = Number(key);
      if (slot > K) {
        announce("There are only " + K + " slots.");
        return;
      }
      place(id, slot);
      if (group === "output" && slot > 0) setKeyMode(id, "likert");
    } else if (group === "output" && (key === "s" || key === "l")) {
      event.preventDefault();
      setKeyMode(id, "likert");
    } else if (group === "output" && (key === "r" || key === "Escape")) {
      if (key === "Escape" && !scoring) return;
      event.preventDefault();
      setKeyMode(id, "rank");
    } else if (key === "Enter" && group === "output") {
      event.preventDefault();
      submit();
    } else if (key === "Backspace" || key === "Delete") {
      event.preventDefault();
      place(id, 0);
    } else if (["ArrowDown", "ArrowRight", "ArrowUp", "ArrowLeft"].indexOf(key) >= 0) {
      event.preventDefault();
      const step = key === "ArrowDown" || key === "ArrowRight" ? 1 : -1;
      const ordered = group === "rank" ? ids.map((other) => chipOf.get(other)) : outputCards;
      const index = ordered.indexOf(event.currentTarget);
      ordered[(index + step + ordered.length) % ordered.length].focus();
    }
  }

  /** Tapping: a tap on a chip picks it up, a tap on a slot (or on a chip already there) puts it down. */
  function select(chip) {
    if (selectedChip) selectedChip.classList.remove("selected");
    if (selectedChip) selectedChip.setAttribute("aria-pressed", "false");
    selectedChip = chip;
    if (chip) {
      chip.classList.add("selected");
      chip.setAttribute("aria-pressed", "true");
      announce("Output " + chip.dataset.letter + " picked up: tap a slot to put it there.");
    }
    document.querySelector(".ranking-board").classList.toggle("placing", Boolean(chip));
  }

  function onBoardTap(event) {
    const chip = event.target.closest(".rank-card");
    const zone = event.target.closest(".dropzone");
    if (chip && (!selectedChip || chip === selectedChip || Number(zone.dataset.slot) === 0)) {
      select(chip === selectedChip ? null : chip);
      return;
    }
    if (selectedChip && zone) {
      const id = Number(selectedChip.dataset.completionId);
      select(null);
      place(id, Number(zone.dataset.slot));
    }
  }

  outputCards.forEach((card) => {
    const id = Number(card.dataset.completionId);
    card.addEventListener("keydown", (event) => onCardKey(event, "output"));
    // Arriving on a card that has a slot but no score, the score is what is pending.
    card.addEventListener("focus", () => setKeyMode(id, slotOf.get(id) && !likertOf(id) ? "likert" : "rank"));
    card.querySelectorAll('input[type="radio"]').forEach((radio) => radio.addEventListener("change", () => {
      clearMissing(id);
      refreshProblems();
      autosave.changed();
    }));
    card.querySelectorAll('input[type="checkbox"]').forEach((box) => box.addEventListener("change", () => {
      renderFlagCount(id);
      autosave.changed();
    }));
  });

  rankCards.forEach((chip) => {
    chip.addEventListener("keydown", (event) => onCardKey(event, "rank"));
    chip.addEventListener("dragstart", (event) => {
      select(null);
      event.dataTransfer.setData("text/plain", chip.dataset.completionId);
      event.dataTransfer.effectAllowed = "move";
      chip.classList.add("dragging");
    });
    chip.addEventListener("dragend", () => chip.classList.remove("dragging"));
  });

  zones.forEach((zone) => {
    zone.addEventListener("dragover", (event) => {
      event.preventDefault(); // without this the browser refuses the drop
      event.dataTransfer.dropEffect = "move";
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", (event) => {
      if (!zone.contains(event.relatedTarget)) zone.classList.remove("over");
    });
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      const id = Number(event.dataTransfer.getData("text/plain"));
      if (slotOf.has(id)) place(id, Number(zone.dataset.slot));
    });
  });

  document.querySelector(".ranking-board").addEventListener("click", onBoardTap);

  /** `?` anywhere outside a text field opens the list of shortcuts; Escape closes it. */
  document.addEventListener("keydown", (event) => {
    const typing = event.target.closest && event.target.closest("input[type=text], textarea, select");
    if (event.key === "?" && !typing && !shortcuts.open) {
      event.preventDefault();
      shortcuts.showModal();
    }
  });
  document.getElementById("show-shortcuts").addEventListener("click", () => shortcuts.showModal());
  document.getElementById("close-shortcuts").addEventListener("click", () => shortcuts.close());

  unacceptable.addEventListener("change", () => autosave.changed());
  button.addEventListener("click", submit);
  L.onSubmitShortcut(submit);
  L.setupSkip(autosave);
  ids.forEach(renderPlacement);
  if (restore(L.data.draft)) autosave.setStatus("Draft restored", "saved");
  ids.forEach((id) => setKeyMode(id, "rank"));
  // Focus starts on the first output, so the first key ranks it; the page stays scrolled to the prompt.
  outputCards[0].focus({ preventScroll: true });
})();
