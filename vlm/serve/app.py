"""The web app: JSON endpoints for captions, answers and per-token maps, and the page that shows them.

Every error is a JSON object ``{"error": "one line"}``: 4xx for a bad request (not an image, truncated, too
big, too many pixels, a missing field), 500 without a traceback only for a bug.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import fields
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlm.api import Captioner
from vlm.config import DecodingConfig, MapConfig
from vlm.data.images import pixel_limit
from vlm.errors import VLMError
from vlm.grounding.methods import METHODS
from vlm.grounding.overlay import overlay
from vlm.serve.uploads import UploadError, decode_upload
from vlm.serve.worker import ModelWorker

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
FORM_OVERHEAD = 64 * 2**10  # multipart boundaries and the small text fields around an upload
DISPLAY_MAX_SIDE = 384  # overlays larger than this cost time and bytes, and a browser shows them no better
MAX_TEXT = 2000

ImageField = Annotated[UploadFile, File(description="The image file.")]


def create_app(captioner: Captioner, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int | None = None, max_batch: int = 16) -> FastAPI:
    """A FastAPI app serving ``captioner``; one worker thread owns the model (see :class:`ModelWorker`).

    ``max_pixels`` defaults to the image loader's limit (``vlm.data.images.pixel_limit``).
    """
    pixel_limit(max_pixels)  # a bad limit fails here, not on every request
    if max_upload_bytes < 1:
        raise VLMError(f"upload limit: expected a positive number of bytes, got {max_upload_bytes}")
    worker = ModelWorker(captioner, max_batch=max_batch)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        worker.close()

    # no /docs page: FastAPI's would load its scripts from a CDN, and this app must work offline
    app = FastAPI(title="vlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.worker = worker

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(UploadError)
    async def _upload(_: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(VLMError)
    async def _vlm(_: Request, exc: VLMError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error ({exc.__class__.__name__})")

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_upload_bytes + FORM_OVERHEAD:
            return _error(413, f"request of {int(length)} bytes is over the upload limit of {max_upload_bytes} bytes")
        return await call_next(request)

    async def image_of(upload: UploadFile) -> Image.Image:
        data = await upload.read(max_upload_bytes + 1)
        return await run_in_threadpool(decode_upload, data, upload.filename or "image", max_upload_bytes, max_pixels)

    async def run(kind: str, **args: Any) -> Any:
        return await asyncio.wrap_future(worker.submit(kind, **args))

    @app.get("/api/health")
    async def health() -> dict:
        cfg = captioner.model.cfg
        return {"status": "ok", "encoder": cfg.encoder.name, "image_size": cfg.encoder.image_size,
                "device": str(captioner.device), "queued": worker.pending()}

    @app.get("/api/methods")
    async def list_methods() -> dict:
        return {"methods": list(METHODS), "default": METHODS[0]}

    @app.post("/api/caption")
    async def caption(image: ImageField, decoding: Decoding) -> dict:
        """The caption; with num_samples > 1, "caption" is the first of the sampled "samples"."""
        return _texts("caption", await run("caption", image=await image_of(image), decoding=decoding))

    @app.post("/api/ask")
    async def ask(image: ImageField, question: Annotated[str, Form(max_length=MAX_TEXT)], decoding: Decoding) -> dict:
        """The answer; with num_samples > 1, "answer" is the first of the sampled "samples"."""
        answers = await run("ask", image=await image_of(image), question=question, decoding=decoding)
        return {"question": question} | _texts("answer", answers)

    @app.post("/api/attend")
    async def attend(image: ImageField, decoding: Decoding, maps: Maps,
                     question: Annotated[str | None, Form(max_length=MAX_TEXT)] = None,
                     overlays: Annotated[bool, Form()] = True) -> dict:
        result = await run("attend", image=await image_of(image), question=question, decoding=decoding, maps=maps)
        body = {"text": result.text, "question": question, "method": maps.method}
        return body | await run_in_threadpool(_maps_body, result.image, result.tokens, result.maps, overlays)

    @app.post("/api/ground")
    async def ground(image: ImageField, text: Annotated[str, Form(min_length=1, max_length=MAX_TEXT)], maps: Maps,
                     overlays: Annotated[bool, Form()] = True) -> dict:
        pil = await image_of(image)
        tokens, token_maps = await run("ground", image=pil, text=text, maps=maps)
        return {"text": text, "method": maps.method} | await run_in_threadpool(_maps_body, pil, tokens, token_maps,
                                                                              overlays)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app


def _texts(name: str, texts: list[str]) -> dict:
    return {name: texts[0], "samples": texts} if len(texts) > 1 else {name: texts[0]}


def _form(cls: type, aliases: dict[str, str]) -> Callable[..., Any]:
    """A FastAPI dependency that reads each field of the dataclass ``cls`` from an optional form field of the same
    name (or of an alias) and returns the dataclass: the form takes exactly its options, names and defaults. A value
    out of range is a 422 that names it; ``BOUNDS`` caps what one request may cost."""
    hints = get_type_hints(cls)
    names = {f.name: f.name for f in fields(cls)} | aliases  # form name -> field

    def annotation(field: str) -> Any:
        hint = hints[field]
        kinds = [t for t in get_args(hint) if t is not type(None)] if get_origin(hint) in (Union, UnionType) else [hint]
        kind = str if get_origin(kinds[0]) is Literal else kinds[0]  # a seed is one int here; the method a name
        low, high = BOUNDS.get(field, (None, None))
        return Annotated[kind | None, Form(ge=low, le=high)]

    def read(**given: Any) -> Any:
        values: dict[str, Any] = {}
        for name, value in given.items():
            if value is not None:
                if names[name] in values:
                    raise UploadError(422, f"field {name!r}: {names[name]} is given twice")
                values[names[name]] = value
        try:
            return cls(**values)
        except ValueError as e:  # e.g. sampling with beam_size > 1, an unknown map method
            raise UploadError(422, str(e)) from None

    read.__signature__ = inspect.Signature([inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                                              annotation=annotation(field))
                                            for name, field in names.items()])
    return read


BOUNDS = {"beam_size": (1, 8), "num_samples": (1, 8), "max_new_tokens": (1, None)}  # per request: model time
Decoding = Annotated[DecodingConfig, Depends(_form(DecodingConfig, {"beam": "beam_size"}))]
Maps = Annotated[MapConfig, Depends(_form(MapConfig, {}))]


def _maps_body(image: Image.Image, tokens: list[str], maps: np.ndarray, overlays: bool) -> dict:
    """Tokens, maps as nested lists, the display image and (optionally) one overlay PNG per token, as data URIs."""
    shown = display_image(image)
    body = {"tokens": tokens, "grid": list(maps.shape[1:]), "image_size": list(image.size),
            "maps": np.round(maps.astype(np.float64), 6).tolist(), "image": png_data_uri(shown)}
    if overlays:
        body["overlays"] = [png_data_uri(overlay(shown, m)) for m in maps]
    return body


def display_image(image: Image.Image) -> Image.Image:
    """The image, scaled down (aspect kept) if its long side is over 384 px."""
    scale = DISPLAY_MAX_SIDE / max(image.size)
    if scale >= 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one line: "missing field 'image'", "field 'beam': ..."."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")) or "request"
        parts.append(f"missing field {name!r}" if err.get("type") == "missing" else f"field {name!r}: {err['msg']}")
    return "; ".join(parts) or "invalid request"
