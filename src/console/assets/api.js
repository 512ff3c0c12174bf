// The query API as the console calls it: a bearer token from this tab's
// sessionStorage on every request, errors as locus writes them, pages
// followed by next_cursor.

const KEY = 'locus.console.session';

/** The signed-in session ({token, app_source}), or null. */
export function session() {
  try {
    const s = JSON.parse(sessionStorage.getItem(KEY));
    return s && s.token && s.app_source ? s : null;
  } catch {
    return null;
  }
}

export function saveSession(s) {
  sessionStorage.setItem(KEY, JSON.stringify(s));
}

export function clearSession() {
  sessionStorage.removeItem(KEY);
}

/** An answer other than 2xx: its status, and locus's error code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** `{error: {code, message}}` of a refused answer, as an ApiError. */
export async function errorOf(resp) {
  let code = 'http_' + resp.status;
  let message = resp.statusText || 'no message';
  try {
    const body = await resp.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // Not JSON: the status says enough.
  }
  return new ApiError(resp.status, code, message);
}

export function headers(token) {
  return { Authorization: 'Bearer ' + token, Accept: 'application/json' };
}

/** `path` with `params` (those not null or empty) as its query string. */
export function url(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') q.set(k, v);
  }
  const s = q.toString();
  return s ? path + '?' + s : path;
}

/** GET `path` as JSON with `token` (the session's by default). */
export async function get(path, params, token) {
  const t = token || (session() || {}).token;
  const resp = await fetch(url(path, params), { headers: headers(t), cache: 'no-store' });
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

/**
 * Every page of `path`: `onPage(page, n)` for each, following next_cursor
 * until an answer has none.
 */
export async function allPages(path, params, onPage) {
  let cursor;
  let n = 0;
  do {
    const page = await get(path, { ...params, cursor });
    n += 1;
    onPage(page, n);
    cursor = page.next_cursor;
  } while (cursor);
  return n;
}

/** What to tell a person about `err`. */
export function describe(err) {
  if (!(err instanceof ApiError)) {
    return 'locus did not answer (' + (err && err.message ? err.message : err) + ')';
  }
  switch (err.status) {
    case 401:
      return 'This token was refused: ' + err.message +
        '. Check it, or make one with: locus token create --role reader --app-source ...';
    case 403:
      return 'This token may not read that: ' + err.message;
    case 404:
      return 'Not found: ' + err.message;
    case 429:
      return 'Too many requests or subscriptions: ' + err.message;
    default:
      return err.message + ' (' + err.code + ', HTTP ' + err.status + ')';
  }
}

/** A datetime-local input's value (local time) as RFC 3339 in UTC. */
export function inputTime(value) {
  return new Date(value).toISOString();
}

/** A Date as a datetime-local input's value, in local time. */
export function toInput(date) {
  const d = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 19);
}
