/* Line charts in SVG, drawn by hand (no library: the dashboard works offline and ships no third-party code).
   A chart is one <path> per series, so 2,000 points per series is one attribute of ~30 KB, not 2,000 elements;
   a hover readout finds the nearest step by binary search. Classic script: it fills window.LoraDashboard.charts. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  // The drawing's units are the SVG's CSS pixels when it is laid out (text keeps its size at any width; a window
  // resize redraws), else 720 wide; the height is fixed.
  var DEFAULT_WIDTH = 720, MIN_WIDTH = 320, HEIGHT = 240;
  // The left margin is each chart's own: the widest tick label plus the rotated axis name (leftMargin).
  var MARGIN = { top: 28, right: 16, bottom: 34 };
  var MIN_LEFT = 48, CHAR_WIDTH = 6.5; // CHAR_WIDTH: an 11 px tick label's character, where none can be measured

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var key in attrs) node.setAttribute(key, attrs[key]);
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, content, cls, anchor) {
    var node = el("text", { x: x, y: y, "class": cls, "text-anchor": anchor || "start" }, parent);
    node.textContent = content;
    return node;
  }

  /* Ticks at 1, 2 or 5 x 10^k, about `count` of them, covering [lo, hi] (Heckbert's "nice numbers"), no closer
     than `minStep` (1 for steps: no tick between two steps). */
  function niceTicks(lo, hi, count, minStep) {
    if (!(hi > lo)) {
      var pad = Math.max(minStep || 0, lo === 0 ? 1 : Math.abs(lo) * 0.1);
      lo -= pad;
      hi += pad;
    }
    var raw = (hi - lo) / Math.max(1, count);
    var power = Math.pow(10, Math.floor(Math.log10(raw)));
    var fraction = raw / power;
    var step = Math.max(minStep || 0, (fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10) * power);
    var first = Math.floor(lo / step) * step, last = Math.ceil(hi / step) * step;
    var ticks = [];
    for (var i = 0, v = first; v <= last + step / 2 && i < 50; i++, v = first + i * step) ticks.push(v);
    return { lo: first, hi: last, step: step, ticks: ticks };
  }

  /* A tick label with as many decimals as the step needs; 1e-4 style for learning rates. */
  function formatTick(value, step) {
    if (value === 0) return "0";
    var magnitude = Math.abs(value);
    if (magnitude < 1e-3 || magnitude >= 1e6) {
      var digits = Math.max(0, Math.min(3, Math.ceil(-Math.log10(step / magnitude) - 1e-9)));
      return value.toExponential(digits).replace(/\.?0+e/, "e").replace("e+", "e");
    }
    if (magnitude >= 1000 && step >= 1000) return (value / 1000).toFixed(step >= 10000 ? 0 : 1).replace(/\.0$/, "") + "k";
    var decimals = Math.max(0, Math.ceil(-Math.log10(step) - 1e-9));
    return value.toFixed(Math.min(decimals, 8));
  }

  /* A value in the readout: four significant digits. */
  function formatValue(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    var magnitude = Math.abs(value);
    if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e6)) return value.toExponential(3).replace(/\.?0+e/, "e");
    return String(Number(value.toPrecision(4)));
  }

  function finite(value) {
    return typeof value === "number" && isFinite(value);
  }

  function extent(series) {
    var lo = Infinity, hi = -Infinity;
    series.forEach(function (s) {
      for (var i = 0; i < s.y.length; i++) {
        var v = s.y[i];
        if (finite(v)) {
          if (v < lo) lo = v;
          if (v > hi) hi = v;
        }
      }
    });
    return lo === Infinity ? null : [lo, hi];
  }

  /* The path of one line; a missing value (null, NaN) breaks it. A lone point (the first step, or one between
     gaps) is a zero-length segment, which the round line cap draws as a dot. */
  function linePath(xs, ys, sx, sy) {
    var parts = [], run = 0;
    for (var i = 0; i <= xs.length; i++) {
      if (i === xs.length || !finite(ys[i])) {
        if (run === 1) parts.push("h0");
        run = 0;
        continue;
      }
      parts.push((run ? "L" : "M") + sx(xs[i]).toFixed(1) + " " + sy(ys[i]).toFixed(1));
      run++;
    }
    return parts.join("");
  }

  /* Dots as arcs in one path: validation points, a few dozen, still one element. */
  function dotsPath(xs, ys, sx, sy, radius) {
    var parts = [];
    for (var i = 0; i < xs.length; i++) {
      if (!finite(ys[i])) continue;
      var x = sx(xs[i]) - radius, y = sy(ys[i]);
      parts.push("M" + x.toFixed(1) + " " + y.toFixed(1) + "a" + radius + " " + radius + " 0 1 0 " + 2 * radius +
        " 0a" + radius + " " + radius + " 0 1 0 " + -2 * radius + " 0");
    }
    return parts.join("");
  }

  function countFinite(ys) {
    var n = 0;
    for (var i = 0; i < ys.length; i++) if (finite(ys[i])) n++;
    return n;
  }

  /* The nearest index of `steps` (ascending) to `step`. */
  function nearest(steps, step) {
    var lo = 0, hi = steps.length - 1;
    while (hi - lo > 1) {
      var mid = (lo + hi) >> 1;
      if (steps[mid] < step) lo = mid;
      else hi = mid;
    }
    return Math.abs(steps[hi] - step) < Math.abs(steps[lo] - step) ? hi : lo;
  }

  /* Room for the y tick labels (end 6 units left of the axis) and, left of them, the rotated axis name
     (centred on x = 14, ~12 units tall): measured where the SVG is laid out, else estimated. */
  function leftMargin(svg, tickLabels) {
    var probe = text(svg, 0, 0, "", "tick", "start"), widest = 0;
    tickLabels.forEach(function (label) {
      probe.textContent = label;
      widest = Math.max(widest, probe.getComputedTextLength() || label.length * CHAR_WIDTH);
    });
    svg.removeChild(probe);
    return Math.max(MIN_LEFT, Math.ceil(widest) + 30);
  }

  function drawAxes(svg, frame, xAxis, yAxis, sx, sy, labels) {
    var grid = [], axes = el("g", { "class": "axes" }, svg);
    var x0 = frame.left, x1 = frame.width - MARGIN.right, y0 = HEIGHT - MARGIN.bottom, y1 = MARGIN.top;
    yAxis.ticks.forEach(function (v, i) {
      var y = sy(v).toFixed(1);
      grid.push("M" + x0 + " " + y + "H" + x1);
      text(axes, x0 - 6, +y + 4, frame.yTicks[i], "tick", "end");
    });
    xAxis.ticks.forEach(function (v) {
      var x = sx(v).toFixed(1);
      grid.push("M" + x + " " + y1 + "V" + y0);
      text(axes, +x, y0 + 16, formatTick(v, xAxis.step), "tick", "middle");
    });
    el("path", { d: grid.join(""), "class": "grid" }, axes);
    el("path", { d: "M" + x0 + " " + y1 + "V" + y0 + "H" + x1, "class": "axis" }, axes);
    text(axes, (x0 + x1) / 2, HEIGHT - 4, labels.x, "label", "middle");
    var yLabel = text(axes, 0, 0, labels.y, "label", "middle");
    yLabel.setAttribute("transform", "translate(14 " + (y0 + y1) / 2 + ") rotate(-90)");
  }

  function drawLegend(svg, width, series) {
    var legend = el("g", { "class": "legend" }, svg), x = width - MARGIN.right;
    for (var i = series.length - 1; i >= 0; i--) {
      var s = series[i];
      var label = text(legend, x, 14, s.label, "legend-label", "end");
      // Measured where the SVG is laid out; estimated (~6.5 units a character) in a hidden one.
      x -= (label.getComputedTextLength() || s.label.length * 6.5) + 6;
      var mark = s.style === "dots"
        ? el("circle", { cx: x - 6, cy: 10, r: 3 }, legend)
        : el("path", { d: "M" + (x - 14) + " 10h14" }, legend);
      mark.setAttribute("class", "series " + s.cls + (s.style === "dots" ? " dots" : ""));
      x -= 24;
    }
  }

  function installReadout(svg) {
    if (svg.__readout) return;
    svg.__readout = true;
    svg.addEventListener("mousemove", function (event) {
      svg.__pointer = event.clientX;
      showReadout(svg);
    });
    svg.addEventListener("mouseleave", function () {
      svg.__pointer = null;
      var hover = svg.querySelector("g.hover");
      if (hover) hover.setAttribute("visibility", "hidden");
    });
  }

  /* The readout at the pointer's step (kept where it was when new data redraws the chart under it). */
  function showReadout(svg) {
    var chart = svg.__chart, hover = svg.querySelector("g.hover");
    if (!chart || !hover || svg.__pointer === null || svg.__pointer === undefined) return;
    var box = svg.getBoundingClientRect();
    var x = (svg.__pointer - box.left) * chart.width / box.width;
    var i = nearest(chart.steps, chart.invert(x));
    var lines = ["step " + chart.steps[i]];
    chart.series.forEach(function (s) {
      var j = s.x === chart.steps ? i : nearest(s.x, chart.steps[i]);
      if (s.x[j] === chart.steps[i] && finite(s.y[j])) lines.push(s.label + " " + formatValue(s.y[j]));
    });
    var px = chart.sx(chart.steps[i]);
    hover.querySelector("path").setAttribute("d", "M" + px.toFixed(1) + " " + MARGIN.top + "V" + (HEIGHT - MARGIN.bottom));
    var label = hover.querySelector("text");
    label.textContent = lines.join("  ·  ");
    var right = px > (chart.width + chart.left) / 2;
    label.setAttribute("x", (right ? px - 6 : px + 6).toFixed(1));
    label.setAttribute("text-anchor", right ? "end" : "start");
    hover.setAttribute("visibility", "visible");
  }

  /* Draws `series` (each {label, x: steps, y: values, cls, style: "line" | "dots"}) into `svg`, replacing
     what it held. Returns the number of finite points of the first series. */
  function lineChart(svg, series, labels) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var width = Math.max(MIN_WIDTH, Math.round(svg.getBoundingClientRect().width) || DEFAULT_WIDTH);
    svg.setAttribute("viewBox", "0 0 " + width + " " + HEIGHT);
    svg.__redraw = function () { lineChart(svg, series, labels); };
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", labels.y + " against " + labels.x);
    var range = extent(series), steps = series.length ? series[0].x : [];
    if (!range || !steps.length) {
      text(svg, width / 2, HEIGHT / 2, labels.empty || "No data yet", "empty", "middle");
      svg.__chart = null;
      return 0;
    }
    var xAxis = niceTicks(steps[0], steps[steps.length - 1], 8, 1), yAxis = niceTicks(range[0], range[1], 5);
    var yTicks = yAxis.ticks.map(function (v) { return formatTick(v, yAxis.step); });
    var left = leftMargin(svg, yTicks);
    var plotW = width - left - MARGIN.right, plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
    var sx = function (v) { return left + (v - xAxis.lo) / (xAxis.hi - xAxis.lo) * plotW; };
    var sy = function (v) { return HEIGHT - MARGIN.bottom - (v - yAxis.lo) / (yAxis.hi - yAxis.lo) * plotH; };
    drawAxes(svg, { width: width, left: left, yTicks: yTicks }, xAxis, yAxis, sx, sy, labels);
    var plot = el("g", { "class": "plot" }, svg);
    series.forEach(function (s) {
      var d = s.style === "dots" ? dotsPath(s.x, s.y, sx, sy, 3) : linePath(s.x, s.y, sx, sy);
      el("path", { d: d, "class": "series " + s.cls + (s.style === "dots" ? " dots" : "") }, plot);
    });
    drawLegend(svg, width, series);
    var hover = el("g", { "class": "hover", visibility: "hidden" }, svg);
    el("path", { "class": "cursor" }, hover);
    el("text", { y: MARGIN.top - 6, "class": "readout" }, hover);
    svg.__chart = {
      steps: steps, series: series, sx: sx, width: width, left: left,
      invert: function (px) { return xAxis.lo + (px - left) / plotW * (xAxis.hi - xAxis.lo); }
    };
    installReadout(svg);
    showReadout(svg);
    return countFinite(series[0].y);
  }

  /* A resize redraws the charts at their new width, once per frame. */
  var resizePending = false;
  window.addEventListener("resize", function () {
    if (resizePending) return;
    resizePending = true;
    window.requestAnimationFrame(function () {
      resizePending = false;
      Array.prototype.forEach.call(document.querySelectorAll("svg"), function (svg) {
        if (svg.__redraw) svg.__redraw();
      });
    });
  });

  /* The loss: raw (faint, thin), smoothed (bold), validation (dots). data-points = raw points drawn. */
  function loss(svg, metrics) {
    var series = [
      { label: "loss", x: metrics.steps, y: metrics.loss, cls: "raw" },
      { label: "smoothed", x: metrics.steps, y: metrics.loss_smoothed, cls: "smoothed" }
    ];
    if (metrics.validation_steps && metrics.validation_steps.length) {
      series.push({ label: "validation", x: metrics.validation_steps, y: metrics.validation_loss, cls: "validation",
        style: "dots" });
    }
    var points = lineChart(svg, series, { x: "step", y: "loss", empty: "No loss recorded yet" });
    svg.setAttribute("data-points", String(points));
    return points;
  }

  function lr(svg, metrics) {
    return lineChart(svg, [{ label: "learning rate", x: metrics.steps, y: metrics.lr, cls: "lr" }],
      { x: "step", y: "learning rate", empty: "No learning rate recorded yet" });
  }

  function grad(svg, metrics) {
    return lineChart(svg, [{ label: "gradient norm", x: metrics.steps, y: metrics.grad_norm, cls: "grad" }],
      { x: "step", y: "gradient norm", empty: "No gradient norm recorded yet" });
  }

  var root = window.LoraDashboard = window.LoraDashboard || {};
  root.charts = {
    lineChart: lineChart, loss: loss, lr: lr, grad: grad,
    niceTicks: niceTicks, formatTick: formatTick, formatValue: formatValue
  };
})();
