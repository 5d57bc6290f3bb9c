"""``bonedist serve BUNDLE``: the exported ensemble behind an HTTP API (FastAPI on uvicorn), for a PACS viewer, a
worklist service or a script.

    POST /v1/predictions         one radiograph (multipart ``file``: PNG, JPEG or DICOM) + ``sex`` (F/M) and optional
                                 ``chronological_age`` (10y3m, 123m); DICOM headers fill both when absent
    POST /v1/predictions/batch   several ``file`` parts, each with its result or its own problem
    GET  /v1/model               the model card and the bundle's members
    GET  /health, /ready         liveness; readiness (the bundle is loaded and answered a warm-up request)
    GET  /openapi.json, /docs    the API description (also saved in docs/openapi.json)

Bounded: the request's declared size (``--max-upload-mb``, a request without Content-Length is refused), the pixels
an image header declares (``--max-pixels``, checked before decoding), the files per batch and the time a request
waits for the model (``--timeout``). Concurrent requests are batched on the way to the model (up to ``--max-batch``
radiographs, waiting at most ``--batch-wait-ms`` for company). Every error is an RFC 9457 problem-details JSON
(``application/problem+json``) naming what is wrong; a client's mistake is a 4xx, never a traceback. With
``--token-file`` every ``/v1`` call needs ``Authorization: Bearer TOKEN``. Each request is logged with its id
(``X-Request-ID``, echoed) and latency.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bonedist import BonedistError, __version__
from bonedist.data.images import MAX_PIXELS

LOG = logging.getLogger("bonedist.serve")
PROBLEM = "application/problem+json"
PROBLEM_BASE = "/problems/"  # a relative type URI (RFC 9457 3.1.1): GET /problems/KIND describes the kind
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class ServeSettings:
    max_upload_bytes: int = 64 * 2**20
    max_pixels: int = MAX_PIXELS
    max_files: int = 32
    timeout_s: float = 60.0
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    token: str | None = None


class Problem(Exception):
    """An RFC 9457 problem: ``status``, a short ``kind`` (the type's anchor and title) and a ``detail`` line."""

    def __init__(self, status: int, kind: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers = status, kind, detail, headers or {}


TITLES = {"bad-image": "The image cannot be read", "too-large": "The request is too large",
          "missing-field": "A required field is missing", "bad-field": "A field has a bad value",
          "unauthorized": "A bearer token is required", "not-found": "No such resource",
          "method-not-allowed": "Method not allowed", "length-required": "Content-Length is required",
          "timeout": "The model did not answer in time", "not-ready": "The service is not ready",
          "internal": "Internal error", "too-many-files": "Too many files"}


MEANINGS = {
    "bad-image": "The file is not a PNG, JPEG or DICOM radiograph that can be read, or it is empty or blank.",
    "too-large": "The request is over the upload limit, or the image header declares more pixels than allowed.",
    "missing-field": "A required field is missing: the file, or the sex of an image whose DICOM header lacks it.",
    "bad-field": "A field has a bad value (sex: F or M; chronological_age: 10y3m, 123m).",
    "unauthorized": "This service needs Authorization: Bearer TOKEN on every /v1 call.",
    "length-required": "A POST must declare its Content-Length.",
    "too-many-files": "A batch request carries more files than the service accepts.",
    "timeout": "The model did not answer in time; retry after the Retry-After seconds.",
    "not-ready": "The bundle is still loading; retry shortly.",
    "not-found": "No such path.", "method-not-allowed": "The path does not take this method.",
    "internal": "The service failed on this request; its log holds the details under the request id.",
}


def problem_response(request: Request, status: int, kind: str, detail: str, headers: dict | None = None):
    body = {"type": PROBLEM_BASE + kind, "title": TITLES.get(kind, kind), "status": status, "detail": detail,
            "instance": request.url.path, "request_id": getattr(request.state, "request_id", None)}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


class Batcher:
    """Requests' radiographs queued and run through the bundle together: whoever arrives while the model is busy, or
    within ``wait_ms`` of the first, shares its batch (up to ``max_batch``)."""

    def __init__(self, bundle, max_batch: int, wait_ms: float):
        self.bundle, self.max_batch, self.wait = bundle, max_batch, wait_ms / 1000.0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="bonedist-model")
        self.task: asyncio.Task | None = None
        self.batches = self.radiographs = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.model_thread.shutdown(wait=False, cancel_futures=True)

    async def predict(self, image: np.ndarray, male: bool) -> dict:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, male, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait
            while len(items) < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    items.append(self.queue.get_nowait() if timeout <= 0 else
                                 await asyncio.wait_for(self.queue.get(), timeout))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            items = [i for i in items if not i[2].cancelled()]  # clients that timed out meanwhile
            if not items:
                continue
            images = np.stack([i[0] for i in items])
            male = np.array([i[1] for i in items], bool)
            try:
                out = await loop.run_in_executor(self.model_thread, self.bundle.predict, images, male)
            except Exception as exc:  # noqa: BLE001 - the requests get the failure, the loop keeps serving
                LOG.exception("model failed on a batch of %d", len(items))
                for *_, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.radiographs += len(items)
            for k, (*_, future) in enumerate(items):
                if not future.done():
                    future.set_result({key: value[k] for key, value in out.items()})


def _form_sex(text: str | None, facts: dict, name: str) -> tuple[bool, str]:
    from bonedist.data.options import parse_male

    if text not in (None, ""):
        male = parse_male(text)
        if male is None or str(text).strip().lower() not in ("f", "m", "female", "male"):
            raise Problem(422, "bad-field", f"sex {text!r}: expected F or M")
        return male, "request"
    if facts.get("male") is not None:
        return bool(facts["male"]), "dicom"
    raise Problem(422, "missing-field", f"{name}: sex is missing: send sex=F or M (the image has no DICOM "
                                        f"PatientSex)")


def _form_age(text: str | None, facts: dict) -> tuple[float | None, str | None]:
    from bonedist.eval.predict import parse_age

    if text not in (None, ""):
        try:
            return parse_age(text), "request"
        except BonedistError as exc:
            raise Problem(422, "bad-field", str(exc).replace("--chronological-age", "chronological_age")) from None
    if facts.get("age_months") is not None:
        return float(facts["age_months"]), "dicom"
    return None, None


def create_app(bundle=None, settings: ServeSettings | None = None) -> FastAPI:
    """The service around a loaded ``Bundle`` (None: only the API description, for ``--write-openapi``)."""
    from starlette.concurrency import run_in_threadpool

    from bonedist.eval.predict import result_row
    from bonedist.serving.bundle import prepare

    settings = settings or ServeSettings()
    state = {"ready": False, "batcher": None}

    async def lifespan(app: FastAPI):
        if bundle is not None:
            batcher = Batcher(bundle, settings.max_batch, settings.batch_wait_ms)
            batcher.start()
            state["batcher"] = batcher
            size = bundle.pack["image_size"]
            warm = np.full((size, size), 128, np.uint8)
            warm[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 200
            await batcher.predict(warm, True)  # the first run allocates; /ready waits for it
            state["ready"] = True
        yield
        state["ready"] = False
        if state["batcher"] is not None:
            await state["batcher"].stop()

    app = FastAPI(title="bonedist", version=__version__, lifespan=lifespan,
                  description="Bone age of pediatric hand radiographs from an exported bonedist ensemble, with its "
                              "conformal prediction interval. Errors are RFC 9457 problem details.")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        given = request.headers.get("x-request-id", "")
        request.state.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        start = time.perf_counter()
        try:
            response = await _guarded(request, call_next)
        except Exception:  # noqa: BLE001 - logged with its traceback here, never sent to the client
            LOG.exception("request %s failed", request.state.request_id)
            response = problem_response(request, 500, "internal", "the service failed on this request; its log "
                                                                  "has the details under the request id")
        latency = (time.perf_counter() - start) * 1000
        response.headers["X-Request-ID"] = request.state.request_id
        LOG.info("%s %s %s %d %.1f ms", request.state.request_id, request.method, request.url.path,
                 response.status_code, latency)
        return response

    async def _guarded(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return problem_response(request, 411, "length-required",
                                        "send the request with a Content-Length header (no chunked uploads)")
            if not length.isdigit() or int(length) > settings.max_upload_bytes:
                return problem_response(request, 413, "too-large",
                                        f"the request declares {length} bytes; at most "
                                        f"{settings.max_upload_bytes} are accepted (--max-upload-mb)")
        if settings.token and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.token.encode()):
                return problem_response(request, 401, "unauthorized",
                                        "send Authorization: Bearer TOKEN (the token the service was started with)",
                                        headers={"WWW-Authenticate": 'Bearer realm="bonedist"'})
        return await call_next(request)

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return problem_response(request, exc.status, exc.kind, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        missing = all(e.get("type") == "missing" for e in exc.errors())
        return problem_response(request, 422, "missing-field" if missing else "bad-field", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "bad-field")
        return problem_response(request, exc.status_code, kind, str(exc.detail))

    async def _one(upload: UploadFile, sex: str | None, age: str | None, request: Request) -> dict:
        name = upload.filename or "upload"
        data = await upload.read()
        if not data:
            raise Problem(422, "bad-image", f"{name}: the file is empty")
        try:
            image, facts = await run_in_threadpool(prepare, data, name, bundle.pack, settings.max_pixels)
        except BonedistError as exc:
            text = str(exc)
            too_large = "megapixel limit" in text  # the header's pixel count, checked before decoding
            raise Problem(413 if too_large else 422, "too-large" if too_large else "bad-image", text) from None
        male, sex_source = _form_sex(sex, facts, name)
        chrono, age_source = _form_age(age, facts)
        try:
            values = await asyncio.wait_for(state["batcher"].predict(image, male), settings.timeout_s)
        except asyncio.TimeoutError:
            raise Problem(503, "timeout", f"no answer within {settings.timeout_s:g} s; the service is overloaded: "
                                          f"retry later", {"Retry-After": "5"}) from None
        values = {k: np.atleast_1d(v) for k, v in values.items()}
        row = result_row(name, male, chrono, values, bundle)
        row["sex_source"] = sex_source
        if age_source:
            row["chronological_age_source"] = age_source
        row["bundle"] = bundle.identity
        row["request_id"] = request.state.request_id
        return row

    def _ready():
        if not state["ready"]:
            raise Problem(503, "not-ready", "the bundle is still loading")

    @app.get("/problems/{kind}", summary="what a problem type means")
    async def problem_type(kind: str):
        if kind not in MEANINGS:
            raise Problem(404, "not-found", f"no problem type {kind!r}")
        return {"type": PROBLEM_BASE + kind, "title": TITLES[kind], "meaning": MEANINGS[kind]}

    @app.get("/health", summary="liveness: the process answers")
    async def health():
        return {"status": "ok", "version": __version__}

    @app.get("/ready", summary="readiness: the bundle is loaded and answered a warm-up request")
    async def ready():
        _ready()
        batcher = state["batcher"]
        return {"status": "ready", "members": bundle.names, "providers": bundle.providers, "bundle": bundle.identity,
                "served": {"radiographs": batcher.radiographs, "batches": batcher.batches}}

    @app.get("/v1/model", summary="the model card: data, metrics with confidence intervals, interval coverage")
    async def model():
        _ready()
        return {"card": bundle.card, "members": bundle.names, "weights": bundle.weights, "ensemble": bundle.source,
                "interval_method": bundle.calibration.method if bundle.calibration else None,
                "coverage": bundle.coverage, "pack": bundle.pack,
                "format_version": bundle.description.get("format_version")}

    @app.post("/v1/predictions", summary="bone age of one radiograph, with its interval and each member's")
    async def predictions(request: Request, file: UploadFile = File(..., description="PNG, JPEG or DICOM"),
                          sex: str | None = Form(None, description="F or M (default: the DICOM header's)"),
                          chronological_age: str | None = Form(None, description="10y3m, 123m (default: the "
                                                                                 "DICOM header's)")):
        _ready()
        return await _one(file, sex, chronological_age, request)

    @app.post("/v1/predictions/batch", summary="several radiographs: each gets its result or its own problem")
    async def batch(request: Request, file: list[UploadFile] = File(..., description="PNG, JPEG or DICOM files"),
                    sex: str | None = Form(None, description="F or M for all (default: each DICOM header's)"),
                    chronological_age: str | None = Form(None, description="for all (default: DICOM headers)")):
        _ready()
        if len(file) > settings.max_files:
            raise Problem(413, "too-many-files", f"{len(file)} files; at most {settings.max_files} per request")

        async def guarded(upload):
            try:
                return await _one(upload, sex, chronological_age, request)
            except Problem as exc:
                return {"image": upload.filename, "problem": {"type": PROBLEM_BASE + exc.kind,
                                                              "title": TITLES.get(exc.kind, exc.kind),
                                                              "status": exc.status, "detail": exc.detail}}

        results = await asyncio.gather(*(guarded(u) for u in file))
        return {"results": list(results), "request_id": request.state.request_id,
                "failed": sum("problem" in r for r in results)}

    return app


def openapi_text() -> str:
    import json

    return json.dumps(create_app().openapi(), indent=1, sort_keys=True) + "\n"


def serve(bundle_path: str, host: str, port: int, settings: ServeSettings, coverage: float = 0.9,
          threads: int | None = None, log_level: str = "info") -> None:
    import uvicorn

    from bonedist.serving.bundle import Bundle, bundle_summary

    bundle = Bundle(bundle_path, coverage, threads=threads)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    LOG.info("serving %s", bundle_summary(bundle))
    uvicorn.run(create_app(bundle, settings), host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=10)
