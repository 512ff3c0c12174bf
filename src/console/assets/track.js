// A device's track over a time range: every page of
// /v1/devices/{id}/track, drawn as a path with each point coloured by its
// speed, its stops marked, and a table of the points.

import { allPages, describe, inputTime, toInput } from './api.js';
import { MapView, el } from './map.js';

const $ = (id) => document.getElementById(id);

/** Colour of `speed` on a ramp from blue (0) to red (`top` and above). */
export function speedColour(speed, top) {
  if (speed === null || speed === undefined) return '#888';
  const f = Math.max(0, Math.min(1, speed / top));
  return `hsl(${Math.round(240 * (1 - f))}, 85%, 45%)`;
}

/** Metres between two points (haversine). */
function metres(a, b) {
  const r = Math.PI / 180;
  const dLat = (b.latitude - a.latitude) * r;
  const dLon = (b.longitude - a.longitude) * r;
  const h = Math.sin(dLat / 2) ** 2 +
    Math.cos(a.latitude * r) * Math.cos(b.latitude * r) * Math.sin(dLon / 2) ** 2;
  return 2 * 6371008.8 * Math.asin(Math.min(1, Math.sqrt(h)));
}

/**
 * Stops: runs of consecutive points that stay within `radius` metres of
 * the run's first point for at least `minutes` (a parked vehicle, a phone
 * at rest: its speed ~0, or its fixes wandering a little).
 */
export function findStops(points, radius, minutes) {
  const stops = [];
  let i = 0;
  while (i < points.length) {
    let j = i;
    while (j + 1 < points.length && metres(points[i], points[j + 1]) <= radius) j += 1;
    const ms = Date.parse(points[j].time) - Date.parse(points[i].time);
    if (j > i && ms >= minutes * 60000) {
      const run = points.slice(i, j + 1);
      stops.push({
        first: i, last: j, ms,
        latitude: run.reduce((s, p) => s + p.latitude, 0) / run.length,
        longitude: run.reduce((s, p) => s + p.longitude, 0) / run.length,
      });
      i = j + 1;
    } else {
      i += 1;
    }
  }
  return stops;
}

export class TrackPage {
  constructor(s, tiles, fleet) {
    this.session = s;
    this.fleet = fleet;
    this.points = [];
    this.stops = [];
    this.map = new MapView($('track-map'), tiles);
    this.map.draw = (layer) => this.drawTrack(layer);
    const now = new Date();
    $('track-from').value = toInput(new Date(now.getTime() - 24 * 3600e3));
    $('track-to').value = toInput(new Date(now.getTime() + 3600e3));
    $('track-form').addEventListener('submit', (e) => {
      e.preventDefault();
      this.load();
    });
  }

  /** Opens the page on `device`'s track over the range in the form. */
  show(device) {
    $('track-device').value = device;
    this.load();
  }

  async load() {
    const device = $('track-device').value.trim();
    const status = $('track-status');
    status.classList.remove('bad');
    $('track-map').dataset.loaded = 'false';
    const points = [];
    let params;
    try {
      params = { app_source: this.session.app_source, from: inputTime($('track-from').value), to: inputTime($('track-to').value) };
    } catch {
      status.textContent = 'Give a from and a to time.';
      status.classList.add('bad');
      return;
    }
    let pages = 0;
    try {
      pages = await allPages(`/v1/devices/${encodeURIComponent(device)}/track`, params, (page, n) => {
        points.push(...page.locations);
        status.textContent = `${points.length} points, ${n} pages so far...`;
      });
    } catch (err) {
      status.textContent = describe(err);
      status.classList.add('bad');
      return;
    }
    this.points = points;
    this.stops = findStops(points, Number($('stop-radius').value) || 50, Number($('stop-minutes').value) || 5);
    const n = (k, one) => `${k} ${one}${k === 1 ? '' : 's'}`;
    status.textContent = `${n(points.length, 'point')} in ${n(pages, 'page')}, ${n(this.stops.length, 'stop')}.`;
    status.dataset.points = points.length;
    status.dataset.pages = pages;
    this.top = Math.max(10, ...points.map((p) => p.speed || 0));
    this.legend();
    this.table();
    this.map.fit(points.map((p) => ({ lon: p.longitude, lat: p.latitude })));
    this.map.render();
    $('track-map').dataset.loaded = 'true';
  }

  drawTrack(layer) {
    const ps = this.points;
    if (!ps.length) return;
    const xy = ps.map((p) => this.map.toScreen(p.longitude, p.latitude));
    el('polyline', {
      id: 'track-path',
      points: xy.map((p) => p.x.toFixed(1) + ',' + p.y.toFixed(1)).join(' '),
      'data-vertices': xy.length,
    }, layer);
    const dots = el('g', { class: 'points' }, layer);
    xy.forEach((p, i) => {
      el('circle', { class: 'pt', cx: p.x.toFixed(1), cy: p.y.toFixed(1), r: 3, fill: speedColour(ps[i].speed, this.top) }, dots);
    });
    this.stops.forEach((s, i) => {
      const p = this.map.toScreen(s.longitude, s.latitude);
      el('circle', { class: 'stop', cx: p.x, cy: p.y, r: 9 }, layer);
      el('text', { class: 'stop-label', x: p.x + 11, y: p.y + 4 }, layer).textContent =
        `stop ${i + 1}: ${Math.round(s.ms / 60000)} min`;
    });
  }

  legend() {
    const box = $('speed-legend');
    box.replaceChildren();
    const svg = el('svg', { class: 'ramp', viewBox: '0 0 200 10', preserveAspectRatio: 'none' });
    for (let i = 0; i < 20; i++) {
      el('rect', { x: i * 10, y: 0, width: 10.5, height: 10, fill: speedColour((i / 19) * this.top, this.top) }, svg);
    }
    const span = (t) => {
      const s = document.createElement('span');
      s.textContent = t;
      return s;
    };
    box.append(span('speed: 0'), svg, span(Math.round(this.top) + ' km/h'));
  }

  table() {
    const rows = document.createDocumentFragment();
    const cell = (tr, text) => {
      const td = document.createElement('td');
      td.textContent = text;
      tr.appendChild(td);
    };
    const num = (v, d) => (v === null || v === undefined ? '' : v.toFixed(d));
    this.points.forEach((p, i) => {
      const tr = document.createElement('tr');
      cell(tr, i + 1);
      cell(tr, p.time.replace('T', ' ').replace('Z', ''));
      cell(tr, p.latitude.toFixed(6));
      cell(tr, p.longitude.toFixed(6));
      cell(tr, num(p.speed, 1));
      cell(tr, num(p.heading, 0));
      cell(tr, num(p.accuracy, 0));
      rows.appendChild(tr);
    });
    $('track-points').tBodies[0].replaceChildren(rows);
    const stops = document.createDocumentFragment();
    for (const s of this.stops) {
      const tr = document.createElement('tr');
      cell(tr, this.points[s.first].time.slice(0, 19).replace('T', ' '));
      cell(tr, this.points[s.last].time.slice(0, 19).replace('T', ' '));
      cell(tr, (s.ms / 60000).toFixed(1));
      cell(tr, s.latitude.toFixed(6));
      cell(tr, s.longitude.toFixed(6));
      cell(tr, s.last - s.first + 1);
      stops.appendChild(tr);
    }
    $('track-stops').tBodies[0].replaceChildren(stops);
  }
}
