// The live feed, GET /v1/live, read as Server-Sent Events from a fetch()
// body: EventSource cannot send an Authorization header, and the token
// never goes in a URL. Reconnects after an error, waiting longer each time
// (1 s, doubling, at most 30 s).

import { errorOf, describe, headers, url } from './api.js';

const FIRST_RETRY_MS = 1000;
const LAST_RETRY_MS = 30000;

/**
 * Follows the feed of `params` with `token`. `on.open()` at each
 * (re)connection, `on.point(location)` for each point, `on.state(text, bad)`
 * as the connection changes. Returns a function that stops it.
 */
export function follow(token, params, on) {
  let stopped = false;
  let controller = null;
  let retry = FIRST_RETRY_MS;

  async function run() {
    while (!stopped) {
      controller = new AbortController();
      try {
        const resp = await fetch(url('/v1/live', params), {
          headers: { ...headers(token), Accept: 'text/event-stream' },
          cache: 'no-store',
          signal: controller.signal,
        });
        if (!resp.ok) {
          const err = await errorOf(resp);
          on.state(describe(err), true);
          // A refused token or app_source will be refused again.
          if (err.status === 401 || err.status === 403) return;
        } else {
          retry = FIRST_RETRY_MS;
          on.state('live', false);
          on.open();
          const ended = await readEvents(resp.body, (type, data) => {
            if (type === 'location') {
              try {
                on.point(JSON.parse(data));
              } catch {
                // One unreadable event is skipped, not the feed.
              }
            } else if (type === 'error') {
              on.state('the feed ended: ' + data, true);
            }
          });
          if (stopped) return;
          on.state('reconnecting (' + ended + ')', true);
        }
      } catch (e) {
        if (stopped) return;
        on.state('reconnecting (' + (e.message || e) + ')', true);
      }
      await new Promise((r) => setTimeout(r, retry));
      retry = Math.min(retry * 2, LAST_RETRY_MS);
    }
  }

  run();
  return () => {
    stopped = true;
    if (controller) controller.abort();
  };
}

/**
 * Reads an event stream to its end: `onEvent(type, data)` per event.
 * Resolves with why it ended.
 */
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let type = '';
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return 'the server closed the feed';
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === '') {
        if (data.length) onEvent(type || 'message', data.join('\n'));
        type = '';
        data = [];
      } else if (line.startsWith(':')) {
        // A keep-alive comment.
      } else {
        const i = line.indexOf(':');
        const field = i < 0 ? line : line.slice(0, i);
        let v = i < 0 ? '' : line.slice(i + 1);
        if (v.startsWith(' ')) v = v.slice(1);
        if (field === 'event') type = v;
        else if (field === 'data') data.push(v);
      }
    }
  }
}
