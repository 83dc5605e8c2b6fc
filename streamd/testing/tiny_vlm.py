"""Test kit: a tiny random-weight Qwen2.5-VL model directory, built offline.

`build_tiny_qwen25vl(path)` writes a complete Hugging Face model folder (config, ~2 MB of safetensors weights, a
byte-level BPE tokenizer trained on local text, image/video processors and a Qwen-style chat template) that loads
with `AutoProcessor.from_pretrained(path)` / `AutoModelForImageTextToText.from_pretrained(path)` under
`HF_HUB_OFFLINE=1` and can be served by `transformers serve <path>`. Outputs are gibberish but deterministic for a
given seed; the point is to exercise the real preprocessing / generate / serving code paths on CPU in seconds.

Gotchas for callers:
- Batched generation needs `processor.tokenizer.padding_side = "left"` (saved as the default here).
- The special tokens sit at the start of the vocabulary (ids 0..6); `model.config.image_token_id` etc. are set to
  the tokenizer's ids, so never hard-code Qwen's real ids (151655 ...).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["build_tiny_qwen25vl", "QWEN_CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS"]

_RECIPE_VERSION = 1
_MARKER = "streamd_tiny_vlm.json"

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's own template: string or list content; image / image_url parts -> vision placeholder, video parts ->
# video placeholder, text parts verbatim; default system prompt; add_generation_prompt opens the assistant turn.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog. A camera watches the street; a person walks past a red car.\n"
    "def describe(image):\n    return 'a photo of ' + str(image)\n"
)


def _corpus() -> Iterator[str]:
    """Local text to train the BPE on: a few big .py files from the installed transformers (always present)."""
    import transformers

    root = Path(transformers.__file__).parent
    found = False
    for rel in ("modeling_utils.py", "tokenization_utils_base.py", "generation/utils.py"):
        p = root / rel
        if p.is_file():
            found = True
            with p.open(encoding="utf-8", errors="replace") as f:
                yield from f
    if not found:
        for _ in range(200):
            yield _FALLBACK_TEXT


def _build_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,  # -> ids 0..6, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                   "<|image_pad|>", "<|video_pad|>"],
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def _build(out: Path, vocab_size: int, seed: int) -> None:
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _build_tokenizer(vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}

    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    # Older/newer versions read these from the top level as well.
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.bos_token_id = ids["<|endoftext|>"]
    gen.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    gen.pad_token_id = ids["<|endoftext|>"]
    gen.do_sample = False

    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 224 * 224}),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 224 * 224}),
        chat_template=QWEN_CHAT_TEMPLATE,
    )

    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / _MARKER).write_text(json.dumps({"recipe": _RECIPE_VERSION, "vocab_size": vocab_size, "seed": seed}))


def _loads(path: Path, vocab_size: int, seed: int) -> bool:
    """True when `path` holds a complete build of this recipe with these parameters."""
    try:
        marker = json.loads((path / _MARKER).read_text())
        if marker != {"recipe": _RECIPE_VERSION, "vocab_size": vocab_size, "seed": seed}:
            return False
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            return False
        from safetensors import safe_open

        for w in weights:  # header parse: catches truncated / corrupt weight files without loading them
            with safe_open(str(w), framework="pt") as f:
                if not list(f.keys()):
                    return False
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path)
        return (config.model_type == "qwen2_5_vl"
                and config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    except Exception:
        return False


def build_tiny_qwen25vl(path: str | os.PathLike[str], vocab_size: int = 2000, seed: int = 0) -> Path:
    """Build (or reuse, if path/config.json already exists and loads) a tiny Qwen2.5-VL in `path`. Returns path.

    Fully offline. The build is written to a sibling temp folder and renamed into place, so an interrupted or
    concurrent build never leaves a half-written model at `path`. A stale build of this recipe (other vocab_size /
    seed, or unloadable) is replaced; a non-empty `path` that is not a model folder raises FileExistsError.
    """
    path = Path(path)
    if (path / "config.json").is_file() and _loads(path, vocab_size, seed):
        return path
    if path.exists() and any(path.iterdir()) and not (path / "config.json").exists() and not (path / _MARKER).exists():
        raise FileExistsError(f"{path} exists and is not a model folder; refusing to overwrite it")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.build-", dir=path.parent))
    try:
        _build(tmp, vocab_size, seed)
        if path.exists():
            if _loads(path, vocab_size, seed):  # another process finished first
                return path
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if _loads(path, vocab_size, seed):  # lost a race to a concurrent builder
                return path
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
