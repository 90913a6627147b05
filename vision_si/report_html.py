"""Building blocks of report.html: escaping, tables, embedded images and plots, the page shell.

Everything here returns HTML text that is safe to concatenate: values are escaped by `esc` unless
they are `Raw` (HTML built here). Images are embedded as data URIs, and the page's
Content-Security-Policy forbids every load that is not inline, so a report works offline and a
string that slipped through escaping still could not run a script (only the page's own check,
allowed by its hash).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from pathlib import Path
from typing import Any


class Raw(str):
    """HTML built here, already safe; every other value put in a page is escaped."""


def esc(value: Any) -> str:
    return value if isinstance(value, Raw) else html.escape(str(value), quote=True)


def na(what: str) -> Raw:
    return Raw(f'<p class="na">Not available: {esc(what)}.</p>')


def num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def with_ci(value: Any, ci: Any) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"{num(value)} [{num(ci[0])}, {num(ci[1])}]"
    return num(value)


def table(header: list[Any], rows: list[list[Any]], cls: str = "", row_cls: list[str] | None = None) -> Raw:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        rc = f' class="{row_cls[i]}"' if row_cls and row_cls[i] else ""
        body.append(f"<tr{rc}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    return Raw(f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def img(data: bytes | None, alt: str, cls: str = "", title: str = "") -> Raw:
    if not data:
        return na(f"image {alt}")
    mime = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
    b64 = base64.b64encode(data).decode("ascii")
    t = f' title="{esc(title)}"' if title else ""
    return Raw(f'<img class="{cls}" alt="{esc(alt)}"{t} src="data:{mime};base64,{b64}">')


def image_bytes(path: Path, max_px: int | None = None) -> bytes | None:
    """A PNG/JPEG file as bytes, re-encoded as a PNG thumbnail when `max_px` is given; None if unreadable."""
    try:
        if max_px is None and path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            return path.read_bytes()
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB") if im.mode not in ("L", "RGB", "RGBA") else im.copy()
            im.thumbnail((max_px or 1024, max_px or 1024))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()
    except (OSError, ValueError):
        return None


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y")


def delta(a: Any, b: Any) -> Raw:
    try:
        d = float(b) - float(a)
    except (TypeError, ValueError):
        return Raw("–")
    cls = "up" if d > 0 else "down" if d < 0 else ""
    return Raw(f'<span class="{cls}">{d:+.3f}</span>')


def confusion_table(cm: list[list[Any]], classes: list[str]) -> Raw:
    head = "".join(f"<th>{esc(c)}</th>" for c in classes)
    rows = []
    for i, row in enumerate(cm):
        total = sum(row) or 1
        cells = "".join(f'<td style="background:rgba(37,99,235,{v / total:.2f});'
                        f'color:{"#fff" if v / total > 0.55 else "inherit"}">{esc(v)}</td>' for v in row)
        label = classes[i] if i < len(classes) else i
        rows.append(f"<tr><th>{esc(label)}</th>{cells}</tr>")
    return Raw(f'<table class="cm"><thead><tr><th>true \\ predicted</th>{head}</tr></thead>'
               f'<tbody>{"".join(rows)}</tbody></table>')


def pair(left: str, right: str) -> str:
    return f'<div class="pair"><div>{left}</div><div>{right}</div></div>'


def recall_plot(series: list[tuple[str, dict]], classes: list[str], ylabel: str) -> bytes | None:
    """Recall per class with its interval, one colour per series (e.g. baseline and final)."""
    if not classes or not any(points for _, points in series):
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.5, 1.2 * len(classes) + 1.5), 3.0))
    ax = fig.add_subplot()
    colors = ("#94a3b8", "#2563eb", "#16a34a")
    for j, (label, points) in enumerate(series):
        ks = [k for k, c in enumerate(classes) if c in points]
        ys = [points[classes[k]][0] for k in ks]
        err = [[y - points[classes[k]][1] for k, y in zip(ks, ys, strict=True)],
               [points[classes[k]][2] - y for k, y in zip(ks, ys, strict=True)]]
        offset = (j - (len(series) - 1) / 2) * 0.22
        ax.errorbar([k + offset for k in ks], ys, yerr=[[max(0.0, e) for e in row] for row in err], fmt="o",
                    color=colors[j % len(colors)], capsize=3, label=label)
    ax.set_xticks(range(len(classes)), [c if len(c) <= 14 else c[:13] + "…" for c in classes])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return figure_png(fig)


def decision_badge(decision: Any) -> Raw:
    if not decision:
        return Raw('<span class="pill warn">not run</span>')
    cls = {"accepted": "ok", "rejected": "bad"}.get(str(decision), "warn")
    return Raw(f'<span class="pill {cls}">{esc(decision)}</span>')


def is_float(value: Any) -> bool:
    try:
        float(value)
        return "." in str(value)
    except (TypeError, ValueError):
        return False


# Marks the page once every image has decoded; the browser test reads it from the rendered DOM.
CHECK_SCRIPT = ("(function(){function check(){var ok=true,im=document.images;for(var i=0;i<im.length;i++)"
                "{if(!(im[i].complete&&im[i].naturalWidth>0))ok=false;}document.body.dataset.imagesOk=String(ok);"
                "document.body.dataset.images=String(im.length);}"
                "if(document.readyState==='complete')check();else window.addEventListener('load',check);})();")


CSS = """
*{box-sizing:border-box}body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:#1e293b;background:#f1f5f9}header{background:#0f172a;color:#f8fafc;padding:24px 32px}
header h1{margin:0 0 4px;font-size:24px}header .meta{color:#cbd5e1;margin:0}nav{margin-top:12px}
nav a{color:#93c5fd;margin-right:14px;text-decoration:none;font-size:14px}main{max-width:1100px;margin:0 auto;
padding:16px 24px 48px}section{background:#fff;border-radius:10px;padding:18px 24px;margin:18px 0;
box-shadow:0 1px 3px rgba(15,23,42,.08)}h2{margin:0 0 12px;font-size:20px;border-bottom:2px solid #e2e8f0;
padding-bottom:6px}h3{font-size:16px;margin:18px 0 8px}h4{font-size:14px;margin:12px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:14px}th,td{padding:4px 10px;border-bottom:1px solid #e2e8f0;
text-align:left}thead th{background:#f8fafc;font-weight:600}table.num td{font-variant-numeric:tabular-nums}
table.cm td{text-align:center;min-width:48px}tr.weak td{background:#fef3c7}.na{color:#64748b;font-style:italic}
.note{background:#eff6ff;border-left:4px solid #3b82f6;padding:8px 12px;border-radius:4px}
.badge{display:inline-block;padding:8px 14px;border-radius:8px;font-size:16px}.badge.ok{background:#dcfce7;
color:#166534}.badge.bad{background:#fee2e2;color:#991b1b}.badge.warn{background:#fef9c3;color:#854d0e}
.pill{display:inline-block;padding:1px 10px;border-radius:999px;font-size:13px;font-weight:600}
.pill.ok{background:#dcfce7;color:#166534}.pill.bad{background:#fee2e2;color:#991b1b}
.pill.warn{background:#fef9c3;color:#854d0e}.up{color:#15803d}.down{color:#b91c1c}
.pair{display:flex;flex-wrap:wrap;gap:24px}.pair>div{flex:1 1 480px;min-width:0;overflow-x:auto}
.stack img.plot{max-width:100%}table.cm thead th{font-size:12px;max-width:110px;overflow-wrap:anywhere}
.small{font-size:13px;color:#475569}.card{border:1px solid #e2e8f0;border-radius:8px;padding:8px 16px;margin:10px 0}
img{max-width:100%}img.plot{width:100%;max-width:560px;height:auto}.gallery{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:104px;text-align:center}figure img{width:96px;height:96px;object-fit:contain;
image-rendering:pixelated;background:#0f172a;border-radius:4px}.gallery.wide figure{width:48%;min-width:320px}
.gallery.wide figure img{width:100%;height:auto;image-rendering:auto;background:none}
figcaption{font-size:11px;color:#475569;overflow-wrap:anywhere}.count{color:#64748b;font-weight:400}
.groups{display:flex;flex-wrap:wrap;gap:4px 32px}.group{margin-bottom:10px}.bar{height:12px;background:#3b82f6;border-radius:3px;min-width:2px}
table.timings{width:100%;max-width:760px}table.timings td:last-child{width:60%}.cards{display:flex;gap:12px;flex-wrap:wrap;margin-top:14px}
.kpi{background:#1e293b;border-radius:8px;padding:8px 14px}.kpi b{display:block;font-size:20px}
"""



def page(title: str, header: str, sections: list[tuple[str, str, str]], footer: str) -> str:
    """The whole document; `sections` are (id, title, HTML body)."""
    script_hash = base64.b64encode(hashlib.sha256(CHECK_SCRIPT.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    body = "".join(f'<section id="{esc(sid)}"><h2>{esc(name)}</h2>{content}</section>'
                   for sid, name, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{header}<main>{body}"
            f'<p class="na">{esc(footer)}</p></main><script>{CHECK_SCRIPT}</script></body></html>\n')
