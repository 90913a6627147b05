"""report.html: one self-contained page that tells what a run did and whether it helped.

Everything the page shows is read back from the run directory (docs/internals.md), so the report
can be rebuilt at any time, also for a run that crashed half-way: each section that lacks its files
says "not available" instead of failing. The synthetic rounds are read as typed stage results
through `summary.read_rounds` (manifest rows, `FilterResult`, `GateDecision`), the reader
summary.json is written from, so the page and the summary cannot tell different stories. Images are embedded as data URIs and the page carries a
Content-Security-Policy that forbids every external load, so it works offline and cannot leak.
Every string from the run (class names, reasons, ids) is HTML-escaped.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

from vision_si.errors import RunDirError
from vision_si.filter import PRIORITY, REASONS, FilterResult
from vision_si.gate import GateDecision
from vision_si.metrics import wilson_interval
from vision_si.report_html import (
    Raw,
    confusion_table,
    decision_badge,
    delta,
    esc,
    image_bytes,
    img,
    is_float,
    na,
    num,
    page,
    pair,
    recall_plot,
    table,
    truthy,
    with_ci,
)
from vision_si.rundir import EventLog, atomic_write_text
from vision_si.summary import RoundRecord, read_rounds

GALLERY_CAP = 24  # thumbnails per (round, group); the counts are always complete
THUMB_PX = 128  # longest side of an embedded thumbnail
TABLE_CAP = 40  # rows shown of a long CSV table
REASON_ORDER = tuple(REASONS[name] for name in PRIORITY)  # the filter's own order: its reasons' priority


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_dict(path: Path) -> dict:
    value = load_json(path)
    return value if isinstance(value, dict) else {}


def load_csv(path: Path) -> list[dict[str, str]] | None:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, ValueError, csv.Error):
        return None


class RunView:
    """What the report needs from a run directory, each piece None/empty when missing."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.summary = load_dict(run_dir / "summary.json")
        self.env = load_dict(run_dir / "env.json")
        self.events = [e for e in EventLog(run_dir).read() if isinstance(e, dict)]
        test = self.summary.get("test")
        self.test = test if isinstance(test, dict) else load_dict(run_dir / "final" / "test.json")
        self.config = self._config()
        self.splits = load_csv(run_dir / "splits.csv") or []
        classes = self.summary.get("classes")
        self.classes = [str(c) for c in (classes if isinstance(classes, list) else self._classes_from_splits())]
        self.rounds = sorted(int(p.name[6:]) for p in run_dir.glob("round-[0-9][0-9]") if p.is_dir())
        self.records: dict[int, RoundRecord] = {rec.round: rec for rec in read_rounds(run_dir, strict=False)}

    def _config(self) -> dict:
        from vision_si.config import parse_yaml

        try:  # bounded like every YAML the package reads: a tampered config.yaml cannot blow up the report
            cfg = parse_yaml((self.dir / "config.yaml").read_text(encoding="utf-8"), "config.yaml")
            return cfg if isinstance(cfg, dict) else {}
        except (OSError, ValueError):
            return {}

    def _classes_from_splits(self) -> list[str]:
        return sorted({r.get("class", "") for r in self.splits} - {""})

    def round_dir(self, r: int) -> Path:
        return self.dir / f"round-{r:02d}"

    def name(self) -> str:
        return str(self.config.get("name") or self.dir.name)

    def date(self) -> str:
        started = self.env.get("started")
        if started:
            return str(started).replace("T", " ")
        try:
            return str(_dt.datetime.strptime(self.dir.name[:15], "%Y%m%d-%H%M%S"))
        except ValueError:
            return "unknown date"

    def gate(self, r: int) -> dict:
        """A round's gate decision in the shape the page draws, from its typed `GateDecision`."""
        rec = self.records.get(r)
        return gate_view(rec.gate) if rec is not None and rec.gate is not None else {}


def gate_view(dec: GateDecision) -> dict:
    out: dict[str, Any] = {"decision": dec.decision, "reason": dec.reason, "metric": dec.metric}
    for key in ("before", "after", "delta"):
        est = getattr(dec, key)
        out[key] = (est.value, est.ci)
    out["per_class"] = dec.per_class if isinstance(dec.per_class, dict) else {}
    out["details"] = {"min_delta": dec.min_delta, "margin": dec.margin, "admit": dec.admit,
                      "tolerance": dec.checks.get("recall", {}).get("tolerance"),
                      "tolerance_min_images": dec.checks.get("recall", {}).get("tolerance_min_images"),
                      "f1": dec.checks.get("macro_f1", {}), "n_judge": dec.n_judge, "n_select": dec.n_select,
                      "seeds": dec.seeds, "looks": [dataclasses.asdict(look) for look in dec.looks],
                      "method": dec.delta.method, "superiority": dec.superiority,
                      "non_inferiority": dec.non_inferiority, "regressions": dec.regressions,
                      "gate_enabled": dec.gate_enabled, "would_accept": dec.would_accept,
                      "calibration": dec.calibration}
    return out


# ---------------------------------------------------------------------------------------- sections
def section_data(run: RunView) -> str:
    ds = run.summary.get("dataset") or {}
    per_class = ds.get("per_class") or {}
    if not per_class and run.splits:
        per_class = {}
        for row in run.splits:
            per_class.setdefault(row.get("class", "?"), Counter())[row.get("split", "?")] += 1
    skipped = ds.get("skipped_images")
    if skipped is None:  # a run without summary.json yet: count the record itself
        skipped = len(load_csv(run.dir / "skipped_images.csv") or [])
    left_out = (f" · <b>{esc(skipped)}</b> image file(s) left out (bad, or duplicates; listed with the reason "
                "in skipped_images.csv)") if skipped else ""
    parts = [f'<p><b>Dataset</b> {esc(ds.get("name") or (run.config.get("data") or {}).get("source") or "unknown")}'
             f' · <b>{len(run.classes)}</b> classes · <b>{esc(ds.get("n_images", len(run.splits) or "?"))}</b>'
             f" real images, split once into train / val / test{left_out}.</p>"]
    if per_class:
        splits = ("train", "val", "test")
        rows = [[c, *[(per_class[c] or {}).get(s, 0) for s in splits]] for c in per_class]
        rows.append([Raw("<b>total</b>"), *[sum(int((per_class[c] or {}).get(s, 0)) for c in per_class) for s in splits]])
        parts.append(table(["class", *splits], rows, "num"))
    else:
        parts.append(na("per-class split counts (no summary.json or splits.csv)"))
    parts.append(eval_badge(run))
    return "".join(parts)


def eval_badge(run: RunView) -> str:
    n = run.summary.get("synthetic_in_eval_splits", run.test.get("synthetic_in_eval_splits"))
    if n is None:
        return '<p class="badge warn">Synthetic images in val/test: not recorded (the run did not finish).</p>'
    cls = "ok" if int(n) == 0 else "bad"
    return (f'<p class="badge {cls}">Synthetic images in val/test: <b>{esc(n)}</b> '
            f'{"(must be 0: held)" if cls == "ok" else "(must be 0: VIOLATED)"}</p>')


def section_test(run: RunView) -> str:
    base, final = run.test.get("baseline") or {}, run.test.get("final") or {}
    if not base and not final:
        return na("test results (the final evaluation has not run)")
    n_reads = sum(1 for e in run.events if e.get("event") == "test_evaluated")
    rows = [[label, with_ci(base.get(k), base.get(f"{k}_ci")), with_ci(final.get(k), final.get(f"{k}_ci")),
             delta(base.get(k), final.get(k))]
            for k, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                             ("macro_f1", "macro-F1"))]
    parts = [f'<p class="note">The <b>test</b> split is evaluated once, at the end, for this report; it never '
             f"drove a decision (gate and diagnosis use <b>val</b>). events.jsonl records {n_reads} test "
             f"evaluation(s). Intervals: {esc(run.test.get('ci_method') or 'bootstrap over test images')}.</p>",
             table(["metric", "baseline (round-0 model)", "final model", "Δ"], rows, "num")]
    effect = run.test.get("synthetic_effect")
    if effect:
        e_rows = [[m, with_ci(e.get("delta"), e.get("ci")), esc(e.get("method", ""))]
                  for m, e in effect.items() if isinstance(e, dict)]
        parts += [f"<h3>The accepted pool's own effect on test (round {effect.get('round')}'s paired gate models, "
                  f"{effect.get('seeds')} seeds)</h3>", table(["metric", "Δ candidate − baseline [interval]", "method"],
                                                              e_rows, "num")]
    pc_rows = []
    for c in run.classes or sorted(set(base.get("per_class", {})) | set(final.get("per_class", {}))):
        b, f = (base.get("per_class") or {}).get(c, {}), (final.get("per_class") or {}).get(c, {})
        pc_rows.append([c, b.get("support", "–"), *[x for m in ("recall", "precision", "f1")
                                                    for x in (num(b.get(m)), num(f.get(m)))]])
    if pc_rows:
        parts.append("<h3>Per class (baseline → final)</h3>")
        parts.append(table(["class", "support", "recall base", "recall final", "precision base",
                            "precision final", "F1 base", "F1 final"], pc_rows, "num"))
    return "".join(parts)


def before_after(run: RunView) -> tuple[int | None, int | None]:
    """The first and the last round that has a diagnosis (the round-0 model and the final one)."""
    diagnosed = [r for r in run.rounds if (run.round_dir(r) / "diagnose").is_dir()]
    return (diagnosed[0], diagnosed[-1]) if diagnosed else (None, None)


def section_confusion(run: RunView) -> str:
    parts = []
    cms = [(run.test.get(side) or {}).get("confusion") for side in ("baseline", "final")]
    if all(isinstance(cm, list) for cm in cms):
        parts.append("<h3>On test (rows: true class, shade: share of the row)</h3>")
        parts.append(pair(f"<h4>baseline</h4>{confusion_table(cms[0], run.classes)}",
                          f"<h4>final</h4>{confusion_table(cms[1], run.classes)}"))
    else:
        parts.append(na("confusion matrices on test"))

    def from_json(d: Path) -> str:
        cm = load_dict(d / "diagnosis.json").get("confusion")
        return confusion_table(cm, run.classes) if isinstance(cm, list) else na("confusion on val")

    parts.append(diagnosis_pair(run, "confusion.png", "confusion on val", from_json, stacked=True))
    return "".join(parts)


def diagnosis_pair(run: RunView, filename: str, what: str, fallback: Any, stacked: bool = False) -> str:
    """The round-0 model's diagnosis plot and the final model's (side by side, or one above the other
    for wide plots); `fallback(dir)` when the PNG is missing."""
    first, last = before_after(run)
    if first is None:
        return na(f"{what} (no diagnosis)")

    def one(r: int, note: str = "") -> str:
        d = run.round_dir(r) / "diagnose"
        body = img(image_bytes(d / filename), what, "plot") if (d / filename).is_file() else fallback(d)
        return f"<h4>round {r:02d}{esc(note)}</h4>{body}"

    if last == first:
        # one diagnosis only (no round accepted): show it under its own heading; a "not available"
        # placeholder beside or below it read as if round 00's own diagnosis were missing
        only = one(first, " (the only diagnosis: no later round was accepted)")
        return f"<h3>{esc(what.capitalize())}</h3>" + (f'<div class="stack">{only}</div>' if stacked else only)
    both = f'<div class="stack">{one(first)}{one(last)}</div>' if stacked else pair(one(first), one(last))
    return f"<h3>{esc(what.capitalize())}</h3>" + both


def test_recall(pc: dict) -> dict[str, tuple[float, float, float]]:
    out = {}
    for c, s in pc.items():
        if isinstance(s, dict) and s.get("recall") is not None:
            rec, n = float(s["recall"]), int(s.get("support") or 0)
            out[c] = (rec, *(wilson_interval(round(rec * n), n) if n else (rec, rec)))
    return out


def diagnosis_recall(diag: dict) -> dict[str, tuple[float, float, float]]:
    out = {}
    for s in diag.get("per_class") or []:
        ci = s.get("recall_ci") or [s.get("recall"), s.get("recall")]
        if s.get("recall") is not None:
            out[str(s.get("class_name"))] = (float(s["recall"]), float(ci[0]), float(ci[1]))
    return out


def section_recall(run: RunView) -> str:
    series = [(label, test_recall((run.test.get(side) or {}).get("per_class") or {}))
              for side, label in (("baseline", "baseline"), ("final", "final"))]
    plot = recall_plot(series, run.classes, "recall on test")
    parts = [f"<h3>On test, with 95% Wilson intervals</h3>{img(plot, 'per-class recall on test', 'plot')}" if plot
             else na("per-class recall on test")]

    def from_json(d: Path) -> str:
        png = recall_plot([("val", diagnosis_recall(load_dict(d / "diagnosis.json")))], run.classes,
                          "recall on val")
        return img(png, "per-class recall on val", "plot") if png else na("per-class recall on val")

    parts.append(diagnosis_pair(run, "recall.png", "recall on val", from_json))
    return "".join(parts)


def section_rounds(run: RunView) -> str:
    if not run.records:
        return na("synthetic rounds (the run stopped after round 00)")
    overview, cards = [], []
    for r, rec in sorted(run.records.items()):
        entry = rec.summary()  # the very numbers summary.json holds
        rejected = entry.get("rejected_by_filter") or {}
        g = run.gate(r)
        overview.append([f"{r:02d}", entry["generated"] if rec.manifest is not None else "–",
                         entry.get("accepted_by_filter", "–"),
                         ", ".join(f"{k} {v}" for k, v in rejected.items() if v) or "–",
                         decision_badge(g.get("decision"))])
        cards.append(gate_card(r, g))
    return "".join([table(["round", "generated", "accepted by filter", "rejected by filter", "gate"], overview),
                    "<h3>The gate's decision per round</h3>", *cards])


def _allowed_drop(value: Any) -> str:
    """The largest recall drop the gate allowed a class, shown as a negative Δ ('–' when unknown)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return num(-float(value))

def gate_card(r: int, g: dict) -> str:
    if not g:
        return f'<div class="card"><h4>Round {r:02d}</h4>{na("gate decision (gate/decision.json missing)")}</div>'
    metric, d = g.get("metric") or "metric", g.get("details") or {}
    rows = [[f"{metric} {k}", with_ci(*g[k]) if k in g else "–"] for k in ("before", "after", "delta")]
    pc = g.get("per_class") or {}
    regressions = set(d.get("regressions") or [])
    # "allowed drop" is absent from decisions written before gate.tolerance_min_images existed
    pc_rows = [[c, *[num(v.get(k)) for k in ("before", "after")], delta(v.get("before"), v.get("after")),
                _allowed_drop(v.get("allowed")), v.get("support", "–")]
               if isinstance(v, dict) else [c, "–", "–", delta(0, v), "–", "–"]
               for c, v in pc.items()]
    f1 = d.get("f1") or {}
    looks = ", ".join(f"{look['n_seeds']} seeds: {look['outcome']}" for look in d.get("looks") or [])
    rule = (f"Admit by {d.get('admit', '?')}: the lower end of the {metric} improvement above "
            + (f"{num(d.get('min_delta'))}" if d.get("admit") == "superiority" else f"-{num(d.get('margin'))}")
            + f"; does it help: {'yes' if d.get('superiority') else 'not shown'}; does it harm: "
            f"{'no' if d.get('non_inferiority') else 'not excluded'} (margin {num(d.get('margin'))}). "
            f"Checks: macro-F1 Δ {num(f1.get('delta'))} (at most {num(f1.get('margin'))} worse), no class's recall "
            f"down by more than {num(d.get('tolerance'))}"
            + (f" or {d['tolerance_min_images']} judging image(s) of the class" if d.get("tolerance_min_images") else "")
            + f". Judged on {d.get('n_judge', '?')} val images (calibrated on the other {d.get('n_select', '?')}); "
            f"looks: {looks}. Interval: {d.get('method', '')}. Calibration: {d.get('calibration', '')}.")
    off = ""
    if d.get("gate_enabled") is False:
        off = (f'<p class="badge warn">The gate was switched off (ablation): the round was accepted; the gate '
               f'would have {"accepted" if d.get("would_accept") else "rejected"} it.</p>')
    pc_table = (table(["class", "recall before", "after", "Δ", "allowed Δ", "support"], pc_rows, "num",
                      ["weak" if c in regressions else "" for c in pc]) if pc_rows else na("per-class recall"))
    return (f'<div class="card"><h4>Round {r:02d} {decision_badge(g.get("decision"))}</h4>{off}'
            f'<p>{esc(g.get("reason") or "no reason recorded")}</p><div class="pair">'
            f'<div>{table(["val (judging images)", "value [interval]"], rows, "num")}<p class="small">{esc(rule) if d else ""}</p></div>'
            f"<div>{pc_table}</div></div></div>")


SLICE_COLUMNS = ("slice_id", "class_name", "n_train", "n_val", "n_val_errors", "error_rate", "class_error_rate",
                 "dominant_wrong_class", "weak")


def section_slices(run: RunView) -> str:
    diagnosed = [r for r in run.rounds if (run.round_dir(r) / "diagnose").is_dir()]
    if not diagnosed:
        return na("diagnosis (no round has a diagnose folder)")
    parts = []
    for r in diagnosed:
        d = run.round_dir(r) / "diagnose"
        diag = load_dict(d / "diagnosis.json")
        slices = diag.get("slices") or load_csv(d / "slices.csv") or []
        slices = sorted(slices, key=lambda s: not truthy(s.get("weak")))
        n_weak = sum(truthy(s.get("weak")) for s in slices)
        parts.append(f"<h3>Round {r:02d}: {n_weak} weak of {len(slices)} clusters</h3>")
        if slices:
            cols = [c for c in SLICE_COLUMNS if c in slices[0]] or list(slices[0])[:8]
            rows = [[with_ci(s[c], s.get("error_ci")) if c == "error_rate" else num(s.get(c)) if is_float(s.get(c))
                     else s.get(c) for c in cols] for s in slices[:TABLE_CAP]]
            parts.append(table(cols, rows, "num", ["weak" if truthy(s.get("weak")) else "" for s in slices]))
        else:
            parts.append(na("slices (diagnosis.json / slices.csv)"))
        pairs = diag.get("confused_pairs") or []
        if pairs and isinstance(pairs[0], dict):
            parts.append("<p><b>Most confused (true → predicted):</b> " + esc("; ".join(
                f"{p.get('true')} → {p.get('predicted')} ({p.get('count')})" for p in pairs[:5])) + "</p>")
        budget = diag.get("budget") or load_csv(d / "budget.csv") or []
        if budget:
            cols = [c for c in ("class_name", "slice_id", "count", "mode", "strength") if c in budget[0]]
            rows = [[*[num(a.get(c)) if c == "strength" else a.get(c) for c in cols], n_items(a.get("exemplar_ids"))]
                    for a in budget[:TABLE_CAP]]
            parts.append("<h4>Budget: images asked of the generator</h4>" + table([*cols, "exemplars"], rows, "num"))
        weak_ids = [str(s.get("slice_id")) for s in slices if truthy(s.get("weak"))]
        pngs = sorted((d / "slices").glob("*.png"), key=lambda p: (p.stem not in weak_ids, p.stem))
        figs = [f'<figure>{img(image_bytes(p), p.stem, "exemplar")}<figcaption>{esc(p.stem)}'
                f'{" (weak)" if p.stem in weak_ids else ""}</figcaption></figure>' for p in pngs]
        if figs:
            parts.append(f'<h4>Exemplars per slice</h4><div class="gallery wide">{"".join(figs)}</div>')
        emb = d / "embedding_map.png"
        if emb.is_file():
            parts.append(f'<h4>Embedding map</h4>{img(image_bytes(emb), "embedding map", "plot")}')
    return "".join(parts)


def n_items(value: Any) -> int:
    if isinstance(value, list):
        return len(value)
    return len([v for v in str(value or "").split(";") if v.strip()])


def section_galleries(run: RunView) -> str:
    if not run.records:
        return na("synthetic images (no round generated any)")
    parts = []
    for r, rec in sorted(run.records.items()):
        rd = run.round_dir(r)
        manifest = rec.manifest or []
        paths = {m.id: rd / "generate" / m.path for m in manifest}
        made = Counter(f"{m.preset}/{m.mode}" for m in manifest)
        parts.append(f"<h3>Round {r:02d}</h3><p>{len(manifest)} images generated (preset/mode: "
                     f"{esc(', '.join(f'{k} × {v}' for k, v in made.items()) or '–')}).</p>")
        if rec.filter is None:
            rows = [{"id": m.id, "class": m.class_index} for m in manifest]
            parts.append(na("filter decisions (filter/scores.csv missing): the generated images are shown"))
            parts.append(gallery("generated", rows, run, rd, paths) if rows else na("generated images"))
            continue
        if run.gate(r).get("decision") == "rejected":
            parts.append('<p class="note">The gate rejected this round: even the images the filter accepted '
                         "were not used for training.</p>")
        scores = rec.filter.rows
        plain = [x for x in scores if not x.get("overridden")]
        groups = {"accepted": [x for x in plain if FilterResult.is_accepted(x)]}
        rejected = [x for x in plain if not FilterResult.is_accepted(x)]
        for reason in sorted({x.get("reason") or "unspecified" for x in rejected},
                             key=lambda k: (REASON_ORDER.index(k) if k in REASON_ORDER else 99, k)):
            groups[f"rejected: {reason}"] = [x for x in rejected if (x.get("reason") or "unspecified") == reason]
        groups["human review overrides"] = [x for x in scores if x.get("overridden")]
        parts.append('<div class="groups">' + "".join(gallery(title, rows, run, rd, paths)
                                                      for title, rows in groups.items()
                                                      if rows or title == "accepted") + "</div>")
        if rec.filter.review_refused_ids:
            parts.append(f'<p class="note">A reviewer\'s "accept" was refused for {len(rec.filter.review_refused_ids)}'
                         " image(s) that leak an evaluation image.</p>")
        parts.append(closest_real_table(rec.filter.closest_real))
    return "".join(parts)


def closest_real_table(closest: Any) -> str:
    """Distance of candidates to their nearest real training image beside real images' own: a privacy check."""
    if not isinstance(closest, dict) or not isinstance(closest.get("candidates"), dict):
        return ""
    rows = []
    for who in ("candidates", "real_train"):
        for kind, q in (closest.get(who) or {}).items():
            if isinstance(q, dict):
                rows.append([who.replace("_", " "), kind.replace("_", " "), *[num(v) for v in q.values()]])
    if not rows:
        return ""
    quantiles = list(closest["candidates"].get("cosine_distance") or {})
    return ("<h4>Distance to the nearest real training image (memorisation check)</h4>"
            + table(["images", "distance", *quantiles], rows, "num"))


def class_name(run: RunView, value: Any) -> str:
    """scores.csv and the manifest carry class indices; the page shows names."""
    try:
        return run.classes[int(value)]
    except (TypeError, ValueError, IndexError):
        return str(value if value is not None else "")


def gallery(title: str, rows: list[dict], run: RunView, round_dir: Path, paths: dict) -> str:
    figs = []
    for row in rows[:GALLERY_CAP]:
        sid = str(row.get("id", ""))
        path = paths.get(sid) or round_dir / "generate" / "images" / f"{sid}.png"
        data = image_bytes(path, THUMB_PX) if path.is_file() else None
        caption = class_name(run, row.get("class"))
        if row.get("overridden"):
            caption += (f" · accepted by a reviewer (filter: {row.get('reason') or '–'})" if FilterResult.is_accepted(row)
                        else " · rejected by a reviewer (the filter had accepted it)")
        tip = f"{sid}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("id", "class", "overridden"))
        figs.append(f"<figure>{img(data, sid, 'thumb', tip) if data else na('image')}"
                    f"<figcaption>{esc(caption)}</figcaption></figure>")
    shown = f"showing {min(len(rows), GALLERY_CAP)} of {len(rows)}" if len(rows) > GALLERY_CAP else f"{len(rows)}"
    body = f'<div class="gallery">{"".join(figs)}</div>' if figs else '<p class="na">none</p>'
    return f'<div class="group"><h4>{esc(title)} <span class="count">({shown})</span></h4>{body}</div>'


def section_timings(run: RunView) -> str:
    timings = run.summary.get("timings_s") or EventLog(run.dir).timings()
    if not timings:
        return na("timings (no stage completed)")
    top = max(float(v) for v in timings.values()) or 1.0
    rows = [[stage, f"{float(s):.1f}",
             Raw(f'<div class="bar" style="width:{100 * float(s) / top:.1f}%"></div>')] for stage, s in timings.items()]
    rows.append([Raw("<b>total</b>"), f"{sum(float(v) for v in timings.values()):.1f}", ""])
    return table(["stage", "seconds", ""], rows, "timings")


SECTIONS = (("data", "Data", section_data), ("test", "Test results", section_test),
            ("confusion", "Confusion matrices", section_confusion), ("recall", "Per-class recall", section_recall),
            ("rounds", "Rounds and the gate", section_rounds), ("slices", "Weak slices", section_slices),
            ("galleries", "Synthetic images", section_galleries), ("timings", "Timings", section_timings))


def header(run: RunView) -> str:
    base = (run.test.get("baseline") or {}).get("macro_f1")
    final = (run.test.get("final") or {}).get("macro_f1")
    gates = [run.gate(r).get("decision") for r in run.records]
    kpis = [("test macro-F1, baseline → final", f"{num(base)} → {num(final)}"),
            ("rounds accepted / rejected", f"{gates.count('accepted')} / {gates.count('rejected')}"),
            ("synthetic in val/test", num(run.summary.get("synthetic_in_eval_splits",
                                                          run.test.get("synthetic_in_eval_splits"))))]
    status = "complete" if run.summary else "partial (no summary.json: the run has not finished)"
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in SECTIONS)
    cards = "".join(f'<div class="kpi">{esc(k)}<b>{esc(v)}</b></div>' for k, v in kpis)
    return (f"<header><h1>vision_si run report: {esc(run.name())}</h1>"
            f'<p class="meta">started {esc(run.date())} · {esc(run.dir.name)} · status: {esc(status)}</p>'
            f'<div class="cards">{cards}</div><nav>{nav}</nav></header>')


def guarded(build: Any, run: RunView) -> str:
    try:
        return build(run)
    except Exception as exc:  # noqa: BLE001 - a malformed file must not cost the rest of the report
        return na(f"this part could not be read ({type(exc).__name__}: {exc})")


def render(run_dir: Path) -> str:
    run = RunView(run_dir)
    sections = [(sid, title, guarded(build, run)) for sid, title, build in SECTIONS]
    written = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return page(f"vision_si report: {run.name()}", guarded(header, run), sections,
                f"Report written {written} from {run.dir}.")


def write_report(run_dir: Path) -> Path:
    """Write `report.html` into `run_dir` (atomically) from whatever the run has produced so far."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"'{run_dir}' is not a run directory (it does not exist)")
    out = run_dir / "report.html"
    atomic_write_text(out, render(run_dir))
    return out
