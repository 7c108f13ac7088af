// The study page: one row per slide. Every value from the study is set with textContent (never as HTML).
"use strict";
const state = { slides: [], columns: [], key: "slide_id", dir: 1, filter: "" };

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function statusText(s) {
  return Object.entries(s.status).map(([stage, st]) => `${stage}: ${st}`).join(", ");
}

function value(s, key) {  // the task's columns (risk, time, pred, prob_<target>...) or the slide's own fields
  return s.values && key in s.values ? s.values[key] : s[key];
}

function shown(v) {
  if (typeof v !== "number") return v;
  return Number.isInteger(v) ? String(v) : v.toFixed(3);
}

function sortValue(s, key) {
  if (key === "status") return statusText(s);
  const v = value(s, key);
  return v == null ? "" : v;
}

function header() {  // thumbnail, slide, the task's columns, patches, status
  const tr = document.querySelector("#slides thead tr");
  const fixed = [["thumb", "thumbnail"], ["slide_id", "slide"]];
  const cols = [...fixed, ...state.columns.map(c => [c, c]), ["n_patches", "patches"], ["status", "status"]];
  tr.replaceChildren();
  for (const [key, title] of cols) {
    const th = document.createElement("th");
    th.dataset.key = key;
    th.textContent = title;
    if (key === "thumb") th.dataset.nosort = "";
    tr.appendChild(th);
  }
}

function render() {
  const body = document.querySelector("#slides tbody");
  body.replaceChildren();
  const f = state.filter.toLowerCase();
  const rows = state.slides
    .filter(s => !f || [s.slide_id, ...state.columns.map(c => value(s, c)), statusText(s), s.reasons.join(" ")]
      .some(v => v != null && String(v).toLowerCase().includes(f)))
    .sort((a, b) => {
      const x = sortValue(a, state.key), y = sortValue(b, state.key);
      return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))) * state.dir;
    });
  for (const s of rows) {
    const tr = document.createElement("tr");
    tr.dataset.slide = s.slide_id;
    const td = cell(tr, "");
    if (s.viewable) {
      const img = document.createElement("img");
      img.loading = "lazy";
      img.alt = "";
      img.src = `/thumbs/${encodeURIComponent(s.slide_id)}.jpeg`;
      td.appendChild(img);
    }
    const name = cell(tr, "");
    if (s.viewable) {
      const a = document.createElement("a");
      a.href = `/slides/${encodeURIComponent(s.slide_id)}`;
      a.textContent = s.slide_id;
      name.appendChild(a);
    } else {
      name.textContent = s.slide_id;
      name.title = "slide file not found: pass --slides";
    }
    for (const c of state.columns) cell(tr, shown(value(s, c)));
    cell(tr, s.n_patches);
    const st = cell(tr, statusText(s), s.reasons.length ? "failed" : "");
    for (const r of s.reasons) {
      const div = document.createElement("div");
      div.className = "reason";
      div.textContent = r;
      st.appendChild(div);
    }
    body.appendChild(tr);
  }
  document.getElementById("count").textContent = `${rows.length} of ${state.slides.length} slides`;
  for (const th of document.querySelectorAll("th")) {
    th.setAttribute("aria-sort", th.dataset.key === state.key ? (state.dir > 0 ? "ascending" : "descending") : "none");
  }
}

async function main() {
  const res = await fetch("/api/study");
  const study = await res.json();
  state.slides = study.slides;
  state.columns = study.columns;
  header();
  document.getElementById("study-name").textContent = study.out;
  document.getElementById("run").textContent = `run: ${study.run} (${study.task})`;
  document.title = `wsi-mil: ${study.out}`;
  for (const th of document.querySelectorAll("th")) {
    if (th.hasAttribute("data-nosort")) continue;
    th.addEventListener("click", () => {
      state.dir = state.key === th.dataset.key ? -state.dir : 1;
      state.key = th.dataset.key;
      render();
    });
  }
  document.getElementById("filter").addEventListener("input", e => { state.filter = e.target.value; render(); });
  render();
  document.body.dataset.ready = "1";
}

main();
