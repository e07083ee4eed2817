"""Settings: the only place that reads the environment (``FACERECON_*`` variables, pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    import torch

#: The repository's ``models/`` folder (an editable or source install); a wheel install sets FACERECON_MODELS_DIR.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
#: ``../shared`` beside the repository (assets and data for building, training and tests; optional at run time).
DEFAULT_SHARED_DIR = Path(__file__).resolve().parents[3] / "shared"


class Settings(BaseSettings):
    """Configuration of the engine, the CLI and the HTTP service (documented in the README)."""

    model_config = SettingsConfigDict(env_prefix="FACERECON_", extra="ignore")

    models_dir: Path = Field(DEFAULT_MODELS_DIR, description="folder holding one sub-folder per face model")
    shared_dir: Path = Field(DEFAULT_SHARED_DIR, description="the shared assets/data folder (optional)")
    face_model: str = Field("ict", description="name of the face model to serve (a sub-folder of models_dir)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device for decoding/fitting")
    renderer: Literal["auto", "cpu", "nvdiffrast"] = Field("auto", description="rasteriser backend")
    cache_dir: Path | None = Field(
        None, description="cache of decompressed networks and of the uncompressed face model (default "
                          "$XDG_CACHE_HOME/facerecon, else "
                          "~/.cache/facerecon; unwritable: decompressed in memory at every start)")
    onnx_threads: int | None = Field(
        None, ge=0, description="onnxruntime intra-op threads of the R-Net/C-Net sessions (default: torch_threads; "
                                "0: onnxruntime's default, one per core)")
    torch_threads: int = Field(
        1, ge=0, description="torch intra-op threads, and the BLAS threads NumPy's products use (1: bit-reproducible "
                             "results, and service workers that do not oversubscribe the cores; 0: the libraries' "
                             "defaults)"
    )
    use_networks: bool = Field(True, description="use the R-Net/C-Net installed beside the face model, if any")
    refine: bool = Field(True, description="test-time fitting after R-Net by default (always on without R-Net)")
    fast_landmarks: bool = Field(
        True, description="without refining: after the R-Net, the fit's landmark stage solved with NumPy (mode "
                          "`rnet+lm`, a few ms, no torch); false: the R-Net alone (mode `rnet`)")
    second_pass_yaw_deg: float = Field(
        50.0, ge=0.0, le=180.0,
        description="without refining: a face the R-Net sees turned by at least this yaw (degrees) is re-aligned "
                    "from its own landmarks and predicted again (gate chosen on training photos: the second look "
                    "pays only beyond ~50 degrees); 0: never")
    # Input limits.
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="largest accepted upload, bytes")
    max_image_pixels: int = Field(40_000_000, gt=0, description="largest accepted image, width x height")
    max_set_images: int = Field(16, gt=0, description="most photos in one image-set request")
    max_request_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="largest request body (a set's photos together), bytes")
    max_decoded_pixels: int = Field(
        4_000_000, gt=0, description="a photo with more pixels is decoded downscaled (integer factor) to fit")
    max_set_decoded_pixels: int = Field(
        8_000_000, gt=0, description="decoded pixels of a whole set; each photo gets its share (<= the above)")
    decode_memory_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="memory all decodes in flight may use together; more waits")
    max_decode_bytes: int = Field(
        128 * 1024 * 1024, gt=0,
        description="most memory one photo's decode may need, estimated from its header (PNG, TIFF, WebP, BMP are "
                    "decoded at full size before they are reduced; JPEG is decoded downscaled by libjpeg); more is "
                    "refused (413 image_too_large)")
    max_faces: int = Field(16, gt=0, description="most faces reconstructed for faces=all (the largest ones)")
    # Serving.
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(1, gt=0, description="inference worker threads (per process)")
    processes: int = Field(
        1, gt=0, le=64,
        description="server processes sharing the port (gunicorn's arbiter), each with its own models, workers, "
                    "queue and connection cap; 1: one process, no gunicorn")
    queue_size: int = Field(16, ge=0, description="requests waiting beyond the workers before 503")
    log_level: str = "INFO"
    timeout_keep_alive_s: float = Field(5.0, gt=0, description="close an idle keep-alive connection after this")
    timeout_headers_s: float = Field(
        10.0, gt=0, description="a connection must send a request's complete headers within this, else 408/closed")
    max_connections: int = Field(256, gt=0, description="open HTTP connections; one more is answered 503 and closed")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        description="Host header values accepted (comma-separated; `*.example.com` wildcards); `*` = any")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="web origins allowed to call the API from a browser (comma-separated; "
                                          "empty = CORS off, `*` = any)")
    # HTTP service (facerecon.api).
    request_timeout_s: float = Field(
        120.0, gt=0, description="deadline of one HTTP request (upload + queue + inference): 408/504 past it")
    graceful_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests may take to finish before the server exits")
    warmup: bool = Field(True, description="run one inference at start-up before /readyz turns ready")
    warmup_fit_after_ready: bool = Field(
        True, description="with a default mode that fits: /readyz turns ready once the R-Net path (detection, R-Net, "
                          "JSON, mesh exports) is warm, and the fit's parts (torch, the renderer, overlays) warm up "
                          "right after, in the background; requests that need them meanwhile wait for them (false: "
                          "ready only when everything is warm)")
    warmup_image: Path | None = Field(
        None, description="photo for the warm-up inference (default: a face rendered from the model's mean)")

    @field_validator("allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v


def network_cache_dir(settings: Settings) -> Path:
    """Where decompressed networks (``networks/``) and the uncompressed face model (``facemodels/``) are kept
    between starts: ``settings.cache_dir``, else ``$XDG_CACHE_HOME/facerecon``, else ``~/.cache/facerecon``."""
    import os

    if settings.cache_dir is not None:
        return settings.cache_dir
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "facerecon"


def onnx_threads(settings: Settings) -> int:
    """The intra-op threads of the networks' onnxruntime sessions: ``onnx_threads``, else ``torch_threads``."""
    return settings.torch_threads if settings.onnx_threads is None else settings.onnx_threads


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def resolve_device(name: str) -> torch.device:
    """The torch device a ``device`` setting names: ``"auto"`` is CUDA when torch sees a GPU, else the CPU (the one
    place this rule is written)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
