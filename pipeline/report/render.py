"""Write the report: markdown from a Jinja2 template, the plots next to it, and one
self-contained HTML file rendered from that same markdown by markdown-it-py, every image
embedded as a ``data:`` URI."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import jinja2
from markdown_it import MarkdownIt
from markupsafe import Markup

from pipeline.report import plots as report_plots
from pipeline.report import views
from pipeline.report.collect import ReportData

TEMPLATES = Path(__file__).parent / "templates"
PLOTS = "plots"


def _environment(autoescape: bool) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=autoescape,
    )


def render_markdown(data: ReportData, plots: dict[str, str]) -> str:
    """The report as markdown. ``plots`` maps "loss_curves", "expert_load" and (when the
    profile ran) "profile_<name>" to image paths relative to the markdown file."""
    sources = views.source_tables(data)
    context = {
        "title": data.title,
        "missing": data.missing(),
        "MISSING": views.MISSING,
        "model": views.model_table(data.model, data),
        "domains": views.domain_table(data),
        "sources": sources,
        "skipped": {k: [views.esc(s) for s in (m.skipped if m else [])] for k, m in data.mixtures.items()},
        "training": views.training_table(data),
        "plots": plots,
        "evals": views.eval_table(data) if any(e is not None for e in data.evals.values()) else None,
        "eval_missing": [k for k, v in data.evals.items() if v is None],
        "quant": views.quant_table(data),
        "quant_sentence": views.quant_sentence(data),
        "profile": data.profile,
        "profile_tables": views.profile_tables(data),
        "profile_sentences": views.profile_sentences(data),
        "profile_plots": {k.removeprefix("profile_"): v for k, v in plots.items() if k.startswith("profile_")},
        "experts": views.expert_table(data),
        "runs": views.runs_table(data),
        "scaling": views.scaling_view(data),
    }
    env = _environment(autoescape=False)
    env.filters["esc"] = views.esc
    text = env.get_template("report.md.j2").render(context)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _markdown_parser() -> MarkdownIt:
    # Raw HTML off: every tag in the page comes from the renderer, none from input files.
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def data_uri(path: Path) -> str:
    """The PNG at ``path`` as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def markdown_to_html(markdown: str, base_dir: Path, title: str) -> str:
    """A self-contained HTML page of ``markdown``: images it references by a path
    relative to ``base_dir`` are embedded as data URIs.

    Raises ValueError for an image that is not a local file under ``base_dir`` (a remote
    or absolute source would make the page depend on something outside it)."""
    md = _markdown_parser()
    base = Path(base_dir).resolve()

    def image(self, tokens, idx, options, env):
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        path = (base / src).resolve()
        if "://" in src or src.startswith(("/", "data:")) or not path.is_relative_to(base) or not path.is_file():
            raise ValueError(f"image {src!r}: not a file under {base}; the HTML report embeds local images only")
        token.attrSet("src", data_uri(path))
        return self.image(tokens, idx, options, env)

    md.add_render_rule("image", image)
    body = md.render(markdown)
    page = _environment(autoescape=True).get_template("report.html.j2")
    return page.render(title=title, body=Markup(body))  # the renderer's output is HTML already


def write_plots(data: ReportData, plot_dir: Path) -> dict[str, Path]:
    """Draw the loss curves and the expert-load heatmaps and copy the profile's plots into
    ``plot_dir``; returns name -> written file."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = {"loss_curves": plot_dir / "loss_curves.png", "expert_load": plot_dir / "expert_load.png"}
    report_plots.plot_loss_curves(data.training, written["loss_curves"])
    loads = {k: (None if run is None else (run.expert_load_LE or [])) for k, run in data.training.items()}
    report_plots.plot_expert_load(loads, written["expert_load"])
    if data.profile is not None:
        for name, src in data.profile.plots.items():
            dst = plot_dir / f"profile_{name}.png"
            shutil.copyfile(src, dst)
            written[f"profile_{name}"] = dst
    if data.scaling is not None and data.scaling.figure is not None:
        written["scaling_fit"] = plot_dir / "scaling_fit.png"
        shutil.copyfile(data.scaling.figure, written["scaling_fit"])
    return written


def write_report(data: ReportData, out_dir: Path) -> dict:
    """Write ``out_dir/report.md``, ``out_dir/plots/*.png`` and the self-contained
    ``out_dir/report.html`` (the same markdown rendered, images embedded).

    Returns ``{"markdown": path, "html": path, "plots": [paths], "missing": [...]}``
    where ``missing`` names the parts whose stage has not run (``"eval/midtrain"``,
    ``"profile"``, ...). Raises OSError when a file cannot be written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = write_plots(data, out_dir / PLOTS)
    relative = {name: f"{PLOTS}/{path.name}" for name, path in written.items()}
    markdown = render_markdown(data, relative)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(markdown)
    html_path.write_text(markdown_to_html(markdown, out_dir, data.title))
    return {
        "markdown": str(md_path),
        "html": str(html_path),
        "plots": [str(p) for p in written.values()],
        "missing": data.missing(),
    }
