"""Online SAM 2: one frame at a time, for the objects of many streams at once, on one loaded model.

SAM 2's video predictor (`sam2.sam2_video_predictor.SAM2VideoPredictor`) wants the whole video up front
(`init_state` loads every frame), runs one object per forward pass and keeps every frame's memory. This engine
takes the predictor's per-frame steps, one frame of each stream per call (`step`):

- the frames of all streams go through the image encoder in one batch;
- a prompted object (a box or points on this frame) runs as the predictor's initial conditioning frame: the SAM
  heads on the frame's features with the no-memory embedding, then the memory encoder on its mask (binarised, as
  the predictor encodes clicked frames before propagating);
- a followed object runs the predictor's `track_step`: its features conditioned on its own memory bank (its
  conditioning frames, its last spatial memories with their temporal encodings, its object pointers with theirs),
  the SAM heads, the memory encoder. Objects whose memory has the same shape (as many spatial memories and
  pointers; the usual case once objects are a few frames old) go through memory attention, heads and memory
  encoder in one batch, whatever stream they belong to: each object's positional encodings are its own.

Memory is kept as the predictor keeps it (bfloat16 spatial features, float pointers), but bounded
(`streamd.stages.segment.memory`). With one object per stream the masks match the predictor's frame by frame
(tests/test_segment.py checks it). Blocking: call `step` (or `passes`, which on a 2-core CPU splits a pass of
several streams in two halves run at once) on the device's executor thread.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamd.stages.segment.memory import Memory, Prompt, TrackedObject

ENDLESS = 1 << 31  # the predictor's num_frames for a live stream: no end, so every pointer slot can be used


@dataclass
class ObjectStep:
    obj: TrackedObject
    prompt: Prompt | None = None  # prompted on this frame (a new object, or a re-prompt): a conditioning frame


@dataclass
class FrameJob:
    """One stream's frame for `step`: its frame index `t`, the image (HxWx3 uint8 RGB) and its objects."""

    t: int
    image: np.ndarray
    steps: list[ObjectStep]
    tensor: Any = None  # the preprocessed image (prepare())


@dataclass
class ObjectOut:
    obj: TrackedObject
    score: float  # object score, sigmoid of SAM 2's object score logit (0..1)
    low_res: Any  # mask logits [1, h, w] on the CPU (h = w = image_size / 4)
    prompted: bool


@dataclass
class FrameOut:
    job: FrameJob
    objects: list[ObjectOut] = field(default_factory=list)


class Sam2Engine:
    def __init__(self, model: Any, name: str, device: str, precision: str = "auto", forward_batch: int = 8):
        import torch

        from streamd.errors import StageError
        from streamd.models.batcher import ModelBatcher

        self.model = model
        self.name = name
        self.device = device
        # the model's one batcher: rounds of every segment stage (every pipeline) that uses it, one frame per stream
        # each, go into shared passes of the image encoder (`step`), at most `forward_batch` frames
        self.forward_batch = forward_batch
        self.batcher: ModelBatcher[FrameJob, FrameOut] = ModelBatcher(
            lambda: StageError(f"SAM 2 model {name!r} was unloaded"))
        self._lane: Any = None
        self.torch = torch
        self.image_size = int(model.image_size)
        self.num_maskmem = int(model.num_maskmem)
        on_cuda = device.startswith("cuda")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if precision == "auto" and on_cuda:
            dtype = torch.bfloat16  # what SAM 2's own examples run on a GPU
        if dtype is torch.float16 and not on_cuda:
            dtype = None  # no fp16 autocast on the CPU
        self._autocast_dtype = dtype
        self.precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        self._mean = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
        self._std = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]
        # the predictor runs one object per pass, where the memory encoder's optional non-overlap step is a no-op;
        # with objects of several streams in one batch it must stay off
        model.non_overlap_masks_for_mem_enc = False
        self._fill_holes = model.fill_hole_area > 0 and _has_cuda_kernel()
        self._maskmem_pos: Any = None  # the memory encoder's positional encoding (the same for every frame)
        # on a CPU of 2 (or 3) cores, a pass of several streams' frames runs as two half passes at once, each on a
        # thread of its own at one torch thread (see `passes`)
        threads = torch.get_num_threads()
        self._halves: list[Any] = []
        self._half_threads = 1
        if device == "cpu" and 2 <= threads <= 3:  # one torch thread each, no OpenMP pools (more cores: unmeasured)
            from concurrent.futures import ThreadPoolExecutor

            self._halves = [ThreadPoolExecutor(1, thread_name_prefix=f"sam2-half{k}-{name}") for k in range(2)]

    def describe(self) -> dict[str, Any]:
        return {"runtime": "sam2", "image_size": self.image_size, "precision": self.precision,
                "forward_batch": self.forward_batch}

    async def run(self, jobs: list[FrameJob], memory_frames: int, low: bool = False,
                  streams: Iterable[str] = ()) -> list[FrameOut]:
        """`step` through the model's batcher: with the rounds other stages submit meanwhile (a stream is in one
        pipeline, and a stage submits its next round only once this one is done, so a pass never holds two frames
        of one stream). On the device's executor thread, never on the event loop. `low`: jobs' frames, the
        batcher's lower priority class (live streams' frames, `streams`, go first)."""
        import asyncio

        from streamd.models.executors import device_executor

        if self.batcher.error is not None:
            raise self.batcher.error
        if self._lane is None or self._lane.done():
            self._lane = asyncio.create_task(
                self.batcher.lane(self.passes, device_executor(self.device), self.forward_batch),
                name=f"sam2:{self.name}")
        return await self.batcher.submit(jobs, memory_frames, low=low, streams=streams)

    async def aclose(self, error: BaseException | None = None) -> None:
        """Unloaded: rounds waiting (and later ones) fail with `error`; a pass under way ends on its own."""
        import asyncio

        from streamd.models.memory import clear_task_frames

        await self.batcher.aclose(error)
        lane, self._lane = self._lane, None
        if lane is not None:
            lane.cancel()
            await asyncio.gather(lane, return_exceptions=True)
            clear_task_frames(lane)
        for ex in self._halves:
            ex.shutdown(wait=False)

    # -- windows of the memory bank ---------------------------------------------------------------------------------
    def max_memory_frames(self) -> int:
        return self.num_maskmem - 1

    def window(self, next_t: int, memory_frames: int) -> tuple[int, int]:
        """(first frame whose spatial memory frame `next_t` can read, first frame whose pointer it can read)."""
        r = max(1, int(self.model.memory_temporal_stride_for_eval))
        if memory_frames <= 0:
            spatial = next_t
        elif memory_frames == 1:
            spatial = next_t - 1
        else:
            spatial = ((next_t - 2) // r) * r - (memory_frames - 2) * r
        pointers = next_t - (self.model.max_obj_ptrs_in_encoder - 1) if self.model.use_obj_ptrs_in_encoder else next_t
        return spatial, min(spatial, pointers)

    # -- one frame of each stream ---------------------------------------------------------------------------------
    def prepare(self, image: np.ndarray) -> Any:
        """The predictor's frame loading (`sam2.utils.misc._load_img_as_tensor` and the normalisation after it):
        resized to image_size x image_size by PIL, scaled to 0..1, normalised with ImageNet's mean and std."""
        from PIL import Image

        s = self.image_size
        arr = np.array(Image.fromarray(image).resize((s, s))) / 255.0
        return (self.torch.from_numpy(arr).permute(2, 0, 1).float() - self._mean) / self._std

    def passes(self, jobs: list[FrameJob], memory_frames: int) -> list[FrameOut]:
        """`step`, on the device's executor thread. On a CPU of 2 (or 3) cores, frames of two or more streams go as
        two half passes at once, each on a thread of its own at one torch thread: on a CPU a
        batch of frames costs what its frames cost one by one (the matrix products are as long either way), and two
        single-threaded passes keep both cores busier than one two-threaded pass, whose parallel regions wait for
        each other between operations (benchmarks/RESULTS.md, issue 15; the detector's CPU lanes do the same).
        A stream's objects are in one half; a stream has one frame per pass."""
        if len(jobs) < 2 or not self._halves:
            return self.step(jobs, memory_frames)
        from concurrent.futures import wait

        from streamd.models.executors import pin_torch_threads

        def half(part: list[FrameJob]) -> list[FrameOut]:
            pin_torch_threads(self._half_threads)  # no OpenMP pool of its own at one thread
            return self.step(part, memory_frames)

        h = (len(jobs) + 1) // 2
        futures = [ex.submit(half, part) for ex, part in zip(self._halves, (jobs[:h], jobs[h:]))]
        wait(futures)  # both halves end before the pass does, also when one fails
        return [o for f in futures for o in f.result()]

    def step(self, jobs: list[FrameJob], memory_frames: int) -> list[FrameOut]:
        """Run one frame of each job (each a different stream) and store the objects' new memories."""
        torch = self.torch
        with torch.inference_mode(), self._autocast():
            for j in jobs:
                if j.tensor is None:
                    j.tensor = self.prepare(j.image)
            images = torch.stack([j.tensor for j in jobs]).to(self.device)
            backbone = self.model.forward_image(images)
            _, feats, pos, sizes = self.model._prepare_backbone_features(backbone)
            outs = [FrameOut(j) for j in jobs]
            prompts: dict[int, list[tuple[int, ObjectStep]]] = defaultdict(list)
            tracks: dict[tuple[int, int], list[tuple[int, ObjectStep, Any]]] = defaultdict(list)
            for i, j in enumerate(jobs):
                for st in j.steps:
                    if st.prompt is not None:
                        prompts[len(st.prompt.points)].append((i, st))
                    else:
                        mem = self._memory_of(st.obj, j.t, memory_frames)
                        tracks[(len(mem[0]), len(mem[1]))].append((i, st, mem))
            for group in prompts.values():
                self._prompt(group, jobs, outs, feats, pos, sizes)
            for group in tracks.values():
                self._track(group, jobs, outs, feats, pos, sizes)
        return outs

    @contextmanager
    def _autocast(self) -> Iterator[None]:
        if self._autocast_dtype is None:
            with nullcontext():
                yield
        else:
            with self.torch.autocast(self.device.split(":")[0], dtype=self._autocast_dtype):
                yield

    def _gather(self, xs: list[Any], idx: list[int]) -> list[Any]:
        ix = self.torch.tensor(idx, device=xs[0].device)
        return [x.index_select(1, ix) for x in xs]

    def _high_res(self, feats: list[Any], sizes: list[tuple[int, int]]) -> list[Any] | None:
        if len(feats) <= 1:
            return None
        return [x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1])]

    def _prompt(self, group: list[tuple[int, ObjectStep]], jobs: list[FrameJob], outs: list[FrameOut],
                feats: list[Any], pos: list[Any], sizes: list[tuple[int, int]]) -> None:
        """New conditioning frames: SAM on the frame (no memory), then the memory of the prompted mask."""
        torch, m = self.torch, self.model
        idx = [i for i, _ in group]
        vf, vp = self._gather(feats, idx), self._gather(pos, idx)
        coords, labels = [], []
        for i, st in group:
            h, w = jobs[i].image.shape[:2]
            assert st.prompt is not None
            p = torch.tensor(st.prompt.points, dtype=torch.float32) / torch.tensor([w, h], dtype=torch.float32)
            coords.append(p * self.image_size)
            labels.append(torch.tensor(st.prompt.labels, dtype=torch.int32))
        points = {"point_coords": torch.stack(coords).to(self.device), "point_labels": torch.stack(labels).to(
            self.device)}
        pix = m._prepare_memory_conditioned_features(
            frame_idx=0, is_init_cond_frame=True, current_vision_feats=vf[-1:], current_vision_pos_embeds=vp[-1:],
            feat_sizes=sizes[-1:], output_dict={}, num_frames=ENDLESS)
        _, _, _, low, _, ptr, score = m._forward_sam_heads(
            backbone_features=pix, point_inputs=points, mask_inputs=None, high_res_features=self._high_res(vf, sizes),
            multimask_output=m._use_multimask(True, points))
        low = self._filled(low)
        high = torch.nn.functional.interpolate(low, size=(self.image_size, self.image_size), mode="bilinear",
                                               align_corners=False)
        mem, mem_pos = m._encode_new_memory(current_vision_feats=vf, feat_sizes=sizes, pred_masks_high_res=high,
                                            object_score_logits=score, is_mask_from_pts=True)
        self._keep_pos(mem_pos)
        for k, (i, st) in enumerate(group):
            t = jobs[i].t
            st.obj.cond[t] = Memory(mem[k : k + 1].to(torch.bfloat16), ptr[k : k + 1].float())
            st.obj.recent.pop(t, None)
            outs[i].objects.append(self._out(st.obj, score[k], low[k], True))

    def _memory_of(self, obj: TrackedObject, t: int, memory_frames: int) -> tuple[list[Any], list[Any]]:
        """What the predictor's `_prepare_memory_conditioned_features` reads for `obj` at frame `t`:
        [(t_pos, Memory)] spatial memories (conditioning frames first) and [(position, Memory)] pointers."""
        from sam2.modeling.sam2_utils import select_closest_cond_frames

        m = self.model
        selected, unselected = select_closest_cond_frames(t, obj.cond, m.max_cond_frames_in_attn)
        spatial: list[tuple[int, Memory]] = [(0, mem) for mem in selected.values()]
        r = max(1, int(m.memory_temporal_stride_for_eval))
        for t_pos in range(1, self.num_maskmem):
            t_rel = self.num_maskmem - t_pos
            if t_rel > memory_frames:
                continue
            prev = t - 1 if t_rel == 1 else ((t - 2) // r) * r - (t_rel - 2) * r
            mem = obj.recent.get(prev) or unselected.get(prev)
            if mem is not None and mem.features is not None:
                spatial.append((t_pos, mem))
        pointers: list[tuple[int, Memory]] = []
        if m.use_obj_ptrs_in_encoder:
            max_ptrs = min(ENDLESS, m.max_obj_ptrs_in_encoder)
            cond = {s: v for s, v in selected.items() if s <= t} if m.only_obj_ptrs_in_the_past_for_eval \
                else selected
            pointers = [((t - s) if m.use_signed_tpos_enc_to_obj_ptrs else abs(t - s), v) for s, v in cond.items()]
            for t_diff in range(1, max_ptrs):
                s = t - t_diff
                if s < 0:
                    break
                mem = obj.recent.get(s, unselected.get(s))
                if mem is not None:
                    pointers.append((t_diff, mem))
        return spatial, pointers

    def _track(self, group: list[tuple[int, ObjectStep, Any]], jobs: list[FrameJob], outs: list[FrameOut],
               feats: list[Any], pos: list[Any], sizes: list[tuple[int, int]]) -> None:
        """`track_step` for objects whose memories have the same shape, in one batch."""
        torch, m = self.torch, self.model
        from sam2.modeling.sam2_utils import get_1d_sine_pe

        B = len(group)
        vf, vp = self._gather(feats, [i for i, _, _ in group]), self._gather(pos, [i for i, _, _ in group])
        C, (H, W) = m.hidden_dim, sizes[-1]
        dev = vf[-1].device
        base_pos = self._maskmem_pos.to(dev).flatten(2).permute(2, 0, 1)  # [HW, 1, mem_dim]
        memory, memory_pos = [], []
        for k in range(len(group[0][2][0])):
            f = torch.cat([g[2][0][k][1].features for g in group]).to(dev, non_blocking=True)
            memory.append(f.flatten(2).permute(2, 0, 1))
            tpos = torch.stack([m.maskmem_tpos_enc[self.num_maskmem - g[2][0][k][0] - 1][0, 0] for g in group])
            memory_pos.append(base_pos + tpos[None])
        n_ptr_tokens = 0
        if group[0][2][1]:
            ptrs = torch.stack([torch.cat([g[2][1][k][1].obj_ptr for g in group]) for k in range(len(group[0][2][1]))])
            ptrs = ptrs.to(dev)  # [P, B, C]
            if m.add_tpos_enc_to_obj_ptrs:
                t_diff_max = min(ENDLESS, m.max_obj_ptrs_in_encoder) - 1
                tpos_dim = C if m.proj_tpos_enc_in_obj_ptrs else m.mem_dim
                at = torch.tensor([[p for p, _ in g[2][1]] for g in group], device=dev)  # [B, P]
                obj_pos = m.obj_ptr_tpos_proj(get_1d_sine_pe(at.t() / t_diff_max, dim=tpos_dim))  # [P, B, mem]
            else:
                obj_pos = ptrs.new_zeros(ptrs.shape[0], B, m.mem_dim)
            if m.mem_dim < C:
                ptrs = ptrs.reshape(-1, B, C // m.mem_dim, m.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
                obj_pos = obj_pos.repeat_interleave(C // m.mem_dim, dim=0)
            memory.append(ptrs)
            memory_pos.append(obj_pos)
            n_ptr_tokens = ptrs.shape[0]
        pix = m.memory_attention(curr=vf[-1:], curr_pos=vp[-1:], memory=torch.cat(memory, dim=0),
                                 memory_pos=torch.cat(memory_pos, dim=0), num_obj_ptr_tokens=n_ptr_tokens)
        pix = pix.permute(1, 2, 0).reshape(B, C, H, W)
        _, _, _, low, high, ptr, score = m._forward_sam_heads(
            backbone_features=pix, point_inputs=None, mask_inputs=None, high_res_features=self._high_res(vf, sizes),
            multimask_output=m._use_multimask(False, None))
        mem, mem_pos = m._encode_new_memory(current_vision_feats=vf, feat_sizes=sizes, pred_masks_high_res=high,
                                            object_score_logits=score, is_mask_from_pts=False)
        self._keep_pos(mem_pos)
        low = self._filled(low)
        for k, (i, st, _) in enumerate(group):
            st.obj.recent[jobs[i].t] = Memory(mem[k : k + 1].to(torch.bfloat16), ptr[k : k + 1].float())
            outs[i].objects.append(self._out(st.obj, score[k], low[k], False))

    def _keep_pos(self, mem_pos: list[Any]) -> None:
        if self._maskmem_pos is None:
            self._maskmem_pos = mem_pos[-1][0:1].clone()

    def _filled(self, low: Any) -> Any:
        if not self._fill_holes:
            return low
        from sam2.utils.misc import fill_holes_in_mask_scores

        return fill_holes_in_mask_scores(low, self.model.fill_hole_area)

    def _out(self, obj: TrackedObject, score_logit: Any, low: Any, prompted: bool) -> ObjectOut:
        return ObjectOut(obj, float(self.torch.sigmoid(score_logit.float()).reshape(-1)[0]),
                         low.float().cpu(), prompted)

    # -- masks at the frame's size ----------------------------------------------------------------------------------
    def frame_masks(self, low_res: list[Any], height: int, width: int) -> np.ndarray:
        """The predictor's `_get_orig_video_res_output` and the `> 0` its users apply: low-res logits of one frame's
        objects to boolean masks of the frame's size [N, H, W]. Safe on any thread (CPU tensors)."""
        torch = self.torch
        if not low_res:
            return np.zeros((0, height, width), bool)
        with torch.inference_mode():
            x = torch.stack(low_res)  # [N, 1, h, w]
            up = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
            return (up[:, 0] > 0).numpy()


def _has_cuda_kernel() -> bool:
    """sam2's optional CUDA extension (hole filling); without it the predictor skips that step (with a warning)."""
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True
