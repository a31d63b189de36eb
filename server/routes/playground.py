"""The playground page: ``GET /`` and its assets, for a person to try the model in a browser.

The page (``server/static/``: plain HTML, CSS and JavaScript, no build step, nothing
fetched from outside this server) asks ``POST /v1/reason`` for a streamed answer with
the latent trace, and draws each thought's top tokens as a heatmap. When the trace
reports each thought's frontier (a graph question read by a compact model, such as the
bundled one), it also draws the question's graph (SVG; the edges read from the question
text, the nodes in columns by hop distance from the asked name, unreachable ones apart)
with a thought selector: the chosen thought's probability on each node as its fill, the
frontier (within k hops) and the next hop outlined, and the frontier / next-hop / rest
masses in words.

- ``GET /``: the page (HTML).
- ``GET /static/{name}``: its assets, each with an explicit content type (the system's
  ``mimetypes`` table varies between machines, e.g. for ``.js``).
- ``GET /playground/examples``: a few example questions in the served model's domain:
  questions of the held-out split (``test.json``) beside the checkpoint when it has one
  (the bundled model does), else ProsQA-style questions generated once from a fixed seed;
  of the first 16, the served model is asked once and the first four it answers right are
  shown (all candidates if it answers none right).

All three are public (``server.middleware.PUBLIC_PATHS``): the page holds no secret and
asks the person for the API key only when ``/v1/reason`` answers 401. A Content
Security Policy keeps the page to this origin, so a stray external resource fails
loudly in a browser instead of leaking a request.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.errors import ApiError

router = APIRouter(tags=["playground"])

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
#: The assets the page uses, with their content types; anything else under /static is 404.
ASSETS = {"playground.css": "text/css; charset=utf-8",
          "playground.js": "text/javascript; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
#: Paths served without the API key (merged into PUBLIC_PATHS by the middleware).
PAGE_PATHS = frozenset({"/", "/playground/examples", *(f"/static/{name}" for name in ASSETS)})

_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache"}

N_EXAMPLES = 4
EXAMPLES_SEED = 7


@functools.lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


@functools.lru_cache(maxsize=4)
def example_questions(model_dir: Path | None = None, limit: int = N_EXAMPLES) -> list[dict]:
    """Questions from ``model_dir/test.json`` when there is one, else ProsQA-style
    questions ("mini" size: short enough to read on the page); each with a short label,
    its last sentence ("Is Rex a nulpus or vorpus?"), and the expected answer."""
    samples = None
    if model_dir is not None and (model_dir / "test.json").is_file():
        from engine.data.records import load_records

        try:
            samples = [{"question": r.question, "answer": r.answer}
                       for r in load_records(model_dir / "test.json")[:limit]]
        except ValueError:
            samples = None  # not a records file: fall back to generated questions
    if not samples:
        from engine.data.prosqa import generate  # pure Python, no torch; imported when first asked

        samples = generate(limit, EXAMPLES_SEED, size="mini")
    out = []
    for sample in samples:
        question = sample["question"]
        asked = re.search(r"Is [^.?]+\?\s*$", question)
        out.append({"question": question, "label": asked.group(0).strip() if asked else question[:40],
                    "answer": sample["answer"]})
    return out


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, f"no such asset: {name!r}", "not_found_error")
    return Response(_read(name), media_type=ASSETS[name], headers=_HEADERS)


@router.get("/playground/examples", include_in_schema=False)
async def examples(request: Request) -> dict:
    """``{"examples": [{"question", "label", "answer"}]}``; ``answer`` is the ground
    truth, shown on the page beside the model's answer."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return {"examples": example_questions(None)}
    model_dir = engine.engine.checkpoint.path
    if model_dir not in _CHECKED:
        _CHECKED[model_dir] = await _answered_right(engine, example_questions(model_dir, CANDIDATES))
    return {"examples": _CHECKED[model_dir] or example_questions(model_dir)}


#: Candidates asked once per served model; the page shows the first N_EXAMPLES it answers right.
CANDIDATES = 16
_CHECKED: dict[Path, list[dict]] = {}


async def _answered_right(engine, candidates: list[dict]) -> list[dict]:
    """The candidates the served model answers exactly right (greedy, its default thoughts),
    so that every example on the page shows the model at its best, not a lucky draw."""
    from engine.params import SamplingParams

    async def answer(example: dict) -> str | None:
        try:
            final = None
            async for out in engine.generate(example["question"], SamplingParams(max_tokens=32, temperature=0.0)):
                final = out
            return final.answer if final is not None else None
        except Exception:       # a question the model cannot read, overload, ...: not an example
            return None

    import asyncio

    answers = await asyncio.gather(*(answer(e) for e in candidates))
    return [e for e, a in zip(candidates, answers) if a == e["answer"]][:N_EXAMPLES]
