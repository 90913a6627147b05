"""`vsi review RUN_DIR`: a local page to look at a run's synthetic images and veto them into `reviews.csv`.

The page shows each round's candidates beside the real training exemplars they were made from,
grouped by class and slice, with the filter's scores, decision and reason and the gate's outcome. A
reviewer marks images `reject` (one at a time, or a selection) and the server writes the run's
`reviews.csv` (`id,verdict`, atomically, other rows kept). The loop honours it (`vision_si.filter`):
a round not filtered yet applies the reviews when it is; a round filtered but not gated yet is
filtered again on `vsi resume` (`Loop.refilter_if_reviewed`); a round the gate has decided is shown
read-only, since a veto could no longer change what trained on it.

The server is the standard library's `ThreadingHTTPServer`, bound to 127.0.0.1 unless told otherwise,
with a small fixed set of routes and everything read from the run directory on each request:

    GET  /                      the page (HTML; its script is /review.js, same origin only)
    GET  /api/state             rounds, groups and candidates as JSON
    GET  /image?kind=candidate&id=ID    a generated image (its manifest path, inside the run)
    GET  /image?kind=exemplar&id=ID     a real training exemplar some candidate was made from
    POST /api/reviews           {"ids": [...], "verdict": "reject" | null}  (null withdraws a review)

Anything else is refused with a 4xx status and a JSON `error`: unknown routes and ids (404, so no
path from a request ever reaches the file system), a `Host` other than the bound loopback address
(403, against DNS rebinding), a cross-origin POST or one that is not JSON (403, 415), a body over
1 MB (413), a round already decided or a run that a process is working on (409), other methods (405).
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from vision_si.config import load_config
from vision_si.errors import InputError, RunDirError
from vision_si.filter import FilterResult, read_reviews
from vision_si.gate import GateDecision
from vision_si.generators.runner import read_manifest
from vision_si.rundir import atomic_write_text, is_complete, pid_alive

MAX_BODY = 1 << 20
PAGE_DIR = Path(__file__).resolve().parent / "review_page"
NOT_SCORES = ("id", "class", "decision", "reason", "failed", "overridden")


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the page."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class ReviewSession:
    """The run directory as the page sees it; every method reads the files anew."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        if not (self.run_dir / "config.yaml").is_file():
            raise RunDirError(f"'{run_dir}' is not a run directory (no config.yaml)")
        self.cfg = load_config(self.run_dir / "config.yaml")
        self._write_lock = threading.Lock()
        self._table_lock = threading.Lock()
        self._table: Any = None

    # ------------------------------------------------------------------ reading
    @property
    def reviews_path(self) -> Path:
        return self.run_dir / "reviews.csv"

    def reviews(self) -> dict[str, str]:
        return read_reviews(self.reviews_path) or {}

    def busy_pid(self) -> int | None:
        """The pid of a live process working on the run (its lock file), else None."""
        try:
            pid = int((self.run_dir / "lock").read_text().strip() or "0")
        except (OSError, ValueError):
            return None
        return pid if pid and pid_alive(pid) else None

    def rounds(self) -> list[int]:
        return sorted(int(p.name[6:]) for p in self.run_dir.glob("round-[0-9][0-9]")
                      if p.is_dir() and int(p.name[6:]) > 0 and is_complete(self.run_dir, f"{p.name}/generate"))

    def _manifest(self, r: int) -> list[Any]:
        return read_manifest(self.run_dir / f"round-{r:02d}" / "generate" / "manifest.jsonl")

    def state(self) -> dict[str, Any]:
        """Everything the page draws: rounds → groups (class, slice) → candidates."""
        try:
            reviews, review_error = self.reviews(), None
        except InputError as exc:
            reviews, review_error = {}, str(exc)
        busy = self.busy_pid()
        rounds = []
        for r in self.rounds():
            tag = f"round-{r:02d}"
            scores = ({row["id"]: row for row in FilterResult.load(self.run_dir / tag / "filter").rows}
                      if is_complete(self.run_dir, f"{tag}/filter") else {})
            decided = is_complete(self.run_dir, f"{tag}/gate")
            gate = GateDecision.load(self.run_dir / tag / "gate").summary() if decided else None
            groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for m in self._manifest(r):
                row = scores.get(m.id, {})
                groups.setdefault((m.class_name, m.slice), []).append({
                    "id": m.id, "mode": m.mode, "strength": m.strength, "exemplars": list(m.exemplar_ids),
                    "decision": row.get("decision"), "reason": row.get("reason") or "",
                    "overridden": bool(row.get("overridden", False)),
                    "scores": {k: v for k, v in row.items() if k not in NOT_SCORES and isinstance(v, float)
                               and np.isfinite(v) and not k.endswith("_index")},
                    "review": reviews.get(m.id)})
            rounds.append({
                "round": r, "filtered": bool(scores), "decided": decided,
                "gate": None if gate is None else {"decision": gate.get("decision"), "reason": gate.get("reason"),
                                                   "metric": gate.get("metric"), "delta": gate.get("delta")},
                "editable": not decided and busy is None and review_error is None,
                "groups": [{"class": c, "slice": s, "candidates": rows} for (c, s), rows in sorted(groups.items())]})
        return {"run": self.run_dir.name, "busy_pid": busy, "reviews_error": review_error,
                "reviews_file": str(self.reviews_path), "rounds": rounds}

    # ------------------------------------------------------------------ images
    def candidate_image(self, candidate_id: str) -> bytes:
        for r in self.rounds():
            for m in self._manifest(r):
                if m.id == candidate_id:
                    path = (self.run_dir / f"round-{r:02d}" / "generate" / m.path).resolve()
                    if not path.is_relative_to(self.run_dir) or not path.is_file():
                        raise RequestError(HTTPStatus.NOT_FOUND, f"no image file for candidate '{candidate_id}'")
                    return path.read_bytes()
        raise RequestError(HTTPStatus.NOT_FOUND, f"unknown candidate id '{candidate_id}'")

    def exemplar_image(self, exemplar_id: str) -> bytes:
        """A real training exemplar as the model sees it (the run's size, channels and DICOM window), as PNG."""
        if not any(exemplar_id in m.exemplar_ids for r in self.rounds() for m in self._manifest(r)):
            raise RequestError(HTTPStatus.NOT_FOUND, f"'{exemplar_id}' is not an exemplar of any candidate")
        from vision_si.data import load_images, load_source

        with self._table_lock:  # the run's own source, read once: the same data code as the loop
            if self._table is None:
                self._table = load_source(self.cfg.data, self.cfg.seed, progress=False)
        table = self._table
        try:
            i = table.ids.index(exemplar_id)
        except ValueError:
            raise RequestError(HTTPStatus.NOT_FOUND, f"exemplar '{exemplar_id}' is not in the run's data") from None
        arr = load_images(table, [i], self.cfg.data)[0].transpose(1, 2, 0)
        pixels = np.round(arr * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buf, format="PNG")
        return buf.getvalue()

    # ------------------------------------------------------------------ writing
    def mark(self, ids: list[str], verdict: str | None) -> dict[str, Any]:
        """Set (`reject`) or withdraw (None) the review of `ids`; all ids are checked before anything is written."""
        with self._write_lock:
            busy = self.busy_pid()
            if busy is not None:
                raise RequestError(HTTPStatus.CONFLICT, f"process {busy} is working on this run; reviews can be "
                                   "written once it has stopped (`vsi filter`/`vsi generate` stop before the gate)")
            where: dict[str, int] = {}
            for r in self.rounds():
                where.update({m.id: r for m in self._manifest(r)})
            unknown = [i for i in ids if i not in where]
            if unknown:
                raise RequestError(HTTPStatus.NOT_FOUND, f"unknown candidate id(s): {', '.join(unknown[:5])}")
            decided = sorted({where[i] for i in ids if is_complete(self.run_dir, f"round-{where[i]:02d}/gate")})
            if decided:
                raise RequestError(HTTPStatus.CONFLICT, f"round(s) {', '.join(map(str, decided))} already passed the "
                                   "gate; a review can no longer change what was trained on them")
            try:
                reviews = self.reviews()
            except InputError as exc:
                raise RequestError(HTTPStatus.CONFLICT, f"cannot update it: {exc}") from None
            for i in ids:
                if verdict is None:
                    reviews.pop(i, None)
                else:
                    reviews[i] = verdict
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["id", "verdict"])
            writer.writerows(reviews.items())
            atomic_write_text(self.reviews_path, buf.getvalue())
            return {"written": len(ids), "rejects": sum(v == "reject" for v in reviews.values()),
                    "reviews_file": str(self.reviews_path)}


def _handler(session: ReviewSession, allowed_hosts: set[str] | None) -> type[BaseHTTPRequestHandler]:
    """A request handler bound to `session`; `allowed_hosts` (None: any) are the Host headers accepted."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "vsi-review"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # the page is the log; stderr stays free for the address line

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
                             "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                             "frame-ancestors 'none'")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode("utf-8"), "application/json; charset=utf-8")

        def _guard(self) -> None:
            host = self.headers.get("Host")
            if host is None:
                raise RequestError(HTTPStatus.BAD_REQUEST, "no Host header")
            if allowed_hosts is not None and host not in allowed_hosts:
                raise RequestError(HTTPStatus.FORBIDDEN, f"Host '{host}' is not this server")

        def _route(self, method: str) -> None:
            try:
                self._guard()
                url = urlsplit(self.path)
                if method == "GET":
                    self._get(url.path, parse_qs(url.query, keep_blank_values=True))
                elif url.path == "/api/reviews":
                    self._post_reviews()
                else:
                    raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {url.path}")
            except RequestError as exc:
                self._json(exc.status, {"error": str(exc)})
            except InputError as exc:  # a damaged run directory file: say which
                self._json(HTTPStatus.CONFLICT, {"error": str(exc)})

        def _get(self, path: str, query: dict[str, list[str]]) -> None:
            if path in ("/", "/index.html"):
                self._send(200, (PAGE_DIR / "index.html").read_bytes(), "text/html; charset=utf-8")
            elif path in ("/review.js", "/review.css"):
                kind = "text/javascript" if path.endswith(".js") else "text/css"
                self._send(200, (PAGE_DIR / path[1:]).read_bytes(), f"{kind}; charset=utf-8")
            elif path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            elif path == "/api/state":
                self._json(200, session.state())
            elif path == "/image":
                kind, image_id = query.get("kind", [""])[0], query.get("id", [""])[0]
                if kind == "candidate":
                    self._send(200, session.candidate_image(image_id), "image/png")
                elif kind == "exemplar":
                    self._send(200, session.exemplar_image(image_id), "image/png")
                else:
                    raise RequestError(HTTPStatus.BAD_REQUEST, "kind must be candidate or exemplar")
            else:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such page: {path}")

        def _post_reviews(self) -> None:
            origin = self.headers.get("Origin")
            if origin is not None and origin != f"http://{self.headers.get('Host')}":
                raise RequestError(HTTPStatus.FORBIDDEN, f"cross-origin request from {origin} refused")
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (Content-Type: application/json)")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required") from None
            if not 0 < length <= MAX_BODY:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body must be 1 to {MAX_BODY} bytes")
            try:
                body = json.loads(self.rfile.read(length))
            except (ValueError, UnicodeDecodeError):
                raise RequestError(HTTPStatus.BAD_REQUEST, "body is not valid JSON") from None
            ids = body.get("ids") if isinstance(body, dict) else None
            verdict = body.get("verdict", "missing") if isinstance(body, dict) else "missing"
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
                raise RequestError(HTTPStatus.BAD_REQUEST, "'ids' must be a non-empty list of candidate ids")
            if verdict not in ("reject", None):
                raise RequestError(HTTPStatus.BAD_REQUEST, "'verdict' must be \"reject\" or null (withdraw)")
            self._json(200, session.mark(list(dict.fromkeys(ids)), verdict))

        def do_GET(self) -> None:  # noqa: N802 - the base class's naming
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

        def _refuse(self) -> None:
            self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"method {self.command} not allowed"})

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _refuse  # noqa: N815

    return Handler


def make_server(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A review server for `run_dir`, bound but not yet serving (`serve_forever` in a thread for tests)."""
    session = ReviewSession(run_dir)
    if not 0 <= port <= 65535:
        raise InputError(f"--port {port} is out of range (0 to 65535; 0 picks a free port)")
    try:
        server = ThreadingHTTPServer((host, port), _handler(session, None))
    except OSError as exc:
        raise InputError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    bound_port = server.server_address[1]
    if _is_loopback(host):  # only names of this machine's loopback reach the page: no DNS rebinding
        names = {host, "localhost", "127.0.0.1", "[::1]"} | ({f"[{host}]"} if ":" in host else set())
        server.RequestHandlerClass = _handler(session, {f"{n}:{bound_port}" for n in names})
    server.daemon_threads = True
    return server


def serve_review(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0,
                 echo: Callable[[str], None] = print) -> None:
    """Serve the review page of `run_dir` until Ctrl-C; prints the address and opens nothing."""
    server = make_server(run_dir, host=host, port=port)
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(host):
        echo(f"warning: serving on {host}: anyone who can reach this machine can mark images")
    echo(f"review page: http://{shown}:{server.server_address[1]}/  (Ctrl-C stops the server)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        echo("review server stopped")
    finally:
        server.server_close()
