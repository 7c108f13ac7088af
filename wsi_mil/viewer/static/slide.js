// The slide page: OpenSeadragon with three layers (slide, heatmap, tissue contour), all Deep Zoom tiles
// served by the viewer. Values from the study are set with textContent only.
"use strict";

const slideId = decodeURIComponent(location.pathname.split("/").pop());
const enc = encodeURIComponent(slideId);
const $ = id => document.getElementById(id);
const wsi = { ready: false };
window.wsi = wsi;

function tileSource(meta, url) {
  return {
    width: meta.width, height: meta.height, tileSize: meta.tile_size, tileOverlap: 0,
    minLevel: 0, maxLevel: meta.levels - 1, getTileUrl: (level, x, y) => url(level, x, y),
  };
}

function overlayUrl(level, x, y) {
  return `/tiles/${enc}/overlay/${encodeURIComponent($("map").value)}/${$("cmap").value}/${level}/${x}_${y}.png`;
}

function addLayer(source, opacity, index) {
  return new Promise(resolve => wsi.viewer.addTiledImage({
    tileSource: source, opacity, index, success: e => resolve(e.item),
  }));
}

async function setOverlay() {
  if (!wsi.meta.maps.length) return;
  const old = wsi.overlay;
  wsi.overlay = await addLayer(tileSource(wsi.meta, overlayUrl), $("overlay").checked ? +$("opacity").value : 0, 1);
  if (old) wsi.viewer.world.removeItem(old);
  drawColorbar();
  drawGalleries();
}

function setOpacity() {
  if (wsi.overlay) wsi.overlay.setOpacity($("overlay").checked ? +$("opacity").value : 0);
}

function drawColorbar() {
  const stops = wsi.colormaps[$("cmap").value];
  $("colorbar-ramp").style.background = `linear-gradient(to top, ${stops.join(", ")})`;
}

function niceLength(um) {  // the largest 1/2/5 x 10^k not above um
  const p = Math.pow(10, Math.floor(Math.log10(um)));
  return [5, 2, 1].map(m => m * p).find(v => v <= um) || p;
}

function drawScalebar() {
  const item = wsi.viewer.world.getItemAt(0);
  $("scalebar").hidden = !wsi.meta.mpp;  // no known µm/px: no scale bar rather than a wrong one
  if (!item || !wsi.meta.mpp) return;
  const screenPerImage = item.viewportToImageZoom(wsi.viewer.viewport.getZoom(true));
  const umPerScreenPx = wsi.meta.mpp / screenPerImage;
  const um = niceLength(umPerScreenPx * 150);
  $("scalebar-bar").style.width = `${um / umPerScreenPx}px`;
  $("scalebar-text").textContent = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
}

function patchAt(x, y) {  // the patch whose box holds (x, y), looked up in a grid of patch-sized buckets
  const p = wsi.patches;
  if (!p) return -1;
  const s = p.size, bx = Math.floor(x / s), by = Math.floor(y / s);
  for (let dx = -1; dx <= 1; dx++) for (let dy = -1; dy <= 1; dy++) {
    for (const i of p.buckets.get(`${bx + dx},${by + dy}`) || []) {
      if (x >= p.x[i] && x < p.x[i] + s && y >= p.y[i] && y < p.y[i] + s) return i;
    }
  }
  return -1;
}

function onHover(event) {
  const box = $("hover");
  const item = wsi.viewer.world.getItemAt(0);
  const img = item.viewportToImageCoordinates(wsi.viewer.viewport.pointFromPixel(event.position));
  const i = patchAt(img.x, img.y);
  if (i < 0) { box.style.display = "none"; return; }
  const m = $("map").value;
  const probs = Object.entries(wsi.meta.probabilities).map(([c, v]) => `  p(${c}) = ${v.toFixed(3)}`).join("\n");
  const bag = wsi.meta.task === "classification" ? `slide probabilities:\n${probs}` : `prediction: ${wsi.meta.headline}`;
  box.textContent = `patch ${i}  (${wsi.patches.x[i]}, ${wsi.patches.y[i]})\n` +
    `attention ${wsi.patches.logit[m][i].toFixed(3)}\npercentile ${wsi.patches.percentile[m][i].toFixed(1)}\n` + bag;
  box.style.left = `${event.position.x + 14}px`;
  box.style.top = `${event.position.y + 14}px`;
  box.style.display = "block";
}

function flyTo(i) {
  const p = wsi.patches, s = p.size, item = wsi.viewer.world.getItemAt(0);
  wsi.viewer.viewport.fitBounds(item.imageToViewportRectangle(p.x[i] - s, p.y[i] - s, 3 * s, 3 * s));
  if (wsi.outline) wsi.viewer.removeOverlay(wsi.outline);
  const el = document.createElement("div");
  el.className = "patch-outline";
  el.dataset.patch = String(i);
  wsi.outline = el;
  wsi.viewer.addOverlay({ element: el, location: item.imageToViewportRectangle(p.x[i], p.y[i], s, s) });
  wsi.flownTo = i;
}

function drawGalleries() {
  if (!wsi.patches) return;
  const pct = wsi.patches.percentile[$("map").value];
  const order = [...pct.keys()].sort((a, b) => pct[b] - pct[a] || a - b);
  const k = Math.min(wsi.meta.top_k, Math.floor(order.length / 2) || order.length);
  wsi.top = order.slice(0, k);
  wsi.bottom = order.slice(order.length - k).reverse();
  for (const [id, list] of [["gallery-top", wsi.top], ["gallery-bottom", wsi.bottom]]) {
    const g = $(id);
    g.replaceChildren();
    for (const i of list) {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.patch = String(i);
      b.title = `percentile ${pct[i].toFixed(1)}`;
      const img = document.createElement("img");
      img.alt = `patch ${i}`;
      img.src = `/patches/${enc}/${i}.jpeg`;
      b.appendChild(img);
      b.addEventListener("click", () => {
        document.querySelectorAll(".gallery button").forEach(x => x.classList.remove("active"));
        b.classList.add("active");
        flyTo(i);
      });
      g.appendChild(b);
    }
  }
}

async function main() {
  const res = await fetch(`/api/slides/${enc}`);
  if (!res.ok) { $("title").textContent = `${slideId}: ${(await res.json()).error}`; return; }
  const meta = wsi.meta = await res.json();
  wsi.colormaps = await (await fetch("/api/colormaps")).json();
  document.title = `wsi-mil: ${meta.slide_id}`;
  $("title").textContent = meta.slide_id;
  const label = meta.label == null ? "" : `label ${meta.label} · `;
  if (meta.task !== "classification") {  // survival, regression, multi-label: the task's columns
    $("prediction").textContent = Object.entries(meta.values)
      .filter(([k, v]) => !(k === "patient_id" && v === meta.slide_id))  // a patient shown only when it groups slides
      .map(([k, v]) => `${k} ${typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : v}`).join(" · ");
  } else {
    $("prediction").textContent = meta.prediction == null ? label :
      `${label}prediction ${meta.prediction} (${meta.probability.toFixed(3)})`;
  }
  for (const c of Object.keys(wsi.colormaps)) $("cmap").add(new Option(c, c));
  for (const m of meta.maps) $("map").add(new Option(m, m));
  if (meta.default_map) $("map").value = meta.default_map;
  $("map-label").hidden = meta.maps.length < 2;
  $("no-heatmap").hidden = meta.maps.length > 0;
  for (const [kind, url] of Object.entries(meta.downloads)) {
    const li = document.createElement("li"), a = document.createElement("a");
    a.href = url;
    a.textContent = kind;
    li.appendChild(a);
    $("downloads").appendChild(li);
  }
  if (meta.maps.length) {
    const p = await (await fetch(`/api/slides/${enc}/patches`)).json();
    p.buckets = new Map();
    p.x.forEach((x, i) => {
      const key = `${Math.floor(x / p.size)},${Math.floor(p.y[i] / p.size)}`;
      if (!p.buckets.has(key)) p.buckets.set(key, []);
      p.buckets.get(key).push(i);
    });
    wsi.patches = p;
  }
  wsi.viewer = OpenSeadragon({
    id: "osd", prefixUrl: "/static/vendor/openseadragon/images/", showNavigator: true, navigatorPosition: "TOP_RIGHT",
    maxZoomPixelRatio: 2, animationTime: 0.6, crossOriginPolicy: false, showRotationControl: false,
    tileSources: tileSource(meta, (l, x, y) => `/tiles/${enc}/slide/${l}/${x}_${y}.jpeg`),
  });
  wsi.viewer.addOnceHandler("open", async () => {
    await setOverlay();
    if (meta.has_tissue) {
      wsi.contour = await addLayer(tileSource(meta, (l, x, y) => `/tiles/${enc}/contour/${l}/${x}_${y}.png`),
        $("contour").checked ? 1 : 0, 2);
    }
    drawScalebar();
    wsi.ready = true;
    document.body.dataset.ready = "1";
  });
  wsi.viewer.addHandler("animation", drawScalebar);
  wsi.viewer.addHandler("resize", drawScalebar);
  new OpenSeadragon.MouseTracker({ element: wsi.viewer.canvas, moveHandler: onHover,
    leaveHandler: () => { $("hover").style.display = "none"; } });
  $("overlay").addEventListener("change", setOpacity);
  $("opacity").addEventListener("input", setOpacity);
  $("cmap").addEventListener("change", setOverlay);
  $("map").addEventListener("change", setOverlay);
  $("contour").addEventListener("change", () => { if (wsi.contour) wsi.contour.setOpacity($("contour").checked ? 1 : 0); });
  wsi.flyTo = flyTo;
}

main();
