"""The `sglang` backend: SGLang's in-process engine (optional extra `streamd[sglang]`, needs a GPU).
Without sglang installed the stage fails at start with this message; SGLang servers are reachable through the
`openai` backend from anywhere. The prompt is built with the model's own chat template (its processor)."""

from __future__ import annotations

import asyncio
from typing import Any

from streamd.errors import StageError
from streamd.stages.vlm.base import VlmAnswer, VlmRequest


class SglangBackend:
    def __init__(self, model: str):
        try:
            import sglang as sgl
        except ImportError:
            raise StageError(
                "the sglang backend needs SGLang (pip install 'streamd[sglang]', GPU only); or run an SGLang server "
                "and use the openai backend with its URL") from None
        from transformers import AutoProcessor

        self.model = model
        self.processor: Any = AutoProcessor.from_pretrained(model)
        self.engine: Any = sgl.Engine(model_path=model)

    def prompt(self, req: VlmRequest) -> str:
        content = [*({"type": "image"} for _ in req.images), {"type": "text", "text": req.text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    async def answer(self, req: VlmRequest) -> VlmAnswer:
        from PIL import Image

        params = {"max_new_tokens": req.max_tokens, "temperature": req.temperature}
        images = [Image.fromarray(im) for im in req.images] or None
        out = await self.engine.async_generate(prompt=self.prompt(req), image_data=images, sampling_params=params)
        meta = out.get("meta_info", {})
        return VlmAnswer(out.get("text", ""), "sglang:in-process",
                         {"prompt": meta.get("prompt_tokens", 0), "completion": meta.get("completion_tokens", 0)})

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.shutdown)
