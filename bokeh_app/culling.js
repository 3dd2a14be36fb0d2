// Draw only the bars and segments in view (loaded after BokehJS, before any document is shown).
//
// BokehJS 3.x paints EVERY bar of a VBar/HBar/Quad (LRTB glyphs) and every Segment on each
// repaint, in view or not: only markers, circles and patches narrow their indices to the viewport
// (their views have a `_mask_data`). A 10,000-candle chart shows ~120 candles but painted
// 3 x 10,000 bars and 10,000 wicks per frame. This gives those two glyph views the same
// kind of `_mask_data` markers have: the glyph's own spatial index (data coordinates, already
// built for hit testing) queried with the plot's frame. What is in view is drawn exactly as
// before; what is not is skipped. Upstream: bokeh/bokeh#13332 (the same idea, for all glyphs).
//
// Guarded: a BokehJS without these modules, or whose views already narrow their indices, is left
// alone (tests/test_dashboard_browser.py fails if the views are not patched).
(function () {
  "use strict";
  const bokeh = window.Bokeh;
  if (bokeh == null || typeof bokeh.require !== "function") {
    return;
  }
  // The frame, widened by MARGIN screen pixels (a bar's outline and anti-aliasing reach past
  // its data extent), in data coordinates; the glyph's spatial index gives what meets it. The
  // same query BokehJS's markers make.
  const MARGIN = 20;
  function in_view() {
    const {x_target, y_target} = this.renderer.plot_view.frame;
    const xs = x_target.widen(MARGIN).map((sx) => this.renderer.xscale.invert(sx));
    const ys = y_target.widen(MARGIN).map((sy) => this.renderer.yscale.invert(sy));
    return this.index.indices({x0: xs.start, x1: xs.end, y0: ys.start, y1: ys.end});
  }
  const views = [["models/glyphs/lrtb", "LRTBView"], ["models/glyphs/segment", "SegmentView"]];
  for (const [module, name] of views) {
    let view = null;
    try {
      view = bokeh.require(module)[name];
    } catch (error) {
      console.warn(`tcp: no ${module} in this BokehJS; its glyphs are drawn whole`, error);
      continue;
    }
    if (view != null && view.prototype._mask_data == null) {
      view.prototype._mask_data = in_view;
      view.prototype._tcp_culled = true;
    }
  }
})();
