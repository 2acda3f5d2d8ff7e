from setuptools import find_packages, setup


setup(
    name="slime-hf",
    version="0.1.0",
    description="SliME (Beyond LLaVA-HD, arXiv 2406.08487) as a Hugging Face transformers 5.x model",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["slime_hf", "slime_hf.*"]),
    package_data={"slime_hf": ["assets/*.png", "assets/demo_tokenizer/*"]},
    python_requires=">=3.10",
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
