"""The `transformers` backend: a vision-language model in process (`AutoModelForImageTextToText` +
`AutoProcessor`), loaded by the model manager (`model_loader`) once per (model, device, dtype, quantization) and
shared; questions from many streams
are batched into one `generate` call (up to `generate_batch`, waiting at most `max_wait_ms` for a fuller batch); a
question past its `not_after` when its batch is formed is dropped (VlmStale).
`generate` runs in the device's single executor thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from streamd.errors import StageError
from streamd.models.batcher import ModelBatcher
from streamd.models.executors import device_executor
from streamd.models.memory import clear_task_frames
from streamd.stages.vlm.base import VlmAnswer, VlmRequest, check_fresh


def load_transformers_vlm(model: str, device: str, dtype: str, quantization: str | None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kw: dict[str, Any] = {}
    if quantization is not None:
        if not device.startswith("cuda"):
            raise StageError(f"{quantization} loading needs CUDA (bitsandbytes); this stage runs on {device}")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise StageError("4-bit/8-bit loading needs bitsandbytes: pip install 'streamd[gpu]'") from None
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=quantization == "4bit",
                                                       load_in_8bit=quantization == "8bit")
    torch_dtype = {"auto": "auto", "float32": torch.float32, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}[dtype]
    try:
        processor = AutoProcessor.from_pretrained(model)
        net = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype, **kw)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise StageError(f"cannot load VLM {model!r}: {e}" + (" (HF_HUB_OFFLINE=1: only local models)"
                                                             if offline else "")) from None
    if quantization is None:
        net = net.to(device)
    net.eval()
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"  # batched generation appends after the prompt
    return processor, net


def model_loader(spec: Any, device: str) -> tuple[Any, Any]:
    """How the model manager loads a vlm of the catalog (`streamd.models.manager.LOADERS`): processor and model
    on the device's executor, then its shared batcher on the loop. Precision: auto / fp32 / fp16 / bf16 dtypes,
    8bit / 4bit through bitsandbytes (CUDA)."""
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(spec.precision, "auto")
    quantization = spec.precision if spec.precision in ("8bit", "4bit") else None
    opts = spec.typed_options()
    return (lambda: load_transformers_vlm(spec.source, device, dtype, quantization),
            lambda loaded: SharedVlm(loaded, spec.source, device, opts.generate_batch, opts.max_wait_ms))


class ManagedVlm:
    """The transformers backend as a VLM stage holds it: a handle on the model manager's shared model, borrowed
    for each question (loaded again first if it was unloaded while idle). A stream whose model was unloaded by
    force gets that reason instead of an answer."""

    def __init__(self, ref: Any):
        self.ref = ref  # streamd.models.ModelRef

    async def answer(self, req: VlmRequest) -> VlmAnswer:
        why = self.ref.revoked.get(req.stream_id) if req.stream_id is not None else None
        if why is not None:
            from streamd.models.errors import ModelRevoked

            raise ModelRevoked(why)
        async with self.ref.use() as vlm:
            return await vlm.answer(req)

    async def aclose(self) -> None:
        self.ref.close()


def _batch_key(req: VlmRequest) -> tuple[Any, ...]:
    """Requests that can share one generate call: same generation settings, all with images or all text-only."""
    return req.max_tokens, req.temperature, bool(req.images)


class SharedVlm:
    """A loaded model plus its one batcher (`streamd.models.batcher.ModelBatcher`): questions of every stream and
    every pipeline that uses the model, up to `generate_batch` in one `generate` call."""

    def __init__(self, loaded: tuple[Any, Any], name: str, device: str, generate_batch: int, max_wait_ms: float):
        self.processor, self.model = loaded
        self.name = name
        self.device = device
        self.generate_batch = generate_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.batcher: ModelBatcher[VlmRequest, VlmAnswer] = ModelBatcher(
            lambda: StageError(f"VLM {self.name!r} was unloaded"), admit=check_fresh)
        self._task: asyncio.Task[None] | None = None

    @property
    def calls(self) -> int:
        return self.batcher.batches

    @property
    def batch_sizes(self) -> list[int]:
        return list(self.batcher.batch_sizes)

    async def answer(self, req: VlmRequest) -> VlmAnswer:
        if self.batcher.error is not None:
            raise self.batcher.error
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(
                self.batcher.lane(self._generate, device_executor(self.device), self.generate_batch,
                                  self.max_wait_s), name=f"vlm:{self.name}")
        (answer,) = await self.batcher.submit([req], _batch_key(req), low=req.low,
                                              streams=() if req.low or req.stream_id is None else (req.stream_id,))
        return answer

    async def aclose(self, error: BaseException | None = None) -> None:
        """Stop the batcher; questions waiting (or in the generate call under way) fail with `error`."""
        self.batcher.fail_all(error or StageError(f"VLM {self.name!r} was unloaded"))
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            clear_task_frames(task)  # then nothing but the manager holds this object: freed when it lets go
        self.batcher.fail_all(self.batcher.error)

    def _generate(self, reqs: list[VlmRequest], _key: Any = None) -> list[VlmAnswer]:
        import torch

        texts = []
        for r in reqs:
            content = [*({"type": "image"} for _ in r.images), {"type": "text", "text": r.text}]
            messages = [{"role": "user", "content": content}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        images = [list(r.images) for r in reqs] if reqs[0].images else None  # a batch is all-image or all-text
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        first = reqs[0]
        kw: dict[str, Any] = {"max_new_tokens": first.max_tokens}
        if first.temperature > 0:
            kw.update(do_sample=True, temperature=first.temperature)
        else:
            kw["do_sample"] = False
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kw)
        n_in = inputs["input_ids"].shape[1]
        new = out[:, n_in:]
        tok = getattr(self.processor, "tokenizer", self.processor)
        texts_out = tok.batch_decode(new, skip_special_tokens=True)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        pad = getattr(tok, "pad_token_id", None)
        return [VlmAnswer(t, f"transformers:{self.device}",
                          {"prompt": int(p), "completion": int((row != pad).sum()) if pad is not None else len(row)})
                for t, p, row in zip(texts_out, prompt_tokens, new)]
