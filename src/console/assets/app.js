// The console's pages: sign-in, and the live map of the signed-in
// app_source's fleet; the track and stats pages are their own modules.

import { allPages, clearSession, describe, get, saveSession, session } from './api.js';
import { follow } from './live.js';
import { MapView, el } from './map.js';
import { TrackPage } from './track.js';
import { StatsPage } from './stats.js';

const $ = (id) => document.getElementById(id);
/** How often the count of points a second and the silent devices are updated. */
const TICK_MS = 1000;
/** Points a second are averaged over this many ticks. */
const RATE_WINDOW = 5;

/** A message for the sign-in page, kept across the reload of a sign-out. */
const NOTICE = 'locus.console.notice';

let config = { map_tiles: null };
let fleet = null;
let pages = {};

async function start() {
  try {
    const resp = await fetch('/console/config.json', { cache: 'no-store' });
    if (resp.ok) config = await resp.json();
  } catch {
    // Without it, the map is drawn without tiles.
  }
  $('signin-form').addEventListener('submit', signIn);
  $('signout').addEventListener('click', () => signOut());
  window.addEventListener('hashchange', showView);
  const notice = sessionStorage.getItem(NOTICE);
  sessionStorage.removeItem(NOTICE);
  if (session()) enter();
  else showSignIn(notice);
}

function showSignIn(message) {
  document.querySelectorAll('.view').forEach((v) => (v.hidden = v.id !== 'signin'));
  $('nav').hidden = true;
  $('signout').hidden = true;
  $('who').textContent = '';
  const err = $('signin-error');
  err.hidden = !message;
  err.textContent = message || '';
  document.body.dataset.signedIn = 'false';
}

/** Checks the token on the app_source (one device of its latest) before keeping it. */
async function signIn(e) {
  e.preventDefault();
  const token = $('token').value.trim();
  const appSource = $('app-source').value.trim();
  $('signin-error').hidden = true;
  try {
    await get('/v1/latest', { app_source: appSource, limit: 1 }, token);
  } catch (err) {
    showSignIn(describe(err));
    return;
  }
  saveSession({ token, app_source: appSource });
  $('token').value = '';
  enter();
}

/** Forgets the token and starts afresh: nothing of the last session stays drawn. */
function signOut(message) {
  if (fleet) fleet.stop();
  clearSession();
  if (typeof message === 'string') sessionStorage.setItem(NOTICE, message);
  location.replace(location.pathname);
}

function enter() {
  const s = session();
  $('nav').hidden = false;
  $('signout').hidden = false;
  $('who').textContent = 'app_source ' + s.app_source;
  document.body.dataset.signedIn = 'true';
  if (!fleet) fleet = new Fleet(s, config.map_tiles);
  if (!pages.track) pages.track = new TrackPage(s, config.map_tiles, fleet);
  if (!pages.stats) pages.stats = new StatsPage(s);
  if (!location.hash) location.hash = '#map';
  showView();
}

function showView() {
  if (!session()) return;
  const name = (location.hash || '#map').slice(1);
  document.querySelectorAll('.view').forEach((v) => (v.hidden = v.id !== 'view-' + name));
  document.querySelectorAll('#nav a').forEach((a) => a.classList.toggle('active', a.dataset.view === name));
  if (name === 'map' && fleet) fleet.map.render();
  if (name === 'track' && pages.track) pages.track.map.render();
}

/** The live map: the fleet from /v1/latest, moved by /v1/live. */
class Fleet {
  constructor(s, tiles) {
    this.session = s;
    this.devices = new Map();
    this.selected = null;
    this.ticks = [0];
    this.map = new MapView($('fleet-map'), tiles);
    this.map.draw = (layer) => {
      for (const d of this.devices.values()) layer.appendChild(d.el);
      this.devices.forEach((d) => this.place(d));
    };
    this.loaded = false;
    this.stopFeed = follow(s.token, { app_source: s.app_source }, {
      // Subscribed first, then the fleet read: no point falls between.
      open: () => this.load(),
      point: (l) => this.update(l),
      state: (text, bad) => {
        $('live-status').textContent = text;
        $('live-status').classList.toggle('bad', bad);
        if (bad && /token was refused/.test(text)) signOut(text);
      },
    });
    this.timer = setInterval(() => this.tick(), TICK_MS);
    $('silent-minutes').addEventListener('change', () => this.countSilent());
  }

  stop() {
    this.stopFeed();
    clearInterval(this.timer);
  }

  async load() {
    try {
      await allPages('/v1/latest', { app_source: this.session.app_source }, (page) => {
        for (const l of page.locations) this.update(l, true);
      });
    } catch (err) {
      $('live-status').textContent = describe(err);
      $('live-status').classList.add('bad');
      return;
    }
    if (!this.loaded) {
      this.loaded = true;
      this.map.fit([...this.devices.values()].map((d) => ({ lon: d.loc.longitude, lat: d.loc.latitude })));
    }
    this.map.render();
    this.count();
    this.countSilent();
    $('fleet-map').dataset.loaded = 'true';
  }

  /** `l` is a device's newest point unless an older one than it already shown. */
  update(l, fromLatest) {
    let d = this.devices.get(l.device_id);
    if (!fromLatest) this.ticks[this.ticks.length - 1] += 1;
    if (d && d.loc.time >= l.time) return;
    if (!d) {
      d = { el: this.marker(l.device_id) };
      this.devices.set(l.device_id, d);
      this.map.layer.appendChild(d.el);
      const opt = document.createElement('option');
      opt.value = l.device_id;
      $('devices').appendChild(opt);
      this.count();
    }
    d.loc = l;
    d.seen = Date.parse(l.time);
    this.place(d);
    this.markSilent(d);
    if (this.selected === l.device_id) this.info(d);
  }

  marker(id) {
    const g = el('g', { class: 'marker', 'data-device': id });
    g.addEventListener('click', () => this.select(id));
    return g;
  }

  /** The marker where its device is, pointing where it heads. */
  place(d) {
    const l = d.loc;
    const p = this.map.toScreen(l.longitude, l.latitude);
    const g = d.el;
    g.setAttribute('transform', `translate(${p.x.toFixed(1)},${p.y.toFixed(1)})`);
    g.dataset.lat = l.latitude;
    g.dataset.lon = l.longitude;
    g.dataset.time = l.time;
    g.dataset.heading = l.heading ?? '';
    g.replaceChildren();
    if (l.heading === null || l.heading === undefined) {
      el('circle', { r: 6 }, g);
    } else {
      el('path', { d: 'M0,-10 L6.5,7 L0,3 L-6.5,7 Z', transform: `rotate(${l.heading})` }, g);
    }
    el('title', {}, g).textContent = `${l.device_id}\n${l.time}\n${l.speed ?? '?'} km/h`;
  }

  markSilent(d) {
    const limit = Math.max(1, Number($('silent-minutes').value) || 5) * 60000;
    const silent = Date.now() - d.seen > limit;
    d.el.classList.toggle('silent', silent);
    d.el.dataset.silent = silent;
    return silent;
  }

  count() {
    const n = this.devices.size;
    $('device-count').textContent = n;
    $('device-count').dataset.count = n;
  }

  countSilent() {
    let silent = 0;
    for (const d of this.devices.values()) if (this.markSilent(d)) silent += 1;
    $('silent-count').textContent = silent;
  }

  tick() {
    this.countSilent();
    const total = this.ticks.reduce((a, b) => a + b, 0);
    $('rate').textContent = (total / this.ticks.length).toFixed(1);
    this.ticks.push(0);
    if (this.ticks.length > RATE_WINDOW) this.ticks.shift();
  }

  select(id) {
    if (this.selected) this.devices.get(this.selected)?.el.classList.remove('selected');
    this.selected = id;
    const d = this.devices.get(id);
    d.el.classList.add('selected');
    this.info(d);
  }

  info(d) {
    const l = d.loc;
    const box = $('device-info');
    box.hidden = false;
    box.replaceChildren();
    const line = (text) => {
      const p = document.createElement('div');
      p.textContent = text;
      box.appendChild(p);
    };
    line('device ' + l.device_id + ' (user ' + l.user_id + ')');
    line(`${l.time}: ${l.latitude.toFixed(6)}, ${l.longitude.toFixed(6)}, ${l.speed ?? '?'} km/h, heading ${l.heading ?? '?'}`);
    const a = document.createElement('a');
    a.href = '#track';
    a.textContent = 'its track';
    a.addEventListener('click', () => pages.track.show(l.device_id));
    box.appendChild(a);
  }
}

start();
