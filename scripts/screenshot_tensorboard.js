// A screenshot of TensorBoard's Time Series dashboard, taken once every chart has drawn its lines: how
// docs/images/watching-tensorboard.png was made (docs/watching.md#the-demo). Needs Debian's chromium and
// playwright-core from npm (`npm install playwright-core@1`, not a project dependency). A fixed
// --virtual-time-budget is not enough: the charts draw after their data arrives, at no fixed time. Usage:
//   tensorboard --logdir demo/study/tensorboard --port 6123 --host 127.0.0.1 &
//   node scripts/screenshot_tensorboard.js 'http://127.0.0.1:6123/?forceSVG=true&smoothing=0&tagFilter=...#timeseries' out.png
// forceSVG: headless Chromium without a GPU draws TensorBoard's WebGL charts empty.
const { chromium } = require('playwright-core');
(async () => {
  const [url, out] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 1500, height: 630 } });
  await page.goto(url);
  await page.waitForSelector('scalar-card', { timeout: 60000 });
  await page.click('button[aria-label="Toggle settings side pane"]');  // open on a first visit: close it
  // at least a path per run of the demo's twelve in every chart (the axes and grid add a few)
  await page.waitForFunction(() => {
    const cards = [...document.querySelectorAll('scalar-card')];
    return cards.length > 0 && cards.every(c => c.querySelectorAll('line-chart svg path').length >= 12);
  }, null, { timeout: 90000, polling: 500 });
  const counts = await page.evaluate(() => [...document.querySelectorAll('scalar-card')].map(c => c.querySelectorAll('line-chart svg path').length));
  console.log('paths per card', counts);
  await page.waitForTimeout(3000);
  await page.screenshot({ path: out });
  await browser.close();
})();
