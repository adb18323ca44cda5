// Drives the browser phone in Debian's headless chromium through playwright-core (run by
// tests/phone_browser.rs): opens the page, reads the screen's and the status bar's pixels
// from screenshots, clicks the switcher and times the other profile's first frame, taps a
// tile and types a key. Prints one JSON object; the Rust test judges it.
'use strict';

const { chromium } = require('playwright-core');

const [url, executablePath, other, tileX, tileY] = process.argv.slice(2);

// Colours at page points of a PNG screenshot, decoded by the browser itself (a blank page).
async function colours(browser, png, points) {
  const page = await browser.newPage();
  const result = await page.evaluate(async ({ b64, points }) => {
    const img = new Image();
    img.src = `data:image/png;base64,${b64}`;
    await img.decode();
    const c = document.createElement('canvas');
    c.width = img.width;
    c.height = img.height;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    return points.map(([x, y]) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3)));
  }, { b64: png.toString('base64'), points });
  await page.close();
  return result;
}

// What the phone shows now: the screen's colours at framebuffer points, the status bar's
// text, its colour on screen and the colour the page gave it.
async function look(browser, page) {
  const canvas = page.locator('#screen');
  const box = await canvas.boundingBox();
  const fb = await canvas.evaluate((c) => [c.width, c.height]);
  const at = ([fx, fy]) => [
    Math.floor(box.x + ((fx + 0.5) * box.width) / fb[0]),
    Math.floor(box.y + ((fy + 0.5) * box.height) / fb[1]),
  ];
  const bar = await page.locator('#status-bar').boundingBox();
  const shot = await page.screenshot();
  const [corner, header, barPixel] = await colours(browser, shot, [
    at([fb[0] - 3, fb[1] - 3]),
    at([fb[0] - 3, 2]),
    [Math.floor(bar.x + bar.width * 0.6), Math.floor(bar.y + 3)],
  ]);
  const barCss = await page.locator('#status-bar').evaluate((b) => getComputedStyle(b).backgroundColor);
  const name = await page.locator('#status-name').textContent();
  const badges = await page.locator('#switcher .badge').evaluateAll((bs) =>
    bs.map((b) => [b.parentElement.dataset.profile, b.dataset.state]));
  return { fb, corner, header, bar_pixel: barPixel, bar_css: barCss, status: name, badges };
}

(async () => {
  const browser = await chromium.launch({ executablePath, headless: true, args: ['--no-sandbox'] });
  const out = {};
  try {
    const page = await browser.newPage({ viewport: { width: 480, height: 1000 } });
    page.on('console', (m) => console.error(`page console: ${m.text()}`));
    await page.goto(url);
    out.address = page.url();
    await page.waitForSelector('body[data-viewing]:not([data-viewing=""])', { timeout: 30000 });
    out.first = await page.locator('body').getAttribute('data-viewing');
    out.before = await look(browser, page);

    const t0 = Date.now();
    await page.click(`#switcher button[data-profile="${other}"]`);
    await page.waitForSelector(`body[data-viewing="${other}"]`, { timeout: 10000 });
    out.switch_ms = Date.now() - t0;
    out.after = await look(browser, page);

    const canvas = page.locator('#screen');
    const box = await canvas.boundingBox();
    const fb = out.after.fb;
    const x = box.x + ((Number(tileX) + 0.5) * box.width) / fb[0];
    const y = box.y + ((Number(tileY) + 0.5) * box.height) / fb[1];
    await page.mouse.click(x, y);
    await page.keyboard.press('a');
    // The events leave the page before the browser closes.
    await page.waitForTimeout(300);
    out.tapped = true;
  } finally {
    console.log(JSON.stringify(out));
    await browser.close();
  }
})().catch((e) => {
  console.error(`phone_browser.js: ${e.stack || e}`);
  process.exit(1);
});
