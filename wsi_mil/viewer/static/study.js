// The study page: one row per slide. Every value from the study is set with textContent (never as HTML).
"use strict";
const state = { slides: [], key: "slide_id", dir: 1, filter: "" };

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

function sortValue(s, key) {
  if (key === "status") return statusText(s);
  const v = s[key];
  return v == null ? "" : v;
}

function render() {
  const body = document.querySelector("#slides tbody");
  body.replaceChildren();
  const f = state.filter.toLowerCase();
  const rows = state.slides
    .filter(s => !f || [s.slide_id, s.label, s.prediction, statusText(s), s.reasons.join(" ")]
      .some(v => v && String(v).toLowerCase().includes(f)))
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
    cell(tr, s.label);
    cell(tr, s.prediction);
    cell(tr, s.probability == null ? "" : s.probability.toFixed(3));
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
  document.getElementById("study-name").textContent = study.out;
  document.getElementById("run").textContent = `run: ${study.run}`;
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
