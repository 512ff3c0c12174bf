// A Web-Mercator map drawn in SVG: tiles from --map-tiles when set, else
// a plain graticule; a scale bar; pan by dragging, zoom with the wheel or
// the + and - buttons. What is drawn on it is its owner's (`draw`).

const SVG = 'http://www.w3.org/2000/svg';
const TILE = 256;
const MAX_ZOOM = 19;
/** Metres a pixel covers at the equator at zoom 0. */
const EQUATOR_M_PER_PX = 40075016.686 / TILE;

export function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

/** Longitude and latitude as world pixels at zoom 0 ([0, 256) each). */
export function project(lon, lat) {
  const s = Math.sin((Math.max(-85.05, Math.min(85.05, lat)) * Math.PI) / 180);
  return {
    x: ((lon + 180) / 360) * TILE,
    y: (0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI)) * TILE,
  };
}

function unproject(x, y) {
  const n = Math.PI - (2 * Math.PI * y) / TILE;
  return {
    lon: (x / TILE) * 360 - 180,
    lat: (180 / Math.PI) * Math.atan(0.5 * (Math.exp(n) - Math.exp(-n))),
  };
}

/** 1, 2 or 5 times a power of ten, the largest not above `v`. */
function nice(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  const m = v / p;
  return (m >= 5 ? 5 : m >= 2 ? 2 : 1) * p;
}

export class MapView {
  /** `svg`: the element to draw in; `tiles`: a URL with {z}, {x}, {y}, or null. */
  constructor(svg, tiles) {
    this.svg = svg;
    this.tiles = tiles;
    this.center = project(0, 20);
    this.zoom = 1;
    this.draw = () => {};
    this.tileLayer = el('g', { class: 'tiles' }, svg);
    this.gridLayer = el('g', { class: 'graticule' }, svg);
    /** The owner's layer: redrawn by `draw(layer, map)` at every change. */
    this.layer = el('g', { class: 'overlay' }, svg);
    this.scaleLayer = el('g', { class: 'scale' }, svg);
    this.controls();
    this.interactions();
    new ResizeObserver(() => this.render()).observe(svg);
  }

  size() {
    return { w: this.svg.clientWidth || 800, h: this.svg.clientHeight || 500 };
  }

  /** Screen pixels of a longitude and latitude. */
  toScreen(lon, lat) {
    const p = project(lon, lat);
    const k = Math.pow(2, this.zoom);
    const { w, h } = this.size();
    return { x: (p.x - this.center.x) * k + w / 2, y: (p.y - this.center.y) * k + h / 2 };
  }

  toLonLat(sx, sy) {
    const k = Math.pow(2, this.zoom);
    const { w, h } = this.size();
    return unproject(this.center.x + (sx - w / 2) / k, this.center.y + (sy - h / 2) / k);
  }

  /** Shows every one of `points` ({lon, lat}). */
  fit(points) {
    if (!points.length) return;
    const ps = points.map((p) => project(p.lon, p.lat));
    const xs = ps.map((p) => p.x);
    const ys = ps.map((p) => p.y);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const { w, h } = this.size();
    const span = Math.max((x1 - x0) / (w - 80), (y1 - y0) / (h - 80), 1e-9);
    this.zoom = Math.max(0, Math.min(17, Math.log2(1 / span)));
    this.center = { x: (x0 + x1) / 2, y: (y0 + y1) / 2 };
    this.render();
  }

  zoomBy(dz, sx, sy) {
    const { w, h } = this.size();
    const ax = sx ?? w / 2;
    const ay = sy ?? h / 2;
    const before = Math.pow(2, this.zoom);
    const z = Math.max(0, Math.min(MAX_ZOOM, this.zoom + dz));
    const after = Math.pow(2, z);
    // The point under the cursor stays under it.
    this.center = {
      x: this.center.x + (ax - w / 2) / before - (ax - w / 2) / after,
      y: this.center.y + (ay - h / 2) / before - (ay - h / 2) / after,
    };
    this.zoom = z;
    this.render();
  }

  render() {
    this.renderTiles();
    this.renderGraticule();
    this.layer.replaceChildren();
    this.draw(this.layer, this);
    this.renderScale();
    this.svg.appendChild(this.zoomLayer);
  }

  renderTiles() {
    this.tileLayer.replaceChildren();
    if (!this.tiles) return;
    const { w, h } = this.size();
    const tz = Math.max(0, Math.min(MAX_ZOOM, Math.round(this.zoom)));
    const n = Math.pow(2, tz);
    const size = TILE * Math.pow(2, this.zoom - tz);
    const k = Math.pow(2, this.zoom);
    const left = this.center.x * k - w / 2;
    const top = this.center.y * k - h / 2;
    for (let ty = Math.max(0, Math.floor(top / size)); ty <= Math.min(n - 1, Math.floor((top + h) / size)); ty++) {
      for (let tx = Math.floor(left / size); tx <= Math.floor((left + w) / size); tx++) {
        const x = ((tx % n) + n) % n;
        const href = this.tiles.replace('{z}', tz).replace('{x}', x).replace('{y}', ty);
        el('image', {
          href, x: tx * size - left, y: ty * size - top,
          width: size + 0.5, height: size + 0.5, preserveAspectRatio: 'none',
        }, this.tileLayer);
      }
    }
  }

  renderGraticule() {
    this.gridLayer.replaceChildren();
    const { w, h } = this.size();
    const nw = this.toLonLat(0, 0);
    const se = this.toLonLat(w, h);
    const step = Math.min(30, nice((se.lon - nw.lon) / 5));
    if (!(step > 0)) return;
    const digits = Math.max(0, -Math.floor(Math.log10(step)));
    for (let lon = Math.ceil(nw.lon / step) * step; lon <= se.lon; lon += step) {
      const x = this.toScreen(lon, 0).x;
      el('line', { x1: x, y1: 0, x2: x, y2: h }, this.gridLayer);
      el('text', { x: x + 2, y: h - 4 }, this.gridLayer).textContent = lon.toFixed(digits) + '°';
    }
    for (let lat = Math.ceil(Math.max(-85, se.lat) / step) * step; lat <= Math.min(85, nw.lat); lat += step) {
      const y = this.toScreen(0, lat).y;
      el('line', { x1: 0, y1: y, x2: w, y2: y }, this.gridLayer);
      el('text', { x: w - 4, y: y - 2, 'text-anchor': 'end' }, this.gridLayer).textContent = lat.toFixed(digits) + '°';
    }
  }

  renderScale() {
    this.scaleLayer.replaceChildren();
    const { h } = this.size();
    const lat = this.toLonLat(0, h / 2).lat;
    const mPerPx = (EQUATOR_M_PER_PX * Math.cos((lat * Math.PI) / 180)) / Math.pow(2, this.zoom);
    const metres = nice(mPerPx * 120);
    const px = metres / mPerPx;
    const y = h - 24;
    el('line', { x1: 40, y1: y, x2: 40 + px, y2: y }, this.scaleLayer);
    el('line', { x1: 40, y1: y - 5, x2: 40, y2: y + 1 }, this.scaleLayer);
    el('line', { x1: 40 + px, y1: y - 5, x2: 40 + px, y2: y + 1 }, this.scaleLayer);
    const label = metres >= 1000 ? metres / 1000 + ' km' : metres + ' m';
    el('text', { x: 40, y: y - 7, 'data-metres': metres }, this.scaleLayer).textContent = label;
    if (this.tiles) {
      const credit = el('text', { x: this.size().w - 6, y: 14, 'text-anchor': 'end', class: 'credit' }, this.scaleLayer);
      credit.textContent = 'tiles: ' + new URL(this.tiles.replace(/[{}]/g, '')).host;
    }
  }

  controls() {
    this.zoomLayer = el('g', { class: 'zoom' });
    [['+', 1, 10], ['−', -1, 40]].forEach(([label, dz, y]) => {
      const b = el('g', { 'data-zoom': dz }, this.zoomLayer);
      el('rect', { x: 10, y, width: 26, height: 26, rx: 3 }, b);
      el('text', { x: 23, y: y + 19 }, b).textContent = label;
      b.addEventListener('click', (e) => {
        e.stopPropagation();
        this.zoomBy(dz);
      });
    });
  }

  interactions() {
    let drag = null;
    this.svg.addEventListener('pointerdown', (e) => {
      if (e.target.closest('.zoom') || e.target.closest('.marker')) return;
      drag = { x: e.clientX, y: e.clientY, center: { ...this.center } };
      this.svg.setPointerCapture(e.pointerId);
      this.svg.classList.add('dragging');
    });
    this.svg.addEventListener('pointermove', (e) => {
      if (!drag) return;
      const k = Math.pow(2, this.zoom);
      this.center = { x: drag.center.x - (e.clientX - drag.x) / k, y: drag.center.y - (e.clientY - drag.y) / k };
      this.render();
    });
    const end = () => {
      drag = null;
      this.svg.classList.remove('dragging');
    };
    this.svg.addEventListener('pointerup', end);
    this.svg.addEventListener('pointercancel', end);
    this.svg.addEventListener('wheel', (e) => {
      e.preventDefault();
      const r = this.svg.getBoundingClientRect();
      this.zoomBy(e.deltaY < 0 ? 0.5 : -0.5, e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
  }
}
