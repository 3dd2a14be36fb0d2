"""The HTML page around a dashboard document: Bokeh's own page (``bokeh.core.templates.FILE``)
plus :file:`culling.js`, which makes BokehJS paint only the bars and wicks in view (a
10,000-candle chart shows ~120; BokehJS 3.x painted all of them on every frame: BENCHMARKS.md).
"""

from __future__ import annotations

from importlib.resources import files

from bokeh.core.templates import get_env
from jinja2 import Template

__all__ = ["CULLING_JS", "PAGE"]

#: The script, run once BokehJS is loaded and before any document is shown.
CULLING_JS = files("bokeh_app").joinpath("culling.js").read_text(encoding="utf-8")

#: The page template of every dashboard document (``doc.template``).
PAGE: Template = get_env().from_string(
    "{% extends base %}\n{% block postamble %}<script>{{ culling_js }}</script>{% endblock %}",
    globals={"culling_js": CULLING_JS},
)
