"""Putting the server together: load the SliME checkpoint, export its language model (cached), start vLLM, run the
application under uvicorn with a graceful SIGTERM (drain, then cancel)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from .engine import EngineOptions
from .images import ImageLimits


logger = logging.getLogger("uvicorn.error")  # configured by uvicorn, so the shutdown lines show


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ServeOptions:
    """Everything `python -m slime_hf.serve` takes (see its `--help`)."""

    model: str
    revision: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    export_dir: str | None = None
    shutdown_timeout: float = 30.0
    device: str = "cpu"
    chat_template: str | None = None
    max_images: int = 8
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    limits: ImageLimits = None
    engine: EngineOptions = None


def resolve_model_folder(model: str, revision: str | None) -> tuple[Path, str | None]:
    """A local folder as it is; a Hub id downloaded (its snapshot folder names the commit, the cache key's revision)."""
    from ..checkpoints import read_slime_config

    if os.path.isdir(model) or os.path.isabs(model) or model.startswith((".", "~")):
        read_slime_config(model)  # a missing folder, broken config.json or another model type, named by its path
        return Path(model), revision
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(model, revision=revision))
    return folder, folder.name


def _torch_dtype(name: str, model_folder: Path):
    import torch

    if name != "auto":
        return getattr(torch, name)
    from ..checkpoints import read_slime_config

    config = read_slime_config(model_folder)  # a dict; a missing or broken config.json is named by its path
    text_config = config.get("text_config") or {}
    name = text_config.get("dtype") or config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def build_state(options: ServeOptions):
    """Loads the model and processor, exports the language model (or reuses the cached export) and returns the
    application state with an engine starter (the engine starts in the server's event loop)."""
    import torch

    from ..modeling_slime import SliMEForConditionalGeneration
    from ..processing_slime import SliMEProcessor
    from .app import ServerState
    from .engine import start_engine
    from .export import cached_export, default_export_root, export_cache_key
    from .frontend import FrontEnd

    folder, revision = resolve_model_folder(options.model, options.revision)
    dtype = _torch_dtype(options.engine.dtype, folder)
    model = SliMEForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    processor = SliMEProcessor.from_pretrained(folder)
    dtype_name = str(dtype).removeprefix("torch.")
    key = export_cache_key(options.model, revision, dtype_name)
    export_dir = options.export_dir or default_export_root() / key
    export_dir = cached_export(model, processor.tokenizer, export_dir, options.model)
    # Only the front end stays here (SliMEModel without its decoder layers): vLLM holds the layers and the head.
    slime = model.model
    slime.language_model.layers = torch.nn.ModuleList()
    del model
    slime.to(options.device)
    limit = options.engine.max_model_len or slime.config.text_config.max_position_embeddings
    engine_options = EngineOptions(**{**options.engine.__dict__, "dtype": dtype_name})
    engine_options.max_model_len = limit
    frontend = FrontEnd(slime, processor, limit, options.max_batch_size, options.max_wait_ms)
    return ServerState(
        model_name=options.served_model_name or (options.model.rstrip("/").split("/")[-1]),
        processor=processor,
        frontend=frontend,
        engine=None,
        max_model_len=limit,
        limits=options.limits or ImageLimits(),
        max_images=options.max_images,
        api_key=options.api_key,
        chat_template=options.chat_template,
        start_engine=lambda: start_engine(str(export_dir), engine_options),
    )


def serve(options: ServeOptions) -> None:
    """Runs the server until SIGTERM / SIGINT: new connections are refused, running requests get
    `options.shutdown_timeout` seconds to finish, the rest are cancelled (streams end with an error chunk), and the
    process exits normally."""
    import uvicorn

    from .app import build_app, drain_and_cancel

    state = build_state(options)
    app = build_app(state)

    class Server(uvicorn.Server):
        draining_task = None

        def handle_exit(self, sig: int, frame) -> None:
            if self.draining_task is not None or sig not in (signal.SIGTERM, signal.SIGINT):
                return super().handle_exit(sig, frame)  # a second signal stops at once
            self.draining_task = True
            loop.call_soon_threadsafe(lambda: setattr(self, "draining_task", loop.create_task(self.drain())))

        async def drain(self) -> None:
            for server in getattr(self, "servers", []):
                server.close()  # no new connections; open ones stay
            logger.info(
                "shutting down: %d running request(s) get %.0f s to finish", len(state.active), options.shutdown_timeout
            )
            await drain_and_cancel(state, options.shutdown_timeout)
            self.should_exit = True

    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="info",
        timeout_graceful_shutdown=5,
    )
    server = Server(config)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(server.serve())
    finally:
        loop.close()
