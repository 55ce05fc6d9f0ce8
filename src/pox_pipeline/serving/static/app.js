// Upload a photo to /explain and show the answer, its probabilities and the Grad-CAM map;
// a photo unlike the training photos gets the guard's message instead of a label.
"use strict";

const EXPLAIN_URL = new URL("../explain", window.location.href);
const OOD_MESSAGE =
  "This does not look like a skin photo like those the model was trained on, so the model " +
  "gives no answer for it. Please upload a clear, close photo of the skin lesion.";

const $ = (id) => document.getElementById(id);
const fileInput = $("file");
const dropZone = $("drop-zone");

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

function bar(name, probability, threshold, isAnswer) {
  const row = document.createElement("div");
  row.className = "bar-row" + (isAnswer ? " is-answer" : "");
  const label = document.createElement("span");
  label.className = "bar-name";
  label.textContent = name;
  const track = document.createElement("div");
  track.className = "bar-track";
  track.setAttribute("role", "meter");
  track.setAttribute("aria-label", `Probability of ${name}`);
  track.setAttribute("aria-valuemin", "0");
  track.setAttribute("aria-valuemax", "1");
  track.setAttribute("aria-valuenow", probability.toFixed(3));
  const fill = document.createElement("div");
  fill.className = "bar-fill";
  fill.style.width = percent(probability);
  track.appendChild(fill);
  if (threshold !== null) {
    const mark = document.createElement("div");
    mark.className = "bar-threshold";
    mark.style.left = percent(threshold);
    mark.title = `decision threshold ${percent(threshold)}`;
    track.appendChild(mark);
  }
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = percent(probability);
  row.append(label, track, value);
  return row;
}

function showResult(result) {
  const inDistribution = result.in_distribution !== false;
  $("label").textContent = inDistribution ? result.label : "No answer";
  $("ood").textContent = inDistribution ? "" : OOD_MESSAGE;
  $("ood").hidden = inDistribution;
  // Scores and a heatmap of an image unlike the training photos mean nothing: not shown.
  $("explanation").textContent = result.explanation || "";
  $("explanation").hidden = !inDistribution;
  $("heatmap-figure").hidden = !inDistribution;
  const bars = $("bars");
  bars.hidden = !inDistribution;
  bars.replaceChildren();
  // A rejected image's answer carries no probabilities (null).
  const classes = Object.keys(result.probabilities || {});
  // The threshold applies to the positive class: the first class of a binary model.
  const positive = classes.length === 2 && result.threshold !== null ? classes[0] : null;
  for (const name of classes) {
    const threshold = name === positive ? result.threshold : null;
    bars.appendChild(bar(name, result.probabilities[name], threshold, name === result.label));
  }
  const model = result.model;
  $("model-info").textContent =
    `Model ${model.name}:${model.version}` +
    (result.threshold !== null ? ` · decision threshold ${percent(result.threshold)}` : "");
  // null for an image the guard refused
  if (result.heatmap_png_base64) {
    $("heatmap").src = `data:image/png;base64,${result.heatmap_png_base64}`;
  }
  $("result").hidden = false;
  $("status").textContent = "Done.";
}

async function analyse(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  $("status").textContent = "Analysing the photo…";
  $("photo").src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("image", file, file.name);
  let response;
  try {
    response = await fetch(EXPLAIN_URL, { method: "POST", body: form });
  } catch (err) {
    showError(`The service could not be reached (${err.message}).`);
    return;
  }
  let body;
  try {
    body = await response.json();
  } catch (err) {
    showError(`The service answered ${response.status} without a readable reason.`);
    return;
  }
  if (!response.ok) {
    // Our own rejections are {"error": reason}; BentoML's are [{"error": reason}].
    const reason = (Array.isArray(body) ? body[0] : body).error || response.statusText;
    showError(`This photo could not be analysed: ${reason}`);
    return;
  }
  showResult(body);
}

fileInput.addEventListener("change", () => {
  if (fileInput.files.length) analyse(fileInput.files[0]);
});

for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    dropZone.classList.add("is-dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropZone.addEventListener(type, () => dropZone.classList.remove("is-dragging"));
}
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  if (file) analyse(file);
});
