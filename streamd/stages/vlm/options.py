"""The VLM stage's options: backend, when to ask, what to ask, what to do with the answers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from streamd.stages.vlm.openai import EndpointConfig, RetryConfig

# The safety-flags preset: tags mode with these tags and this question (both can be overridden).
SAFETY_TAGS = ["violence", "weapon", "fire", "smoke", "fallen_person", "blood", "nudity", "crowd_crush"]
SAFETY_PROMPT = ("You watch a security camera. Flag anything unsafe in this image. "
                 "Give each flag a confidence from 0 to 1.")
TAGS_PROMPT = "Which of the tags apply to this image? Give each a confidence from 0 to 1."
SUMMARY_PROMPT = ("These are captions of a camera's frames, oldest first, with their times in seconds:\n"
                  "{captions}\nSummarise what happened in two or three sentences.")
TRACK_PROMPT = "Describe this {label}: appearance, clothing or colour, and what it is doing."


class VlmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["vlm"] = "vlm"
    name: str | None = None
    # -- backend
    backend: Literal["openai", "transformers", "sglang"] = Field(
        "openai", description="openai (any OpenAI-compatible server), transformers (in process), sglang (in process)")
    model: str = Field(..., description="model id (openai) or a local path / hub id (transformers, sglang)")
    endpoints: list[EndpointConfig] = Field(default_factory=list, description="openai: the servers")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="transformers: device")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="transformers: dtype")
    quantization: Literal["4bit", "8bit"] | None = Field(None, description="transformers: bitsandbytes (CUDA)")
    generate_batch: int | None = Field(None, ge=1, description="transformers: questions in one generate call "
                                       "(the model's batcher, shared by every stage that names the model: stages "
                                       "with different values are a configuration error); null: the model's (8)")
    max_wait_ms: float | None = Field(None, ge=0, description="transformers: wait this long for a fuller generate "
                                      "batch (the model's, like generate_batch); null: the model's (20)")
    retry: RetryConfig = Field(default_factory=RetryConfig)
    # -- what to ask
    mode: Literal["text", "tags", "safety", "summary"] = Field(
        "text", description="text: an answer per question (parsed JSON with `schema`); tags: a tag list with "
                            "confidences turned into time ranges; safety: tags with the safety preset; summary: "
                            "captions summarised every `summary_every_s`")
    prompt: str | None = Field(None, description="the question (a template) when the prompt store has none for the "
                                                 "stream; placeholders: {stream_id} {time} {pts_s} {seq} "
                                                 "{detections} {tracks} {labels} {count}")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="JSON schema of the answer")
    tags: list[str] = Field(default_factory=list, description="tags/safety: the tags to look for")
    tag_threshold: float = Field(0.5, ge=0, le=1, description="tags: a tag is present at this confidence or more")
    tag_thresholds: dict[str, float] = Field(default_factory=dict, description="tags: per-tag thresholds")
    tag_end_after_s: float = Field(0.0, ge=0, description="tags: a tag ends once absent for this long (stream "
                                                          "time); 0 = at the first answer without it")
    summary_every_s: float = Field(60.0, gt=0, description="summary: window length, stream time")
    summary_prompt: str = Field(SUMMARY_PROMPT, description="summary: the text-only question; {captions}")
    summary_max_tokens: int = Field(256, ge=1)
    # -- when to ask
    every_s: float | None = Field(5.0, ge=0, description="ask at most this often per stream (stream time); "
                                                         "0 = every frame; null = never on a timer")
    on_prompt_change: bool = Field(True, description="ask at once when the stream's prompt changes")
    on_new_track: bool = Field(False, description="ask about a crop of every new track (needs a track stage)")
    track_prompt: str = Field(TRACK_PROMPT, description="the question about a new track's crop; also {label} "
                                                        "{track_id} {confidence}")
    crop_padding: float = Field(0.1, ge=0, le=1, description="new-track crops grow by this fraction per side")
    scene_change: float | None = Field(None, gt=0, le=1, description="ask when the frame differs from the last one "
                                                                    "asked about by this much (mean absolute "
                                                                    "difference of small grey thumbnails, 0-1)")
    clip_frames: int = Field(1, ge=1, le=32, description="send the last K sampled frames in one request")
    # -- backpressure and output
    max_in_flight: int = Field(4, ge=1, description="requests in flight for this stage")
    staleness_s: float = Field(10.0, gt=0, description="skip a frame older than this when its turn comes")
    max_pixels: int = Field(448 * 448, ge=64 * 64, description="frames are resized to at most this many pixels")
    jpeg_quality: int = Field(85, ge=30, le=100)
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    timeout_s: float = Field(30.0, gt=0)
    max_text_chars: int = Field(4000, ge=1, description="answers are cut to this length")
    maxlen: int = Field(10_000, ge=1, description="approximate MAXLEN of the vlm stream")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_batch" in data:
            raise ValueError("max_batch: a VLM stage's batch is generate_batch (questions in one generate call, "
                             "the model's batcher)")
        return data

    @model_validator(mode="after")
    def _modes(self) -> "VlmOptions":
        if self.mode == "safety" and not self.tags:
            self.tags = list(SAFETY_TAGS)
        if self.mode in ("tags", "safety") and not self.tags:
            raise ValueError("mode tags needs a `tags` list")
        if self.mode in ("tags", "safety") and self.schema_ is not None:
            raise ValueError("`schema` is not used in tags/safety modes (their answer format is fixed)")
        unknown = set(self.tag_thresholds) - set(self.tags)
        if unknown:
            raise ValueError(f"tag_thresholds names tags not in `tags`: {sorted(unknown)}")
        return self

    def default_prompt(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return {"tags": TAGS_PROMPT, "safety": SAFETY_PROMPT}.get(
            self.mode, "Describe what is happening in this image in one sentence.")
