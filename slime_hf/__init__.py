"""slime-hf: SliME (Beyond LLaVA-HD, arXiv 2406.08487) as a Hugging Face transformers model.

Importing the package registers SliME with the Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`, `AutoModelForCausalLM`, `AutoProcessor`, `AutoImageProcessor`).
"""

from .configuration_slime import SliMEConfig
from .image_processing_slime import (
    SliMEImageProcessor,
    SliMEImageProcessorPil,
    get_slice_grid,
    register_image_processors,
)
from .modeling_slime import SliMEForConditionalGeneration, SliMEModel, SliMEPreTrainedModel
from .processing_slime import SliMEProcessor


__version__ = "0.1.0"


def _register() -> None:
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    AutoConfig.register(SliMEConfig.model_type, SliMEConfig, exist_ok=True)
    for auto_class in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
        auto_class.register(SliMEConfig, SliMEForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(SliMEConfig, SliMEProcessor, exist_ok=True)
    try:
        register_image_processors(SliMEConfig)
    except ImportError:  # older transformers 5.x expose AutoImageProcessor only with torchvision installed
        pass
    SliMEProcessor.register_for_auto_class("AutoProcessor")
    SliMEImageProcessorPil.register_for_auto_class("AutoImageProcessor")


_register()

__all__ = [
    "SliMEConfig",
    "SliMEModel",
    "SliMEPreTrainedModel",
    "SliMEForConditionalGeneration",
    "SliMEImageProcessorPil",
    "SliMEImageProcessor",
    "SliMEProcessor",
    "get_slice_grid",
]
