"""The `sglang` backend: SGLang's in-process engine (optional extra `streamd[sglang]`, needs a GPU).
Without sglang installed the stage fails at start with this message; SGLang servers are reachable through the
`openai` backend from anywhere."""

from __future__ import annotations

import asyncio
from typing import Any

from streamd.errors import StageError
from streamd.stages.vlm.base import VlmAnswer, VlmRequest


class SglangBackend:
    def __init__(self, model: str):
        try:
            import sglang  # noqa: F401
        except ImportError:
            raise StageError(
                "the sglang backend needs SGLang (pip install 'streamd[sglang]', GPU only); or run an SGLang server "
                "and use the openai backend with its URL") from None
        import sglang as sgl

        self.model = model
        self.engine: Any = sgl.Engine(model_path=model)

    async def answer(self, req: VlmRequest) -> VlmAnswer:
        from PIL import Image

        prompt = f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{req.text}<|im_end|>\n" \
                 "<|im_start|>assistant\n"
        params = {"max_new_tokens": req.max_tokens, "temperature": req.temperature}
        out = await self.engine.async_generate(prompt=prompt, image_data=[Image.fromarray(req.image)],
                                               sampling_params=params)
        meta = out.get("meta_info", {})
        return VlmAnswer(out.get("text", ""), "sglang:in-process",
                         {"prompt": meta.get("prompt_tokens", 0), "completion": meta.get("completion_tokens", 0)})

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.shutdown)
