"""Export layer: fold adapters into their base, write GGUF files.

- ``merge_adapter(adapter_dir, output_dir, dtype="fp32") -> Path``: LoRA / DoRA / QLoRA
  adapter folder -> plain Hugging Face folder (safetensors, tokenizer, generation config).
- ``export_gguf(model_dir, output_path, dtype="f16") -> Path``: Llama-architecture Hugging Face
  folder -> one GGUF file (f32, f16, bf16, q8_0) with tokenizer and chat template.

Both write to a temporary name and rename when complete; bad input raises UserError.
"""

from instructkit.export.gguf import (
    GGUF_DTYPES,
    SUPPORTED_ARCHITECTURES,
    export_gguf,
    normalize_gguf_dtype,
)
from instructkit.export.merge import (
    MERGE_DTYPES,
    blockwise_4bit_roundtrip,
    dequantize_base_4bit,
    merge_adapter,
    normalize_merge_dtype,
    qlora_settings,
)

__all__ = [
    "GGUF_DTYPES",
    "MERGE_DTYPES",
    "SUPPORTED_ARCHITECTURES",
    "blockwise_4bit_roundtrip",
    "dequantize_base_4bit",
    "export_gguf",
    "merge_adapter",
    "normalize_gguf_dtype",
    "normalize_merge_dtype",
    "qlora_settings",
]
