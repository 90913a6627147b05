// The review page of `vsi review` (vision_si/review.py). Everything from the run is inserted as text
// (textContent, attributes), never as HTML, so an id or a class name cannot become markup.
"use strict";

const selected = new Set();
let editable = new Set();  // ids whose round can still take a review

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function imageUrl(kind, id) {
  return `/image?kind=${kind}&id=${encodeURIComponent(id)}`;
}

function setStatus(message, isError) {
  const status = document.getElementById("status");
  status.textContent = message;
  status.className = isError ? "error" : "ok";
}

function updateToolbar() {
  const n = selected.size;
  document.getElementById("reject-selected").textContent = `Reject selected (${n})`;
  for (const id of ["reject-selected", "undo-selected", "clear-selection"]) {
    document.getElementById(id).disabled = n === 0;
  }
  for (const card of document.querySelectorAll(".card")) {
    card.classList.toggle("selected", selected.has(card.dataset.id));
    const box = card.querySelector("input.select");
    if (box) box.checked = selected.has(card.dataset.id);
  }
}

function toggle(id, on) {
  if (on) selected.add(id); else selected.delete(id);
  updateToolbar();
}

async function mark(ids, verdict) {
  if (!ids.length) return;
  let response, body;
  try {
    response = await fetch("/api/reviews", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({ids, verdict}),
    });
    body = await response.json();
  } catch (err) {
    setStatus(`not saved: ${err}`, true);
    return;
  }
  if (!response.ok) {
    setStatus(`not saved (${response.status}): ${body.error}`, true);
    return;
  }
  for (const id of ids) selected.delete(id);
  await load();
  setStatus(`saved reviews.csv: ${verdict ? "rejected" : "withdrew the review of"} ${ids.length} image(s); `
            + `${body.rejects} rejected in all`, false);
}

function scoresTable(scores) {
  const rows = Object.entries(scores).map(([key, value]) =>
    el("tr", {}, el("td", {text: key}), el("td", {class: "num", text: Number(value).toFixed(3)})));
  return rows.length ? el("table", {class: "scores"}, el("tbody", {}, ...rows)) : null;
}

function card(c, canEdit) {
  const rejected = c.review === "reject";
  const exemplars = c.exemplars.slice(0, 1).map((id) =>
    el("figure", {}, el("img", {src: imageUrl("exemplar", id), alt: `exemplar ${id}`, title: id}),
       el("figcaption", {text: "exemplar"})));
  const more = c.exemplars.length > 1 ? el("span", {class: "more", text: `+${c.exemplars.length - 1} more`}) : null;
  const decision = c.decision
    ? el("span", {class: `decision-${c.decision}`,
                  text: `filter: ${c.decision}${c.reason ? ` (${c.reason})` : ""}${c.overridden ? ", by review" : ""}`})
    : el("span", {text: "filter: not run yet"});
  const controls = el("div", {class: "controls"},
    el("label", {}, el("input", {type: "checkbox", class: "select", disabled: !canEdit,
                                 onchange: (e) => toggle(c.id, e.target.checked)}), " select"),
    rejected
      ? el("button", {type: "button", class: "undo", disabled: !canEdit, onclick: () => mark([c.id], null),
                      text: "undo"})
      : el("button", {type: "button", class: "reject", disabled: !canEdit, onclick: () => mark([c.id], "reject"),
                      text: "reject"}));
  return el("figure", {class: `card${rejected ? " rejected-by-review" : ""}`, "data-id": c.id,
                       "data-review": c.review || "none", "data-decision": c.decision || "none"},
    el("div", {class: "pair"},
       el("figure", {}, el("img", {src: imageUrl("candidate", c.id), alt: `candidate ${c.id}`, title: c.id}),
          el("figcaption", {text: "candidate"})),
       ...exemplars, more),
    el("div", {class: "meta"},
       el("div", {text: c.id}),
       el("div", {text: `${c.mode}${c.strength !== null ? `, strength ${Number(c.strength).toFixed(2)}` : ""}`}),
       decision,
       rejected ? el("div", {class: "review", text: "review: reject"}) : null,
       scoresTable(c.scores)),
    controls);
}

function gateText(round) {
  if (!round.gate) return round.filtered ? "gate: not run yet" : "filter and gate: not run yet";
  const g = round.gate;
  const d = g.delta && g.delta.value !== undefined
    ? `, ${g.metric} change on val ${g.delta.value >= 0 ? "+" : ""}${Number(g.delta.value).toFixed(3)}` : "";
  return `gate: ${g.decision}${d}`;
}

function render(state) {
  document.getElementById("run").textContent = state.run;
  const main = document.getElementById("rounds");
  main.replaceChildren();
  editable = new Set();
  if (state.reviews_error) main.append(el("p", {class: "note", text: `reviews.csv cannot be read: ${state.reviews_error}`}));
  if (state.busy_pid) main.append(el("p", {class: "note", text: `process ${state.busy_pid} is working on this run: `
    + "the page is read-only until it stops"}));
  if (!state.rounds.length) main.append(el("p", {class: "note", text: "No round has generated images yet."}));
  for (const round of state.rounds) {
    const ids = round.groups.flatMap((g) => g.candidates.map((c) => c.id));
    if (round.editable) ids.forEach((id) => editable.add(id));
    const why = round.decided ? "decided by the gate: read-only"
      : round.editable ? "open: reviews apply when the run resumes" : "read-only";
    const section = el("section", {class: "round", id: `round-${round.round}`, "data-editable": round.editable},
      el("h2", {text: `Round ${String(round.round).padStart(2, "0")}`}),
      el("p", {class: "round-note", text: `${ids.length} candidates · ${gateText(round)} · ${why}`}));
    for (const group of round.groups) {
      const groupIds = group.candidates.map((c) => c.id);
      section.append(el("div", {class: "group"},
        el("h3", {}, `${group.class} · slice ${group.slice} (${group.candidates.length})`,
           el("button", {type: "button", class: "select-group", disabled: !round.editable,
                         onclick: () => { groupIds.forEach((id) => selected.add(id)); updateToolbar(); },
                         text: "select all"})),
        el("div", {class: "cards"}, ...group.candidates.map((c) => card(c, round.editable)))));
    }
    main.append(section);
  }
  for (const id of [...selected]) if (!editable.has(id)) selected.delete(id);
  updateToolbar();
  document.body.dataset.loaded = "true";
}

async function load() {
  try {
    const response = await fetch("/api/state");
    const body = await response.json();
    if (!response.ok) throw new Error(body.error);
    render(body);
  } catch (err) {
    setStatus(`cannot read the run: ${err.message || err}`, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("reject-selected").addEventListener("click", () => mark([...selected], "reject"));
  document.getElementById("undo-selected").addEventListener("click", () => mark([...selected], null));
  document.getElementById("clear-selection").addEventListener("click", () => { selected.clear(); updateToolbar(); });
  load();
});
