// Hourly stats of the app_source, a device or a user from
// /v1/stats/hourly, as a chart drawn by hand in SVG: a bar of points per
// hour that has points, and lines of the average and top speed.

import { describe, get, inputTime, toInput } from './api.js';
import { el } from './map.js';

const $ = (id) => document.getElementById(id);
const HOUR_MS = 3600e3;
const PAD = { left: 56, right: 56, top: 28, bottom: 40 };

/** About `n` round steps covering [0, top]. */
function ticks(top, n) {
  const raw = top / n;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw);
  const out = [];
  for (let v = 0; v <= top + 1e-9; v += step) out.push(v);
  return out;
}

export class StatsPage {
  constructor(s) {
    this.session = s;
    const now = new Date();
    $('stats-from').value = toInput(new Date(Math.floor(now.getTime() / HOUR_MS) * HOUR_MS - 47 * HOUR_MS));
    $('stats-to').value = toInput(new Date(Math.ceil(now.getTime() / HOUR_MS) * HOUR_MS + HOUR_MS));
    $('stats-kind').addEventListener('change', () => {
      $('stats-id').disabled = $('stats-kind').value === 'app_source';
    });
    $('stats-form').addEventListener('submit', (e) => {
      e.preventDefault();
      this.load();
    });
  }

  async load() {
    const status = $('stats-status');
    status.classList.remove('bad');
    $('stats-chart').dataset.loaded = 'false';
    const kind = $('stats-kind').value;
    let params;
    try {
      params = { app_source: this.session.app_source, from: inputTime($('stats-from').value), to: inputTime($('stats-to').value) };
    } catch {
      status.textContent = 'Give a from and a to time.';
      status.classList.add('bad');
      return;
    }
    if (kind !== 'app_source') params[kind] = $('stats-id').value.trim();
    let hours;
    try {
      hours = (await get('/v1/stats/hourly', params)).hours;
    } catch (err) {
      status.textContent = describe(err);
      status.classList.add('bad');
      return;
    }
    const points = hours.reduce((s, h) => s + h.point_count, 0);
    status.textContent = `${hours.length} hours with points, ${points} points.`;
    status.dataset.hours = hours.length;
    this.chart(hours, Date.parse(params.from), Date.parse(params.to));
    this.table(hours);
    $('stats-chart').dataset.loaded = 'true';
  }

  chart(hours, from, to) {
    const svg = $('stats-chart');
    svg.replaceChildren();
    const w = svg.clientWidth || 900;
    const h = svg.clientHeight || 360;
    const t0 = Math.floor(from / HOUR_MS) * HOUR_MS;
    const slots = Math.max(1, Math.ceil((to - t0) / HOUR_MS));
    const slot = (w - PAD.left - PAD.right) / slots;
    const x = (t) => PAD.left + ((t - t0) / HOUR_MS) * slot;
    const plotH = h - PAD.top - PAD.bottom;
    const topCount = Math.max(1, ...hours.map((r) => r.point_count));
    const topSpeed = Math.max(1, ...hours.map((r) => r.max_speed || 0));
    const yc = (v) => PAD.top + plotH * (1 - v / topCount);
    const ys = (v) => PAD.top + plotH * (1 - v / topSpeed);

    // Axes: points on the left, km/h on the right, hours along the bottom.
    const axis = el('g', { class: 'axis' }, svg);
    el('line', { x1: PAD.left, y1: PAD.top + plotH, x2: w - PAD.right, y2: PAD.top + plotH }, axis);
    el('line', { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: PAD.top + plotH }, axis);
    el('line', { x1: w - PAD.right, y1: PAD.top, x2: w - PAD.right, y2: PAD.top + plotH }, axis);
    for (const v of ticks(topCount, 5)) {
      el('text', { x: PAD.left - 6, y: yc(v) + 4, 'text-anchor': 'end' }, axis).textContent = v;
    }
    for (const v of ticks(topSpeed, 5)) {
      el('text', { x: w - PAD.right + 6, y: ys(v) + 4 }, axis).textContent = v;
    }
    el('text', { x: 4, y: 16 }, axis).textContent = 'points / hour';
    el('text', { x: w - 4, y: 16, 'text-anchor': 'end' }, axis).textContent = 'km/h: avg (line), max (dashed)';
    const every = Math.max(1, Math.ceil(slots / Math.max(1, Math.floor((w - PAD.left - PAD.right) / 70))));
    for (let i = 0; i <= slots; i += every) {
      const t = new Date(t0 + i * HOUR_MS);
      const label = t.toISOString().slice(5, 13).replace('T', ' ') + 'h';
      el('text', { x: x(t.getTime()), y: h - PAD.bottom + 16, 'text-anchor': 'middle' }, axis).textContent = label;
    }

    const bars = el('g', { class: 'bars' }, svg);
    for (const r of hours) {
      const t = Date.parse(r.hour);
      const bar = el('rect', {
        class: 'hour', x: x(t) + slot * 0.1, width: Math.max(1, slot * 0.8),
        y: yc(r.point_count), height: PAD.top + plotH - yc(r.point_count),
        'data-hour': r.hour, 'data-points': r.point_count,
      }, bars);
      el('title', {}, bar).textContent =
        `${r.hour}: ${r.point_count} points, ${r.devices} devices, avg ${fmt(r.avg_speed)} km/h, max ${fmt(r.max_speed)} km/h`;
    }
    // A dot per hour, joined only to the next hour when it has points too.
    const speeds = (cls, key) => {
      const g = el('g', { class: cls }, svg);
      let run = [];
      let last = null;
      const flush = () => {
        if (run.length > 1) el('polyline', { points: run.join(' ') }, g);
        run = [];
      };
      for (const r of hours) {
        if (r[key] === null || r[key] === undefined) continue;
        const t = Date.parse(r.hour);
        if (last !== null && t - last > HOUR_MS) flush();
        const cx = x(t) + slot / 2;
        const cy = ys(r[key]);
        run.push(`${cx.toFixed(1)},${cy.toFixed(1)}`);
        el('circle', { class: 'dot', cx, cy, r: 3, 'data-hour': r.hour }, g);
        last = t;
      }
      flush();
    };
    speeds('avg', 'avg_speed');
    speeds('max', 'max_speed');
  }

  table(hours) {
    const rows = document.createDocumentFragment();
    for (const r of hours) {
      const tr = document.createElement('tr');
      for (const v of [r.hour.slice(0, 13).replace('T', ' ') + 'h', r.point_count, r.devices, fmt(r.avg_speed), fmt(r.max_speed)]) {
        const td = document.createElement('td');
        td.textContent = v;
        tr.appendChild(td);
      }
      rows.appendChild(tr);
    }
    $('stats-table').tBodies[0].replaceChildren(rows);
  }
}

function fmt(v) {
  return v === null || v === undefined ? '' : v.toFixed(1);
}
