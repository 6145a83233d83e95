"""The one HTML page of `vdit serve` (vdit/serve.py): a form, a progress bar, the video, recent
results. Plain HTML + JavaScript, no external assets (it works offline and on loopback only).
Element ids the browser test relies on: prompt, negative, image, frames, size, steps, guidance,
seed, generate, error, progress, phase, result (a <video>), download, recent.
The guidance box shows the model's default as a placeholder and is sent only when filled in: the
server then uses the run's own guidance (a two-expert model's guidance_2 for its low-noise
expert), which one number in the box could not say."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vdit</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
 header { background: #1d2330; color: #fff; padding: 12px 24px; font-size: 20px; }
 header small { color: #9aa4b8; font-size: 13px; margin-left: 12px; }
 main { display: grid; grid-template-columns: 360px 1fr; gap: 24px; padding: 24px; }
 section { background: #fff; border-radius: 8px; padding: 16px 20px; box-shadow: 0 1px 3px #0002; }
 label { display: block; font-size: 13px; color: #4a5368; margin-top: 10px; }
 input, textarea { width: 100%; box-sizing: border-box; padding: 6px 8px; font-size: 14px;
                   border: 1px solid #c8cdd8; border-radius: 4px; }
 textarea { height: 64px; resize: vertical; }
 .row { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
 button { margin-top: 16px; width: 100%; padding: 10px; font-size: 15px; background: #3b6fe0;
          color: #fff; border: 0; border-radius: 4px; cursor: pointer; }
 #error { color: #b3261e; background: #fdecea; border-radius: 4px; padding: 8px; margin-top: 12px;
          display: none; white-space: pre-wrap; }
 progress { width: 100%; height: 18px; }
 video { max-width: 100%; min-width: 256px; image-rendering: pixelated; background: #000;
         display: block; margin-top: 12px; }
 #recent li { margin: 4px 0; font-size: 14px; }
 .muted { color: #6b7386; font-size: 13px; }
</style></head>
<body>
<header>vdit <small id="model"></small></header>
<main>
<section>
 <form id="form">
  <label for="prompt">Prompt</label>
  <textarea id="prompt" placeholder="a red circle moving right"></textarea>
  <label for="negative">Negative prompt</label>
  <input id="negative" placeholder="(optional)">
  <label for="image">First image (optional: image-to-video)</label>
  <input id="image" type="file" accept="image/*">
  <div class="row">
   <div><label for="frames">Frames (1 + 4k)</label><input id="frames" type="number"></div>
   <div><label for="size">Size (HxW)</label><input id="size"></div>
  </div>
  <div class="row">
   <div><label for="steps">Steps</label><input id="steps" type="number"></div>
   <div><label for="guidance">Guidance</label><input id="guidance" type="number" step="0.1"></div>
  </div>
  <label for="seed">Seed</label><input id="seed" type="number" value="0">
  <button id="generate" type="submit">Generate</button>
  <div id="error"></div>
 </form>
</section>
<section>
 <div><progress id="progress" max="1" value="0"></progress></div>
 <div id="phase" class="muted">idle</div>
 <video id="result" controls loop muted autoplay playsinline></video>
 <p><a id="download" href="#" download style="display:none">Download video</a></p>
 <h3>Recent results</h3>
 <ul id="recent"></ul>
</section>
</main>
<script>
const $ = (id) => document.getElementById(id);
function showError(message) { const e = $("error"); e.textContent = message;
  e.style.display = message ? "block" : "none"; }
async function loadInfo() {
  const info = await (await fetch("/api/jobs")).json();
  $("model").textContent = "model: " + info.model;
  const d = info.defaults;
  if (!$("frames").value && d.frames) $("frames").value = d.frames;
  if (!$("size").value && d.height) $("size").value = d.height + "x" + d.width;
  if (!$("steps").value && d.steps) $("steps").value = d.steps;
  // a placeholder, not a value: an untouched box is not sent (the run's own guidance applies)
  if (d.guidance !== undefined) $("guidance").placeholder = "default " + d.guidance +
    (d.guidance_2 !== undefined ? " / " + d.guidance_2 + " (low noise)" : "");
  renderRecent(info.jobs);
}
function renderRecent(jobs) {
  const ul = $("recent"); ul.innerHTML = "";
  for (const j of jobs) {
    const li = document.createElement("li");
    const text = "#" + j.id + " " + JSON.stringify(j.prompt) + " " + j.frames + "f " + j.size +
                 " seed " + j.seed + " - " + (j.state === "error" ? "error: " + j.error : j.state);
    if (j.video) { const a = document.createElement("a"); a.href = j.video; a.textContent = text;
      a.onclick = (ev) => { ev.preventDefault(); show(j); }; li.appendChild(a); }
    else li.textContent = text;
    ul.appendChild(li);
  }
}
function show(job) {
  $("result").src = job.video; $("result").play().catch(() => {});
  const a = $("download"); a.href = job.video; a.download = "vdit-" + job.id + ".mp4";
  a.style.display = "inline";
}
function readImage() {
  const file = $("image").files[0];
  if (!file) return Promise.resolve("");
  return new Promise((resolve, reject) => { const r = new FileReader();
    r.onload = () => resolve(r.result); r.onerror = () => reject(r.error); r.readAsDataURL(file); });
}
async function poll(id) {
  const job = await (await fetch("/api/jobs/" + id)).json();
  $("progress").value = job.progress;
  $("phase").textContent = job.state === "queued" ? "queued (" + job.position + " ahead)"
                         : job.phase + " " + Math.round(100 * job.progress) + "%";
  if (job.state === "done") { show(job); $("phase").textContent = "done in " + job.seconds + " s";
    loadInfo(); return; }
  if (job.state === "error") { showError(job.error); loadInfo(); return; }
  setTimeout(() => poll(id), 300);
}
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault(); showError("");
  let image;
  try { image = await readImage(); } catch (e) { showError("first image: " + e); return; }
  const body = { prompt: $("prompt").value, negative_prompt: $("negative").value, image,
                 frames: $("frames").value, size: $("size").value, steps: $("steps").value,
                 seed: $("seed").value };
  if ($("guidance").value !== "") body.guidance = $("guidance").value;
  const res = await fetch("/api/generate", { method: "POST", body: JSON.stringify(body),
                                             headers: { "Content-Type": "application/json" } });
  const out = await res.json();
  if (!res.ok) { showError(out.error); return; }
  $("progress").value = 0; $("phase").textContent = "queued"; loadInfo(); poll(out.id);
});
loadInfo();
</script>
</body></html>
"""
