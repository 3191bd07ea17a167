/* One job's view: the web dashboard's job page and the MCP App (server/dashboard_app.py inlines this file) both
   call LoraDashboard.renderJob(root, view, hooks) with a JobView (server/dashboard_views.py) each time it changes.
   The first call builds the skeleton in `root`; later calls update it in place, so a re-render every few seconds
   keeps the page still: sample images already shown stay (no flicker, no refetch; a failed one is tried again),
   the log keeps its scroll.
   All data goes in through textContent and attributes, never innerHTML. Classic script (no modules, no build). */
(function () {
  "use strict";
  var LD = window.LoraDashboard = window.LoraDashboard || {};

  /* h("p", {class: "x", hidden: true}, [child, "text"]): an element; a child string becomes a text node. */
  function h(tag, attrs, children) {
    var node = document.createElement(tag);
    for (var key in attrs || {}) {
      var value = attrs[key];
      if (value === false || value === null || value === undefined) continue;
      node.setAttribute(key, value === true ? "" : String(value));
    }
    (children || []).forEach(function (child) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function svg(id) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    node.setAttribute("id", id);
    node.setAttribute("class", "chart");
    return node;
  }

  /* Sets a node's text only when it differs (no needless layout, and a selection in it survives). */
  function setText(node, value) {
    value = value === null || value === undefined ? "" : String(value);
    if (node.textContent !== value) node.textContent = value;
  }

  /* Seconds in human units: "45 s", "3 min 20 s", "2 h 5 min", "1 d 3 h". */
  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    var s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    var m = Math.floor(s / 60);
    if (m < 60) return m + " min" + (s % 60 ? " " + (s % 60) + " s" : "");
    var hours = Math.floor(m / 60);
    if (hours < 24) return hours + " h" + (m % 60 ? " " + (m % 60) + " min" : "");
    return Math.floor(hours / 24) + " d" + (hours % 24 ? " " + (hours % 24) + " h" : "");
  }

  /* CUDA ids as "GPU 0, 1"; "cpu" as it is; none as "–". */
  function devices(list) {
    if (!list || !list.length) return "–";
    var ids = list.filter(function (d) { return /^\d+$/.test(d); });
    var others = list.filter(function (d) { return !/^\d+$/.test(d); });
    return (ids.length ? ["GPU " + ids.join(", ")] : []).concat(others).join(", ");
  }

  /* "42.0 % · 420 / 1000" for a JobRow ("step 0" for a job that does not know its total yet). */
  function progressText(row) {
    var steps = row.total_steps ? row.step + " / " + row.total_steps : "step " + row.step;
    return (row.percent === null || row.percent === undefined ? "" : row.percent.toFixed(1) + " % · ") + steps;
  }

  /* Makes `nodes` the children of `parent`, touching the DOM only when they differ: an action button is there
     only while its action is allowed (hidden is not enough for a selector). */
  function setChildren(parent, nodes) {
    var same = parent.children.length === nodes.length && nodes.every(function (node, i) {
      return parent.children[i] === node;
    });
    if (!same) parent.replaceChildren.apply(parent, nodes);
  }

  /* A <progress> showing `percent` (indeterminate without one, as for a queued job). */
  function setProgress(bar, percent) {
    if (percent === null || percent === undefined) {
      bar.removeAttribute("value");
    } else {
      bar.value = Math.max(0, Math.min(100, percent));
    }
  }

  function formatNumber(value) {
    return value === null || value === undefined ? null : LD.charts.formatValue(value);
  }

  function build(root) {
    var parts = {
      title: h("h1", { "class": "job-title" }),
      jobId: h("p", { "class": "job-id muted" }),
      state: h("span", { id: "state", "class": "badge" }),
      phase: h("span", { id: "phase", "class": "muted" }),
      devices: h("span", { id: "devices", title: "devices the job holds" }),
      bar: h("progress", { max: "100" }),
      progressText: h("span", { "class": "progress-text" }),
      eta: h("span", { id: "eta", "class": "eta" }),
      error: h("p", { id: "error", "class": "error", hidden: true }),
      stop: h("button", { id: "stop", type: "button" }, ["Stop"]),
      resume: h("button", { id: "resume", type: "button" }, ["Resume"]),
      actions: h("p", { "class": "actions" }),
      actionError: h("span", { id: "action-error", "class": "error", role: "alert" }),
      facts: h("dl", { id: "facts", "class": "facts" }),
      loss: svg("loss-chart"),
      lr: svg("lr-chart"),
      grad: svg("grad-chart"),
      samplesHead: h("tr"),
      samplesBody: h("tbody"),
      samplesEmpty: h("p", { "class": "muted" }, ["No samples yet."]),
      findings: h("ul", { id: "findings", "class": "findings" }),
      log: h("pre", { id: "log", "class": "log" }),
      config: h("pre", { id: "config", "class": "config" }),
      cells: {}, rows: {}, chartKey: null, headKey: null, findingsKey: null, factsKey: null
    };
    parts.samples = h("table", { id: "samples", "class": "samples" }, [h("thead", {}, [parts.samplesHead]),
      parts.samplesBody]);
    parts.sections = {
      charts: h("section", { "class": "charts" }, [h("h2", {}, ["Loss"]), parts.loss,
        h("div", { "class": "chart-pair" }, [
          h("div", {}, [h("h2", {}, ["Learning rate"]), parts.lr]),
          h("div", {}, [h("h2", {}, ["Gradient norm"]), parts.grad])])]),
      samples: h("section", {}, [h("h2", {}, ["Samples ", h("small", { "class": "muted" }, ["(newest step first)"])]),
        parts.samplesEmpty, h("div", { "class": "samples-scroll" },
        [parts.samples])]),
      findings: h("section", {}, [h("h2", {}, ["Diagnosis"]), parts.findings])
    };
    var head = h("section", { "class": "job-head" }, [
      parts.title, parts.jobId,
      h("p", { "class": "status-line" }, [parts.state, " ", parts.phase, " ", parts.devices]),
      h("div", { id: "progress", "class": "progress" }, [parts.bar, parts.progressText, parts.eta]),
      parts.error,
      parts.actions,
      parts.facts
    ]);
    [head, parts.sections.charts, parts.sections.samples, parts.sections.findings].concat([
      h("section", {}, [h("h2", {}, ["Log"]), parts.log]),
      h("section", {}, [h("h2", {}, ["Config"]), parts.config])
    ]).forEach(function (section) { root.appendChild(section); });
    return parts;
  }

  /* The button runs its hook once at a time; a refused action says why next to the buttons. */
  function bindAction(button, parts, run) {
    button.addEventListener("click", function () {
      button.disabled = true;
      setText(parts.actionError, "");
      Promise.resolve()
        .then(run)
        .catch(function (error) { setText(parts.actionError, error && error.message ? error.message : String(error)); })
        .then(function () { button.disabled = false; });
    });
  }

  function renderHead(parts, view) {
    var status = view.status, row = view.row;
    setText(parts.title, row.config_name);
    setText(parts.jobId, row.kind + " job " + row.job_id);
    setText(parts.state, row.state);
    parts.state.className = "badge state-" + row.state;
    setText(parts.phase, status.state === "running" && status.phase ? status.phase : "");
    setText(parts.devices, row.devices && row.devices.length ? devices(row.devices) : "");
    setProgress(parts.bar, row.percent);
    setText(parts.progressText, progressText(row));
    setText(parts.eta, row.eta_s === null || row.eta_s === undefined ? "" : "ETA " + duration(row.eta_s));
    setText(parts.error, row.error || "");
    parts.error.hidden = !row.error;
    setChildren(parts.actions, [row.can_stop && parts.stop, row.can_resume && parts.resume, parts.actionError]
      .filter(Boolean));
    renderFacts(parts, status);
  }

  function renderFacts(parts, status) {
    var facts = [
      ["loss (smoothed)", formatNumber(status.loss)],
      ["learning rate", formatNumber(status.lr)],
      ["gradient norm", formatNumber(status.grad_norm)],
      ["speed", status.it_per_s ? formatNumber(status.it_per_s) + " it/s" : null],
      ["waits for", status.waits_for],
      ["last checkpoint", status.last_checkpoint],
      ["LoRA", status.exported_lora || status.lora_path]
    ].filter(function (fact) { return fact[1] !== null && fact[1] !== undefined && fact[1] !== ""; });
    var key = JSON.stringify(facts);
    if (key === parts.factsKey) return;
    parts.factsKey = key;
    parts.facts.replaceChildren.apply(parts.facts, facts.reduce(function (nodes, fact) {
      return nodes.concat([h("dt", {}, [fact[0]]), h("dd", {}, [String(fact[1])])]);
    }, []));
  }

  function renderCharts(parts, metrics) {
    var n = metrics.steps.length;
    var key = [n, metrics.steps[n - 1], metrics.total_points, metrics.validation_steps.length,
      metrics.loss_smoothed[n - 1]].join(":");
    if (key === parts.chartKey) return;
    parts.chartKey = key;
    LD.charts.loss(parts.loss, metrics);
    LD.charts.lr(parts.lr, metrics);
    LD.charts.grad(parts.grad, metrics);
  }

  /* The prompts' columns, in prompt order, from the cells (each cell names its prompt). */
  function columnsOf(samples) {
    var byIndex = {};
    samples.forEach(function (cell) {
      if (!byIndex[cell.prompt_index]) byIndex[cell.prompt_index] = { index: cell.prompt_index, prompt: cell.prompt,
        control: cell.control };
    });
    return Object.keys(byIndex).map(Number).sort(function (a, b) { return a - b; })
      .map(function (i) { return byIndex[i]; });
  }

  function renderSampleHead(parts, columns) {
    var key = JSON.stringify(columns);
    if (key === parts.headKey) return;
    parts.headKey = key;
    parts.samplesHead.replaceChildren.apply(parts.samplesHead, [h("th", { scope: "col" }, ["step"])].concat(
      columns.map(function (c) {
        return h("th", { scope: "col", title: c.prompt, "class": c.control ? "control" : null,
          "data-prompt-index": c.index }, c.control ? [h("span", { "class": "tag" }, ["control"]), " ", c.prompt]
          : [c.prompt]);
      })));
  }

  function sampleRow(parts, step) {
    var row = parts.rows[step];
    if (!row) {
      row = h("tr", { "data-step": step }, [h("th", { scope: "row" }, [String(step)])]);
      // The newest step on top, where a run being watched adds its samples: a new row goes before the first
      // row of an earlier step.
      var earlier = Array.prototype.find.call(parts.samplesBody.children, function (tr) {
        return Number(tr.getAttribute("data-step")) < step;
      });
      parts.samplesBody.insertBefore(row, earlier || null);
    }
    return row;
  }

  /* Asks hooks.sampleSrc for the cell's image: `attempt` (1, 2, ...) lets a URL change when the same file is
     loaded again (a failed load, a re-rendered sample), so no cache answers with the old image. */
  function loadSample(td, filename, hooks) {
    var img = td.firstChild, attempt = td.__attempt = (td.__attempt || 0) + 1;
    td.__failed = false;
    td.classList.remove("failed");
    Promise.resolve()
      .then(function () { return hooks.sampleSrc(filename, attempt); })
      .then(function (src) { if (td.__attempt === attempt) img.src = src; })
      .catch(function () { if (td.__attempt === attempt) markFailed(td); });
  }

  function markFailed(td) {
    td.__failed = true;
    td.classList.add("failed");
  }

  /* A cell per file, made once; one that failed to load tries again at the next render (each second or few
     while the job runs), one marked `redo` (see renderSamples) loads afresh once the job is back at its step. */
  function sampleCell(parts, cell, hooks, jobStep) {
    var td = parts.cells[cell.filename];
    if (td) {
      if (td.__failed || (td.__redo && jobStep >= cell.step)) {
        td.__redo = false;
        loadSample(td, cell.filename, hooks);
      }
      return td;
    }
    var img = h("img", { "class": "sample", alt: "step " + cell.step + ": " + cell.prompt, title: cell.prompt,
      decoding: "async" });
    td = h("td", { "class": cell.control ? "control" : null, "data-prompt-index": cell.prompt_index,
      "data-step": cell.step }, [img]);
    img.addEventListener("click", function () { openLightbox(img, "step " + cell.step + " · " + cell.prompt); });
    img.addEventListener("error", function () { markFailed(td); });
    loadSample(td, cell.filename, hooks);
    return td;
  }

  /* The grid holds exactly the view's samples: rows and cells no longer in it go (a resume drops the samples
     past its checkpoint from the index), new ones are made, a row's cells are put in column order (moving a
     node keeps its image). A resume redoes the steps after its checkpoint and renders their samples again under
     the same file names: when the job's step goes back, the cells past it are marked `redo`, so one still listed
     when the job is past its step again (the new image, in case no render saw it gone) is loaded afresh. */
  function renderSamples(parts, view, hooks) {
    var samples = view.samples, jobStep = view.row.step;
    if (jobStep < parts.jobStep) {
      Object.keys(parts.cells).forEach(function (key) {
        var td = parts.cells[key];
        if (Number(td.getAttribute("data-step")) > jobStep) td.__redo = true;
      });
    }
    parts.jobStep = jobStep;
    var columns = columnsOf(samples);
    renderSampleHead(parts, columns);
    parts.samplesEmpty.hidden = samples.length > 0;
    parts.samples.hidden = samples.length === 0;
    var steps = {}, rows = {}, cells = {};
    samples.forEach(function (cell) { (steps[cell.step] = steps[cell.step] || {})[cell.prompt_index] = cell; });
    Object.keys(steps).forEach(function (step) {
      var row = rows[step] = sampleRow(parts, Number(step));
      setChildren(row, [row.firstChild].concat(columns.map(function (column) {
        var cell = steps[step][column.index];
        var key = cell ? cell.filename : step + ":" + column.index + ":empty";
        return cells[key] = cell ? sampleCell(parts, cell, hooks, jobStep) : parts.cells[key] || h("td", {
          "class": "missing" });
      })));
    });
    Object.keys(parts.rows).forEach(function (step) { if (!rows[step]) parts.rows[step].remove(); });
    parts.rows = rows;
    parts.cells = cells;
  }

  function renderFindings(parts, findings) {
    var key = JSON.stringify(findings);
    if (key === parts.findingsKey) return;
    parts.findingsKey = key;
    if (!findings.length) {
      parts.findings.replaceChildren(h("li", { "class": "muted" }, ["No findings."]));
      return;
    }
    parts.findings.replaceChildren.apply(parts.findings, findings.map(function (f) {
      var fix = Object.keys(f.patch || {}).map(function (name) { return name + ": " + JSON.stringify(f.patch[name]); });
      return h("li", { "class": "finding severity-" + f.severity, "data-rule": f.rule }, [
        h("span", { "class": "badge" }, [f.severity]), " ", h("strong", {}, [f.rule]), " ", f.message,
        fix.length ? h("p", { "class": "fix" }, ["Fix: " + fix.join(", ")])
          : h("p", { "class": "fix muted" }, ["No config change fixes it."])
      ]);
    }));
  }

  /* The log's end stays in view, unless the reader scrolled up to read. */
  function renderLog(parts, text) {
    var log = parts.log, atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 8 || !log.textContent;
    setText(log, text);
    if (atEnd) log.scrollTop = log.scrollHeight;
  }

  /* The one lightbox of the document: a click or Escape closes it. */
  function lightbox() {
    var box = document.getElementById("lightbox");
    if (box) return box;
    box = h("div", { id: "lightbox", role: "dialog", "aria-modal": "true", hidden: true },
      [h("figure", {}, [h("img", { alt: "" }), h("figcaption")])]);
    box.addEventListener("click", closeLightbox);
    box.querySelector("img").addEventListener("load", fitLightbox);
    window.addEventListener("resize", fitLightbox);
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape") closeLightbox();
    });
    document.body.appendChild(box);
    return box;
  }

  function openLightbox(img, caption) {
    if (!img.naturalWidth) return; // not loaded (or failed): nothing to enlarge
    var box = lightbox(), big = box.querySelector("img");
    big.src = img.src;
    big.alt = caption;
    setText(box.querySelector("figcaption"), caption);
    box.hidden = false;
    fitLightbox();
  }

  /* The image scaled to 90 % of the viewport's width or 80 % of its height (the caption goes below), up as well
     as down: a 64 px sample fills the screen, its pixels drawn as sharp squares (pixelated) rather than a blur. */
  function fitLightbox() {
    var box = document.getElementById("lightbox"), big = box && box.querySelector("img");
    if (!big || box.hidden || !big.naturalWidth) return; // not decoded yet: its load event fits it
    var scale = Math.min(window.innerWidth * 0.9 / big.naturalWidth, window.innerHeight * 0.8 / big.naturalHeight);
    big.style.width = Math.floor(big.naturalWidth * scale) + "px";
    big.style.height = Math.floor(big.naturalHeight * scale) + "px";
    big.classList.toggle("pixelated", scale > 1);
  }

  function closeLightbox() {
    var box = document.getElementById("lightbox");
    if (box) box.hidden = true;
  }

  /* Renders `view` (a JobView) into `root`, which becomes #job. hooks: {sampleSrc(filename, attempt) -> Promise<url>,
     stop() -> Promise, resume() -> Promise}; the caller re-renders with a fresh view after an action. */
  function renderJob(root, view, hooks) {
    var parts = root.__job;
    if (!parts) {
      root.id = "job";
      parts = root.__job = build(root);
      parts.hooks = hooks;
      bindAction(parts.stop, parts, function () { return parts.hooks.stop(); });
      bindAction(parts.resume, parts, function () { return parts.hooks.resume(); });
      lightbox();
    }
    parts.hooks = hooks;
    if (root.getAttribute("data-job-id") !== view.row.job_id) {
      // Another job (the App shows the one a later call names): its samples have the same file names.
      parts.samplesBody.replaceChildren();
      parts.rows = {};
      parts.cells = {};
      parts.jobStep = undefined;
    }
    root.setAttribute("data-job-id", view.row.job_id);
    root.setAttribute("data-state", view.row.state);
    renderHead(parts, view);
    // Charts and a diagnosis are a training job's; a generation job has samples too.
    var training = view.row.kind === "training";
    parts.sections.charts.hidden = parts.sections.findings.hidden = !training;
    parts.sections.samples.hidden = !training && !view.samples.length;
    if (training) {
      renderCharts(parts, view.metrics);
      renderFindings(parts, view.findings);
    }
    renderSamples(parts, view, hooks);
    renderLog(parts, view.log_tail);
    setText(parts.config, view.config_yaml || "(no config)");
    root.setAttribute("data-rendered", String(Number(root.getAttribute("data-rendered") || 0) + 1));
  }

  LD.renderJob = renderJob;
  LD.dom = { h: h, setText: setText, setChildren: setChildren, setProgress: setProgress };
  LD.format = { duration: duration, devices: devices, progress: progressText };
})();
