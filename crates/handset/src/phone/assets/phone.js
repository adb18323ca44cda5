// pocketvisor's browser phone: the foreground profile's screen over RFB 3.8 on a websocket
// (Raw and DesktopSize, security None: what the daemon's RFB server sends), a profile
// switcher with state badges, and touch and keys going to the profile in view.
'use strict';

const RAW = 0;
const DESKTOP_SIZE = -223;
const MAX_CUT_TEXT = 1 << 20;
const MAX_SIDE = 8192;

// X keysyms of the keys that are not one printable character.
const KEYSYMS = {
  Backspace: 0xff08, Tab: 0xff09, Enter: 0xff0d, Escape: 0xff1b, Delete: 0xffff,
  Home: 0xff50, ArrowLeft: 0xff51, ArrowUp: 0xff52, ArrowRight: 0xff53, ArrowDown: 0xff54,
  PageUp: 0xff55, PageDown: 0xff56, End: 0xff57, Insert: 0xff63,
  Shift: 0xffe1, Control: 0xffe3, Alt: 0xffe9, Meta: 0xffe7, CapsLock: 0xffe5,
  F1: 0xffbe, F2: 0xffbf, F3: 0xffc0, F4: 0xffc1, F5: 0xffc2, F6: 0xffc3,
  F7: 0xffc4, F8: 0xffc5, F9: 0xffc6, F10: 0xffc7, F11: 0xffc8, F12: 0xffc9,
};

function keysym(e) {
  if (e.key in KEYSYMS) return KEYSYMS[e.key];
  if ([...e.key].length !== 1) return null;
  const cp = e.key.codePointAt(0);
  return cp < 0x100 ? cp : 0x01000000 + cp;
}

// One RFB session over a websocket, drawing into `canvas`.
class RfbSession {
  constructor(url, canvas, onEvent) {
    this.canvas = canvas;
    this.ctx = canvas.getContext('2d');
    this.onEvent = onEvent;
    this.buf = new Uint8Array(1 << 16);
    this.start = 0;
    this.end = 0;
    this.step = this.version;
    this.closed = false;
    this.buttons = 0;
    this.ws = new WebSocket(url);
    this.ws.binaryType = 'arraybuffer';
    this.ws.onmessage = (e) => this.receive(new Uint8Array(e.data));
    this.ws.onclose = () => this.finish('the screen connection closed');
    this.ws.onerror = () => this.finish('the screen connection failed');
  }

  close() {
    this.closed = true;
    this.ws.close();
  }

  finish(why) {
    if (this.closed) return;
    this.closed = true;
    this.onEvent('closed', why);
  }

  fail(why) {
    this.finish(why);
    this.ws.close();
  }

  receive(bytes) {
    if (this.closed) return;
    if (this.end + bytes.length > this.buf.length) {
      const live = this.end - this.start;
      if (live + bytes.length <= this.buf.length) {
        this.buf.copyWithin(0, this.start, this.end);
      } else {
        let size = this.buf.length;
        while (size < live + bytes.length) size *= 2;
        const next = new Uint8Array(size);
        next.set(this.buf.subarray(this.start, this.end));
        this.buf = next;
      }
      this.start = 0;
      this.end = live;
    }
    this.buf.set(bytes, this.end);
    this.end += bytes.length;
    // Each step consumes what it needs and returns true, or returns false to wait for more.
    while (!this.closed && this.step.call(this)) { /* next step */ }
  }

  have(n) { return this.end - this.start >= n; }
  u8(at) { return this.buf[this.start + at]; }
  u16(at) { return (this.u8(at) << 8) | this.u8(at + 1); }
  u32(at) { return ((this.u16(at) << 16) >>> 0) + this.u16(at + 2); }
  i32(at) { return this.u32(at) | 0; }
  take(n) { this.start += n; }

  send(bytes) {
    if (!this.closed && this.ws.readyState === WebSocket.OPEN) this.ws.send(new Uint8Array(bytes));
  }

  version() {
    if (!this.have(12)) return false;
    const text = String.fromCharCode(...this.buf.subarray(this.start, this.start + 12));
    if (!text.startsWith('RFB 003.')) { this.fail('not an RFB server'); return false; }
    this.take(12);
    this.send([...'RFB 003.008\n'].map((c) => c.charCodeAt(0)));
    this.step = this.securityTypes;
    return true;
  }

  securityTypes() {
    if (!this.have(1)) return false;
    const n = this.u8(0);
    if (n === 0) { this.step = this.failureReason; this.take(1); return true; }
    if (!this.have(1 + n)) return false;
    const types = [...this.buf.subarray(this.start + 1, this.start + 1 + n)];
    this.take(1 + n);
    if (!types.includes(1)) { this.fail('the server wants a credential this page lacks'); return false; }
    this.send([1]);
    this.step = this.securityResult;
    return true;
  }

  securityResult() {
    if (!this.have(4)) return false;
    const ok = this.u32(0) === 0;
    this.take(4);
    if (!ok) { this.step = this.failureReason; return true; }
    this.send([1]); // ClientInit: shared
    this.step = this.serverInit;
    return true;
  }

  failureReason() {
    if (!this.have(4)) return false;
    const len = Math.min(this.u32(0), 4096);
    if (!this.have(4 + len)) return false;
    const text = new TextDecoder().decode(this.buf.subarray(this.start + 4, this.start + 4 + len));
    this.fail('the server refused: ' + text);
    return false;
  }

  serverInit() {
    if (!this.have(24)) return false;
    const nameLen = this.u32(20);
    if (nameLen > 4096) { this.fail('bad ServerInit'); return false; }
    if (!this.have(24 + nameLen)) return false;
    const bpp = this.u8(4);
    const trueColour = this.u8(7);
    this.bigEndian = this.u8(6) !== 0;
    this.shift = { r: this.u8(14), g: this.u8(15), b: this.u8(16) };
    this.max = { r: this.u16(8), g: this.u16(10), b: this.u16(12) };
    const width = this.u16(0);
    const height = this.u16(2);
    this.take(24 + nameLen);
    if (bpp !== 32 || !trueColour) { this.fail('unsupported pixel format'); return false; }
    this.resize(width, height);
    // SetEncodings: Raw, DesktopSize.
    const enc = [2, 0, 0, 2];
    for (const e of [RAW, DESKTOP_SIZE]) enc.push((e >>> 24) & 255, (e >>> 16) & 255, (e >>> 8) & 255, e & 255);
    this.send(enc);
    this.request(false);
    this.step = this.message;
    this.onEvent('connected', `${width}x${height}`);
    return true;
  }

  resize(width, height) {
    if (width < 1 || height < 1 || width > MAX_SIDE || height > MAX_SIDE) {
      this.fail(`bad screen size ${width}x${height}`);
      return;
    }
    this.width = width;
    this.height = height;
    this.canvas.width = width;
    this.canvas.height = height;
    this.image = this.ctx.createImageData(width, height);
  }

  request(incremental) {
    const w = this.width;
    const h = this.height;
    this.send([3, incremental ? 1 : 0, 0, 0, 0, 0, w >> 8, w & 255, h >> 8, h & 255]);
  }

  message() {
    if (!this.have(1)) return false;
    switch (this.u8(0)) {
      case 0: // FramebufferUpdate
        if (!this.have(4)) return false;
        this.rects = this.u16(2);
        this.take(4);
        this.step = this.rect;
        return true;
      case 1: { // SetColourMapEntries: not asked for; skipped
        if (!this.have(6)) return false;
        const n = this.u16(4);
        if (!this.have(6 + 6 * n)) return false;
        this.take(6 + 6 * n);
        return true;
      }
      case 2: // Bell
        this.take(1);
        return true;
      case 3: { // ServerCutText: not shown
        if (!this.have(8)) return false;
        const len = this.u32(4);
        if (len > MAX_CUT_TEXT) { this.fail('cut text too long'); return false; }
        if (!this.have(8 + len)) return false;
        this.take(8 + len);
        return true;
      }
      default:
        this.fail(`unknown server message ${this.u8(0)}`);
        return false;
    }
  }

  rect() {
    if (this.rects === 0) {
      this.step = this.message;
      this.request(true);
      this.onEvent('frame');
      return true;
    }
    if (!this.have(12)) return false;
    const x = this.u16(0);
    const y = this.u16(2);
    const w = this.u16(4);
    const h = this.u16(6);
    const encoding = this.i32(8);
    if (encoding === DESKTOP_SIZE) {
      this.take(12);
      this.rects -= 1;
      this.resize(w, h);
      return true;
    }
    if (encoding !== RAW) { this.fail(`unasked encoding ${encoding}`); return false; }
    if (x + w > this.width || y + h > this.height) { this.fail('rectangle outside the screen'); return false; }
    if (!this.have(12 + w * h * 4)) return false;
    this.take(12);
    this.drawRaw(x, y, w, h);
    this.take(w * h * 4);
    this.rects -= 1;
    return true;
  }

  drawRaw(x, y, w, h) {
    const px = this.image.data;
    const src = this.buf;
    const { r: rs, g: gs, b: bs } = this.shift;
    const scale = (max) => (max === 255 ? 1 : 255 / max);
    const [rk, gk, bk] = [scale(this.max.r), scale(this.max.g), scale(this.max.b)];
    let at = this.start;
    for (let row = 0; row < h; row += 1) {
      let out = ((y + row) * this.width + x) * 4;
      for (let col = 0; col < w; col += 1) {
        const v = this.bigEndian
          ? ((src[at] << 24) | (src[at + 1] << 16) | (src[at + 2] << 8) | src[at + 3]) >>> 0
          : ((src[at + 3] << 24) | (src[at + 2] << 16) | (src[at + 1] << 8) | src[at]) >>> 0;
        px[out] = ((v >>> rs) & this.max.r) * rk;
        px[out + 1] = ((v >>> gs) & this.max.g) * gk;
        px[out + 2] = ((v >>> bs) & this.max.b) * bk;
        px[out + 3] = 255;
        at += 4;
        out += 4;
      }
    }
    this.ctx.putImageData(this.image, 0, 0, x, y, w, h);
  }

  pointer(x, y, buttons) {
    if (this.step !== this.message && this.step !== this.rect) return;
    const cx = Math.max(0, Math.min(this.width - 1, Math.floor(x)));
    const cy = Math.max(0, Math.min(this.height - 1, Math.floor(y)));
    this.send([5, buttons, cx >> 8, cx & 255, cy >> 8, cy & 255]);
  }

  key(sym, down) {
    if (this.step !== this.message && this.step !== this.rect) return;
    this.send([4, down ? 1 : 0, 0, 0, (sym >>> 24) & 255, (sym >>> 16) & 255, (sym >>> 8) & 255, sym & 255]);
  }
}

// A profile's colour for the host's status bar: the same name always gets the same hue.
function colourOf(name) {
  let hash = 0;
  for (const c of name) hash = (hash * 31 + c.codePointAt(0)) >>> 0;
  return `hsl(${hash % 360} 65% 45%)`;
}

const phone = {
  profiles: [],
  viewing: null,
  session: null,
};

function el(id) { return document.getElementById(id); }

function notice(text) {
  const n = el('notice');
  n.textContent = text || '';
  n.hidden = !text;
}

async function api(method, path) {
  const r = await fetch(path, { method, headers: { Accept: 'application/json' } });
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error((body && body.error) || `${method} ${path}: ${r.status}`);
  return body;
}

function renderStatus(p) {
  const bar = el('status-bar');
  el('status-name').textContent = p ? p.name : 'no profile in the foreground';
  el('status-state').textContent = p ? p.state : '';
  el('status-dot').style.background = p ? colourOf(p.name) : '#888';
  bar.style.background = p ? colourOf(p.name) : '#333';
  bar.dataset.profile = p ? p.name : '';
}

function renderSwitcher() {
  const nav = el('switcher');
  nav.replaceChildren(...phone.profiles.map((p) => {
    const b = document.createElement('button');
    b.type = 'button';
    b.dataset.profile = p.name;
    b.setAttribute('aria-pressed', String(p.foreground));
    b.style.borderLeft = `6px solid ${colourOf(p.name)}`;
    const name = document.createElement('span');
    name.textContent = p.name;
    const badge = document.createElement('span');
    badge.className = `badge ${p.state}`;
    badge.dataset.state = p.state;
    badge.textContent = p.state;
    b.append(name, badge);
    b.addEventListener('click', () => switchTo(p.name));
    return b;
  }));
}

function view(p) {
  // An offloaded profile's screen is its twin's, relayed by the daemon.
  if (!p || !p.spec.screen || !['running', 'paused', 'offloaded'].includes(p.state)) {
    if (phone.session) phone.session.close();
    phone.session = null;
    phone.viewing = null;
    document.body.dataset.viewing = '';
    if (!p) notice('No profile is in the foreground.');
    else if (!p.spec.screen) notice(`${p.name} has no screen (screen = true in its spec).`);
    else notice(`${p.name} is ${p.state}.`);
    return;
  }
  if (phone.viewing === p.name && phone.session && !phone.session.closed) return;
  if (phone.session) phone.session.close();
  phone.viewing = p.name;
  document.body.dataset.viewing = '';
  notice(`Connecting to ${p.name}...`);
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const url = `${scheme}//${location.host}/v1/profiles/${encodeURIComponent(p.name)}/screen`;
  const session = new RfbSession(url, el('screen'), (what, detail) => {
    if (session !== phone.session) return;
    if (what === 'frame') {
      notice('');
      document.body.dataset.viewing = p.name;
    } else if (what === 'closed') {
      document.body.dataset.viewing = '';
      notice(`${p.name}: ${detail}.`);
      phone.viewing = null;
      setTimeout(refresh, 1000);
    }
  });
  phone.session = session;
}

async function refresh() {
  try {
    phone.profiles = await api('GET', '/v1/profiles');
  } catch (e) {
    notice(`Cannot read the profiles: ${e.message}`);
    return;
  }
  const fg = phone.profiles.find((p) => p.foreground) || null;
  renderStatus(fg);
  renderSwitcher();
  view(fg);
}

async function switchTo(name) {
  try {
    await api('POST', `/v1/profiles/${encodeURIComponent(name)}/switch`);
  } catch (e) {
    notice(`Cannot switch to ${name}: ${e.message}`);
  }
  refresh();
}

function screenPoint(e) {
  const c = el('screen');
  const r = c.getBoundingClientRect();
  return [(e.clientX - r.left) * (c.width / r.width), (e.clientY - r.top) * (c.height / r.height)];
}

function wireInput() {
  const c = el('screen');
  c.addEventListener('pointerdown', (e) => {
    c.focus();
    c.setPointerCapture(e.pointerId);
    if (phone.session) phone.session.pointer(...screenPoint(e), 1);
    e.preventDefault();
  });
  c.addEventListener('pointermove', (e) => {
    if (phone.session && (e.buttons & 1)) phone.session.pointer(...screenPoint(e), 1);
  });
  const up = (e) => {
    if (phone.session) phone.session.pointer(...screenPoint(e), 0);
  };
  c.addEventListener('pointerup', up);
  c.addEventListener('pointercancel', up);
  for (const [type, down] of [['keydown', true], ['keyup', false]]) {
    c.addEventListener(type, (e) => {
      const sym = keysym(e);
      if (sym === null || !phone.session) return;
      phone.session.key(sym, down);
      e.preventDefault();
    });
  }
}

function watchEvents() {
  const events = new EventSource('/v1/events/stream');
  events.addEventListener('lifecycle', () => refresh());
  events.onerror = () => setTimeout(refresh, 1000);
}

document.addEventListener('DOMContentLoaded', () => {
  wireInput();
  refresh();
  watchEvents();
});
