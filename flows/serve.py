"""`reflow serve`: a page to sample any trained model, the teacher beside it, on 127.0.0.1 unless told.

FastAPI (already here through Prefect's server) serves one static page and one JSON endpoint. Models and
the VAE are loaded once and kept; a one-step request is then a single network call and a decode. A bad
request (an unknown model, NFE 0, a class out of range, too many samples) answers 400 with the reason,
which the page shows; the server keeps serving.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import threading
import time
from pathlib import Path
from typing import Any

MAX_SAMPLES = 64
MAX_STEPS = 1000
TEACHERS = {"class": "dit", "text": "text_teacher"}


class Sampler:
    """Trained models of one workspace, loaded on first use and kept; one sample request at a time (the CPU
    has no room for two)."""

    def __init__(self, root: Path, device: str = "cpu"):
        from runtime.params import load_params

        self.root, self.device = root, device
        params = load_params(root / "params.yaml")
        # The models the workspace evaluates, as stage names: the report's models, no second list of them here.
        self.models = [*dict.fromkeys(params.evaluate_models.values()),
                       *(f"text_{m}" for m in dict.fromkeys(params.text_evaluate_models.values()))]
        self._models: dict[str, Any] = {}
        self._decoders: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def available(self) -> list[str]:
        from runtime.generator import stage_artifact

        return [m for m in self.models if stage_artifact(self.root, m).is_dir()]

    def _open(self, model: str):
        from models.vae import VAE_SUBFOLDER, load_vae
        from runtime.generator import open_model

        if model not in self._models:
            gen, artifacts = open_model(self.root, model)
            self._models[model] = (gen.to(self.device), artifacts)
        gen, artifacts = self._models[model]
        vae_dir = artifacts / "vae" / VAE_SUBFOLDER
        if vae_dir not in self._decoders:
            self._decoders[vae_dir] = load_vae(vae_dir).to(self.device).eval()
        return gen, self._decoders[vae_dir]

    def sample(self, model: str, *, steps: int, n: int, seed: int, label: int | None, prompt: str | None,
               guidance: float | None) -> dict[str, Any]:
        """A PNG grid (base64) of `n` samples and what made it; GeneratorError with the reason for a bad request."""
        from PIL import Image

        from imagedata.grids import make_grid
        from runtime.generator import GeneratorError, sample_images

        if not 1 <= steps <= MAX_STEPS:
            raise GeneratorError(f"steps (NFE) must be 1..{MAX_STEPS}, not {steps}")
        if not 1 <= n <= MAX_SAMPLES:
            raise GeneratorError(f"n must be 1..{MAX_SAMPLES} samples, not {n}")
        if guidance is not None and not 0.0 <= guidance <= 20.0:
            raise GeneratorError(f"guidance must be 0..20, not {guidance}")
        with self._lock:
            start = time.perf_counter()
            gen, decoder = self._open(model)
            images, made = sample_images(gen, decoder, steps=steps, label=label, n=n, guidance=guidance, seed=seed,
                                         device=self.device, prompt=prompt)
            seconds = time.perf_counter() - start
        buf = io.BytesIO()
        Image.fromarray(make_grid(images, max(1, round(n ** 0.5))), "RGB").save(buf, format="PNG")
        return {**made, "model": model, "seconds": round(seconds, 4),
                "image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
                "fid": self.fid(model), "lineage": self.lineage(gen)}

    def fid(self, model: str) -> list[dict[str, Any]]:
        """The report's FID points of this model (NFE, solver, FID with its 95% interval), if it was evaluated."""
        from measure.results import load_evaluations
        from runtime.text_chain import ARTIFACTS

        found = []
        for artifacts in (self.root / "artifacts", self.root / ARTIFACTS):
            if artifacts.exists():
                found += [e for e in load_evaluations(self.root, artifacts)
                          if Path(e.model).name == model.removeprefix("text_")]
        return [{"nfe": p["nfe"], "solver": p["solver"], "fid": p["fid"],
                 "ci": [p["fid_low"], p["fid_high"]] if "fid_low" in p else None} for e in found[:1] for p in e.points]

    @staticmethod
    def lineage(gen) -> dict[str, Any]:
        keep = ("stage", "objective", "init_from", "coupling", "pairs", "interval_model", "time_axis", "params_hash",
                "git_commit", "source")
        return {"path": str(gen.path), **{k: gen.meta[k] for k in keep if k in gen.meta}}


def make_app(root: Path, device: str = "cpu"):
    from fastapi import FastAPI, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse

    from runtime.generator import GeneratorError
    from storage.checkpoints import CheckpointError

    sampler = Sampler(root, device)
    app = FastAPI(title="reflow serve", docs_url=None, redoc_url=None)
    page = (Path(__file__).with_name("serve.html")).read_text()

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/models")
    def models() -> dict[str, Any]:
        found = sampler.available()
        teachers = {k: v for k, v in TEACHERS.items() if v in found}
        return {"models": found, "teachers": teachers}

    @app.get("/api/sample")
    def sample(model: str, steps: int = Query(1), n: int = Query(16), seed: int = Query(0),
               label: int | None = Query(None), prompt: str | None = Query(None),
               guidance: float | None = Query(None)):
        trained = sampler.available()
        if model not in trained:
            return JSONResponse({"error": f"unknown model {model!r}; trained here: {', '.join(trained)}"},
                                status_code=400)
        try:
            return sampler.sample(model, steps=steps, n=n, seed=seed, label=label, prompt=prompt or None,
                                  guidance=guidance)
        except (GeneratorError, CheckpointError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    def malformed(request, exc: RequestValidationError):  # `steps=many`: said as the page shows any error
        said = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": said}, status_code=400)

    @app.exception_handler(Exception)
    def unexpected(request, exc: Exception):  # a bug of ours: still an answer, and the server keeps serving
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)

    return app


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from runtime.devices import generation_device
    from runtime.params import load_params
    from storage.repo import find_repo_root

    root = find_repo_root()
    device = generation_device(load_params(root / "params.yaml").compute)
    app = make_app(root, device)
    print(f"reflow serve: http://{args.host}:{args.port}/ (models of {root}, on {device}); Ctrl-C stops it",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="a page in the browser to sample any trained model, beside its teacher")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)


if __name__ == "__main__":
    sys.exit(cmd_serve(argparse.Namespace(host="127.0.0.1", port=8000)))
