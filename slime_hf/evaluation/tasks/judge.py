"""Whether a GPT judge is configured for the GPT-judged benchmarks (LLaVA-Bench in-the-wild, MM-Vet).

lmms-eval's judges read `API_TYPE` (`openai` by default, or `azure`), the key (`OPENAI_API_KEY` / `AZURE_API_KEY`),
the endpoint and `MODEL_VERSION` from the environment. Without a key the tasks only write the answers in the official
formats, and the logs say how to score them with the official scripts.
"""

from __future__ import annotations

import os


def judge_configured() -> bool:
    """`True` when the environment holds an API key for lmms-eval's judge (`API_TYPE` openai or azure)."""
    api_type = os.environ.get("API_TYPE", "openai")
    key = os.environ.get("AZURE_API_KEY" if api_type == "azure" else "OPENAI_API_KEY", "")
    return bool(key) and key != "YOUR_API_KEY"
