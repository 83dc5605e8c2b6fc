"""The CPU lanes of a shared detector (streamd/stages/detector.py): Ultralytics' own steps around a detection
model's forward pass, run directly so that several lanes run at once, with the forward pass in PyTorch or ONNX
Runtime."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np


class Lane(abc.ABC):
    """Ultralytics' own steps around a detection model's forward pass, called directly, so that lanes run at
    once (`model.predict` holds a lock): the letterbox, the to-tensor of `BasePredictor.preprocess`, NMS and box
    scaling of `DetectionPredictor`. The frames' RGB goes into the letterbox as it is (the predictor flips its
    BGR input to RGB after it: the same tensor, without the copy), and NMS gets the request's parameters, not the
    shared predictor's. Each frame is letterboxed as Ultralytics letterboxes a frame of its own (the smallest
    stride-aligned rectangle); frames whose rectangles differ go in separate passes, so a frame's detections
    never depend on the frames it shares a batch with."""

    def __init__(self, stride: Any, threads: int):
        self.stride = stride
        self.threads = threads  # intra-op threads of its forward pass
        # torch's intra-op threads in the lane's thread: the count Ultralytics set when the lanes were made (see
        # SharedDetector._cpu_lanes); pinned, since a thread otherwise gets whatever count torch's last
        # set_num_threads left when it first uses torch (the device's executor sets its own back after each call)
        self.torch_threads: int | None = None
        self._imgsz: dict[int, Any] = {}

    def __call__(self, images: list[np.ndarray], p: Any) -> list[tuple[np.ndarray, list[Any] | None]]:
        from ultralytics.data.augment import LetterBox
        from ultralytics.utils.checks import check_imgsz

        from streamd.models.executors import pin_torch_threads

        pin_torch_threads(self.torch_threads)
        imgsz = self._imgsz.get(p.imgsz)
        if imgsz is None:
            imgsz = self._imgsz[p.imgsz] = check_imgsz(p.imgsz, stride=self.stride, min_dim=2)
        letterbox = LetterBox(imgsz, auto=True, stride=self.stride)
        boxed = [letterbox(image=im) for im in images]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(boxed):
            by_shape.setdefault(x.shape, []).append(i)
        out: list[Any] = [None] * len(images)
        for idx in by_shape.values():
            dets = self._detect(np.stack([boxed[i] for i in idx]), [images[i].shape for i in idx], p)
            for i, d in zip(idx, dets):
                out[i] = (d, None)
        return out

    def _detect(self, x: np.ndarray, shapes: list[tuple[int, ...]], p: Any) -> list[np.ndarray]:
        import torch
        from ultralytics.utils import nms, ops

        with torch.inference_mode():
            preds = nms.non_max_suppression(self._forward(x), p.conf, p.iou,
                                            list(p.classes) if p.classes else None, max_det=p.max_det)
            dets = []
            for pred, shape in zip(preds, shapes):
                pred[:, :4] = ops.scale_boxes(x.shape[1:3], pred[:, :4], shape)
                dets.append(pred[:, :6].cpu().numpy())
        return dets

    @abc.abstractmethod
    def _forward(self, x: np.ndarray) -> Any:
        """(B, H, W, 3) uint8 RGB -> the model's raw predictions (what NMS takes)."""


class TorchLane(Lane):
    """One replica of the fused PyTorch model (Ultralytics' AutoBackend); with `bf16`, under bfloat16 autocast on
    the CPU (predictions back in float32 for NMS)."""

    def __init__(self, backend: Any, bf16: bool = False, threads: int = 1):
        super().__init__(backend.stride, threads)
        self.backend = backend
        self.bf16 = bf16

    def _forward(self, x: np.ndarray) -> Any:
        import torch

        b = self.backend
        im = torch.from_numpy(x).to(b.device).permute(0, 3, 1, 2).contiguous()
        im = (im.half() if b.fp16 else im.float()).div_(255)
        if not self.bf16:
            return b(im)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = b(im)
        return (y[0] if isinstance(y, (list, tuple)) else y).float()


class OnnxLane(Lane):
    """One ONNX Runtime session of the exported model (float32 input scaled to 0..1, like the PyTorch lane)."""

    def __init__(self, session: Any, stride: Any, threads: int = 1):
        super().__init__(stride, threads)
        self.session = session
        self.input = session.get_inputs()[0].name

    def _forward(self, x: np.ndarray) -> Any:
        import torch

        im = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255).contiguous()
        return torch.from_numpy(self.session.run(None, {self.input: im.numpy()})[0])
